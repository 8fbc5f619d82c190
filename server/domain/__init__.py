"""Pure billing and metering logic on plain typed values: no gRPC, no database."""
