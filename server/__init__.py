"""Tally: usage metering and billing over gRPC, stored in PostgreSQL."""
