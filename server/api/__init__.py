"""The gRPC edge: protobuf in, domain calls, protobuf out; domain errors become statuses here."""
