"""The `tally` command: the client's commands and, when the server is installed, the server's.

The client's are report, cancel, ingest, summary, invoices, credit-notes, rates, plans,
profiles, meters, collection-status, webhooks and audit; the server adds serve, token and retention.

Exit status: 0 on success, 1 when a call failed (the error's code, reason, message and
field violations go to stderr) or an ingestion left events rejected or unacknowledged,
2 for a usage error (a bad flag, an unreadable file).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tally_client.cli.parser import build_parser

USAGE_ERROR = 2
CALL_FAILED = 1


class UsageError(Exception):
    """A problem with what the user asked for, found before or without calling the server."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run `tally` with argv (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # gRPC is imported by the command that needs it, not here: `tally --help` stays quick, and
    # `tally serve` sets GRPC_ENABLE_FORK_SUPPORT before gRPC reads it on import.
    try:
        code = args.handler(args)
    except UsageError as exc:
        parser.exit(USAGE_ERROR, f"tally {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        errors = sys.modules.get("tally_client.errors")  # not loaded: it cannot be a TallyError
        if errors is None or not isinstance(exc, errors.TallyError):
            raise
        from tally_client.cli.output import print_error

        print_error(exc)
        return CALL_FAILED
    return code or 0
