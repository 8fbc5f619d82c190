"""Tally's tests.

The test process hosts gRPC servers and clients in-process and starts PostgreSQL's programs
(initdb, pg_ctl) with fork and exec while gRPC's threads run. gRPC's fork handlers are then
skipped with a warning, and a child crashed between fork and exec once (a segmentation fault
in the child, seen on one core). `tally serve` turns gRPC's fork support off for the same
reason (server/cli.py); the tests run the same way. Set before anything imports grpc.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
