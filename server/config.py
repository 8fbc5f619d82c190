"""Server settings: one table from which `tally`'s flags, environment variables and defaults are derived.

Each setting is a field of `Config` (or of a group of settings such as `LimitSettings`) declared with
`setting(...)`, which keeps its flag, kind and help text beside its default, as pydantic's `Field` does.
The environment variable is `TALLY_` and the flag's name unless a setting names another one.
`server.cli` turns the table into argparse flags whose defaults come from the environment and builds a
`Config` from what it parsed, so no flag, variable or default is written twice. This module imports
nothing heavy: `tally --help` reads it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

if TYPE_CHECKING:
    from server.domain.lifecycle import Issuer

T = TypeVar("T")

_SETTING = "tally.setting"  # field metadata key of a Setting
_GROUP = "tally.group"  # field metadata key of a nested group's class


@dataclass(frozen=True, slots=True)
class Kind(Generic[T]):
    """How the text of a flag or an environment variable becomes a setting's value."""

    parse: Callable[[str], T]  # raises ValueError for text that is not `what`
    what: str  # completes "TALLY_PORT must be ...", e.g. "an integer"
    choices: tuple[str, ...] | None = None  # the only texts it accepts, listed by --help
    show: Callable[[T], str] = str  # a value as text that `parse` reads back, e.g. True as "on"
    switch: bool = False  # a flag without an argument: --name sets it, --no-name clears it


_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_WHAT = "a duration like 3600, 90s, 30m, 12h or 7d"


def parse_duration(text: str) -> int:
    """Whole seconds from `3600`, `90s`, `30m`, `12h` or `7d`; more than zero."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not {_DURATION_WHAT}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_durations(text: str) -> tuple[int, ...]:
    """Whole seconds of each comma-separated duration: `3d,5d,7d` -> (259200, 432000, 604800)."""
    return tuple(parse_duration(part) for part in text.split(","))


def _show_durations(seconds: tuple[int, ...]) -> str:
    def one(value: int) -> str:
        for unit in ("d", "h", "m"):
            if value % _UNIT_SECONDS[unit] == 0:
                return f"{value // _UNIT_SECONDS[unit]}{unit}"
        return f"{value}s"

    return ",".join(one(value) for value in seconds)


def _optional_text(text: str) -> str | None:
    return text or None  # empty: unset, e.g. TALLY_JWT_AUDIENCE= turns the `aud` check off


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _optional_int(text: str) -> int | None:
    return int(text) if text else None


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(text)
    return text == "on"


def _yes_no(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "on", "yes"):
        return True
    if word in ("", "0", "false", "off", "no"):
        return False
    raise ValueError(text)


def choice(*values: str) -> Kind[str]:
    """A kind whose text must be one of `values`, exactly."""

    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(text)
        return text

    return Kind(parse, "one of " + ", ".join(values), values)


TEXT: Kind[str] = Kind(str, "text")
OPTIONAL_TEXT: Kind[str | None] = Kind(_optional_text, "text")
INT: Kind[int] = Kind(int, "an integer")
FLOAT: Kind[float] = Kind(float, "a number")
PATH: Kind[Path] = Kind(Path, "a path")
OPTIONAL_PATH: Kind[Path | None] = Kind(_optional_path, "a path")
DURATION: Kind[int] = Kind(parse_duration, _DURATION_WHAT)
OPTIONAL_INT: Kind[int | None] = Kind(_optional_int, "an integer")
ON_OFF: Kind[bool] = Kind(_on_off, "on or off", ("on", "off"), show=lambda on: "on" if on else "off")
DURATIONS: Kind[tuple[int, ...]] = Kind(
    parse_durations, "durations separated by commas, like 3d,5d,7d", show=_show_durations
)
SWITCH: Kind[bool] = Kind(_yes_no, "true or false (1/0, on/off, yes/no)", switch=True)


@dataclass(frozen=True, slots=True)
class Setting:
    """A setting's face to the user: its flag, environment variable, kind and help text."""

    flag: str
    env: str
    kind: Kind[Any]
    help: str

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value in."""
        return self.flag.removeprefix("--").replace("-", "_")


@overload
def setting(flag: str, kind: Kind[T], *, default: T, help: str, env: str | None = None) -> T: ...
@overload
def setting(
    flag: str, kind: Kind[T], *, default_factory: Callable[[], T], help: str, env: str | None = None
) -> T: ...
def setting(
    flag: str,
    kind: Kind[Any],
    *,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    help: str,
    env: str | None = None,
) -> Any:
    """A dataclass field that is also a flag and an environment variable (`TALLY_<FLAG>` unless `env`)."""
    env = env or "TALLY_" + flag.removeprefix("--").replace("-", "_").upper()
    metadata = {_SETTING: Setting(flag, env, kind, help)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def group(cls: Callable[[], T]) -> T:
    """A dataclass field holding a nested group of settings, whose settings are flags like the others."""
    return field(default_factory=cls, metadata={_GROUP: cls})


def _rate(what: str) -> str:
    return (
        f"rate limit: {what}, shared by every server process on the database (see "
        "--limit-sync-seconds), bursts up to one second's worth; 0: unlimited"
    )


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Rate limits and stream bounds of one server process; rates in units per second, 0 means unlimited."""

    tenant_events_per_second: float = setting(
        "--tenant-events-per-second", FLOAT, default=10_000, help=_rate("events per second of one tenant")
    )
    principal_events_per_second: float = setting(
        "--principal-events-per-second",
        FLOAT,
        default=50_000,
        help=_rate("events per second of one principal"),
    )
    tenant_requests_per_second: float = setting(
        "--tenant-requests-per-second", FLOAT, default=200, help=_rate("calls per second about one tenant")
    )
    principal_requests_per_second: float = setting(
        "--principal-requests-per-second", FLOAT, default=500, help=_rate("calls per second of one principal")
    )
    max_streams_per_principal: int = setting(
        "--max-streams-per-principal",
        INT,
        default=16,
        help="most concurrent IngestUsage/StreamUsage/StreamUsageSummaries calls of one principal; "
        "0: unlimited",
    )
    stream_idle_seconds: float = setting(
        "--stream-idle-seconds",
        FLOAT,
        default=300,
        help="an ingestion stream without a message for this long is closed with DEADLINE_EXCEEDED; 0: never",
    )


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL and the development secret live unless told: XDG's data home."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tally"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `tally serve` is told; see `tally serve --help` or the README's table."""

    host: str = setting(
        "--host",
        TEXT,
        default="127.0.0.1",
        help="address to listen on, e.g. 0.0.0.0 or [::] for every interface",
    )
    port: int = setting(
        "--port",
        INT,
        default=50051,
        help="port to listen on; 0 picks a free one. A port that another process listens on is "
        "refused at start",
    )
    data_dir: Path = setting(
        "--data-dir",
        PATH,
        default_factory=default_data_dir,
        help="directory of the embedded PostgreSQL cluster and of the development JWT secret, "
        "kept between runs (and, with --workers and --http-port, of the workers' metrics files)",
    )
    database_url: str | None = setting(  # None: start the embedded PostgreSQL under data_dir
        "--database-url",
        OPTIONAL_TEXT,
        default=None,
        env="DATABASE_URL",  # the name every PostgreSQL tool knows
        help="PostgreSQL URL to use instead of the embedded server",
    )
    max_batch_size: int = setting(
        "--max-batch-size", INT, default=10_000, help="most events in one IngestUsage/StreamUsage message"
    )
    max_future_seconds: int = setting(
        "--max-future-seconds",
        INT,
        default=300,
        help="how far ahead of the server's clock an event time may be",
    )
    max_event_age_seconds: int = setting(  # older events need a backfill (usage:backfill)
        "--max-event-age",
        DURATION,
        default=35 * 86_400,
        help="how far behind the server's clock an event time may be: seconds, or a number with s, m, h "
        "or d; older usage needs a backfill (scope usage:backfill, audited)",
    )
    # What callers can make the server hold before their token is checked: docs/security.md,
    # "Memory bound", has the arithmetic and the test that measures it.
    max_message_bytes: int = setting(
        "--max-message-bytes",
        INT,
        default=4 * 1024 * 1024,
        help="largest gRPC message accepted or sent, e.g. one batch of events; with the next flags "
        "it bounds the memory that callers without a token can take (docs/security.md)",
    )
    max_incoming_requests: int = setting(  # request messages being received at once (server.api.decoding)
        "--max-incoming-requests",
        INT,
        default=16,
        help="most request messages being received at once before their token is checked (unary "
        "calls, health, reflection); more wait",
    )
    request_receive_seconds: float = setting(
        "--request-receive-seconds",
        FLOAT,
        default=10.0,
        help="a request message that has not arrived in this time, waiting included, ends its call "
        "with DEADLINE_EXCEEDED",
    )
    max_connections: int = setting(
        "--max-connections",
        INT,
        default=256,
        help="most open client connections; more are closed as they arrive; 0: unlimited",
    )
    max_streams_per_connection: int = setting(
        "--max-streams-per-connection",
        INT,
        default=100,
        help="most concurrent calls on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); "
        "clients queue the rest",
    )
    max_concurrent_calls: int = setting(
        "--max-concurrent-calls",
        INT,
        default=1_000,
        help="most calls in progress over all connections, streams included; more get "
        "RESOURCE_EXHAUSTED; 0: unlimited",
    )
    max_events_in_flight: int = setting(
        "--max-events-in-flight",
        INT,
        default=20_000,
        help="most streamed events held between reading and committing, over all streams; beyond it "
        "the server stops reading and gRPC flow control holds the clients back, which bounds memory",
    )
    pool_size: int = setting("--pool-size", INT, default=8, help="most PostgreSQL connections for writes")
    read_pool_size: int = setting(
        "--read-pool-size",
        INT,
        default=4,
        help="most PostgreSQL connections for summaries, planned per call",
    )
    grace_seconds: float = setting(
        "--grace-seconds",
        FLOAT,
        default=10.0,
        help="on SIGTERM/SIGINT, how long in-flight calls may take to finish; writes already under way "
        "then get 10 s more",
    )
    log_level: str = setting(
        "--log-level", choice("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO", help="log level"
    )
    log_format: str = setting(
        "--log-format",
        choice("text", "json"),
        default="text",
        help="log lines as text, or as one JSON object per line with the trace id and request id",
    )
    access_log: bool = setting(  # `tally serve` also turns it off below --log-level INFO
        "--access-log",
        ON_OFF,
        default=True,
        help="one INFO line per call, as tally.access (method, status, duration, principal, request "
        "id; never the token or the events); off with --log-level WARNING too",
    )
    # Bearer tokens. With neither key file, a development secret is created under data_dir.
    jwt_secret_file: Path | None = setting(
        "--jwt-secret-file",
        OPTIONAL_PATH,
        default=None,
        help="file holding the HS256 secret (at least 32 bytes) that signs bearer tokens. Without it and "
        "--jwt-public-keys, a development secret is created in --data-dir",
    )
    jwt_public_keys_file: Path | None = setting(
        "--jwt-public-keys",
        OPTIONAL_PATH,
        default=None,
        help="PEM (public keys or certificates) or JWKS file of RS256/ES256 keys that verify bearer "
        "tokens; may be combined with --jwt-secret-file",
    )
    jwt_issuer: str | None = setting(
        "--jwt-issuer", OPTIONAL_TEXT, default=None, help="required `iss` claim of tokens; unset: not checked"
    )
    jwt_audience: str | None = setting(
        "--jwt-audience",
        OPTIONAL_TEXT,
        default="tally",
        help="required `aud` claim of tokens; empty: not checked",
    )
    # TLS: a certificate and key turn it on; a client CA also requires client certificates.
    tls_cert_file: Path | None = setting(
        "--tls-cert",
        OPTIONAL_PATH,
        default=None,
        help="PEM certificate chain of the server; turns TLS on",
    )
    tls_key_file: Path | None = setting(
        "--tls-key", OPTIONAL_PATH, default=None, help="PEM private key of --tls-cert"
    )
    tls_client_ca_file: Path | None = setting(
        "--tls-client-ca",
        OPTIONAL_PATH,
        default=None,
        help="PEM CA certificates; clients must present a certificate they signed (mutual TLS)",
    )
    limits: LimitSettings = group(LimitSettings)
    limit_sync_seconds: float = setting(  # server.auth.sharing
        "--limit-sync-seconds",
        FLOAT,
        default=0.1,
        help="how often each server process settles the rate limits and stream counts above with the "
        "other processes (workers, hosts) through PostgreSQL; within one such interval they may "
        "together exceed a limit's burst (docs/scaling.md); 0: limits per process",
    )
    workers: int = setting(  # server.supervisor; not read by a worker's TallyServer
        "--workers",
        INT,
        default=1,
        help="server processes sharing the port, each using one core; 0: one per available core. "
        "Each has its own database pools; see docs/scaling.md for choosing N",
    )
    # Billing (server.billing): the issuer printed on invoices and credit notes, its numbering,
    # and period close.
    issuer_name: str = setting(
        "--issuer-name",
        TEXT,
        default="Tally",
        help="the operator's name printed on invoices and credit notes; also keys their numbering",
    )
    issuer_address: str = setting(
        "--issuer-address", TEXT, default="", help="the operator's postal address on invoices"
    )
    issuer_tax_id: str = setting(
        "--issuer-tax-id", TEXT, default="", help="the operator's tax id on invoices"
    )
    invoice_number_prefix: str = setting(
        "--invoice-number-prefix",
        TEXT,
        default="TALLY-{year}-",
        help="prefix of invoice numbers, {year} being the UTC year of finalization; each prefix is one "
        "gap-free sequence, e.g. TALLY-2026-000001",
    )
    credit_note_number_prefix: str = setting(
        "--credit-note-number-prefix",
        TEXT,
        default="TALLY-CN-{year}-",
        help="prefix of credit note numbers (their own gap-free sequence)",
    )
    period_close_grace_seconds: int = setting(
        "--period-close-grace",
        DURATION,
        default=3600,
        help="how long after a billing period ends the server closes it (generates and finalizes its "
        "invoice): seconds, or a number with s, m, h or d; later usage goes on the next invoice",
    )
    period_close_interval_seconds: float = setting(
        "--period-close-interval",
        FLOAT,
        default=60.0,
        help="seconds between looks for periods due to close and spend thresholds passed; 0: off",
    )
    # Collecting invoices through Stripe (server.payments, docs/stripe.md). The secret key comes from
    # this file or from the TALLY_STRIPE_API_KEY variable, never from a flag (a flag's value shows in
    # the process list); with neither, simulation mode: nothing is sent anywhere.
    stripe_api_key_file: Path | None = setting(
        "--stripe-api-key-file",
        OPTIONAL_PATH,
        default=None,
        help="file holding the Stripe secret key (or set TALLY_STRIPE_API_KEY); neither: simulation "
        "mode, finalized invoices are not sent to Stripe and their payment state is 'simulated'",
    )
    stripe_api_base: str | None = setting(
        "--stripe-api-base",
        OPTIONAL_TEXT,
        default=None,
        help="base URL of the Stripe API; unset: Stripe's own (https://api.stripe.com)",
    )
    stripe_collection_method: str = setting(
        "--stripe-collection-method",
        choice("charge_automatically", "send_invoice"),
        default="charge_automatically",
        help="how Stripe collects a pushed invoice: charge the customer's default payment method, or "
        "email the invoice to be paid within --stripe-days-until-due",
    )
    stripe_days_until_due: int = setting(
        "--stripe-days-until-due",
        INT,
        default=30,
        help="days a sent invoice has until it is due (with --stripe-collection-method send_invoice)",
    )
    outbox_interval_seconds: float = setting(
        "--outbox-interval",
        FLOAT,
        default=1.0,
        help="seconds between looks for due outbox jobs (Stripe pushes, webhook deliveries); 0: this "
        "process runs none",
    )
    # Telemetry (server.telemetry). Traces are configured by the standard OTEL_* variables.
    http_port: int | None = setting(
        "--http-port",
        OPTIONAL_INT,
        default=None,
        help="port of the HTTP listener serving GET /metrics (Prometheus), /healthz and /readyz, e.g. "
        "9464; unset: no HTTP listener; 0 picks a free one; with --workers the parent serves it, "
        "summed over the workers",
    )
    http_host: str | None = setting(
        "--http-host",
        OPTIONAL_TEXT,
        default=None,
        help="address of the HTTP listener; unset: the same as --host",
    )
    metrics_tenant_labels: bool = setting(
        "--metrics-tenant-labels",
        SWITCH,
        default=False,
        help="label the event counters with the tenant id: one series per tenant, so only with few tenants",
    )
    # Stripe webhooks and dunning (server.payments). The webhook secret itself is never a flag
    # (the process list would show it): TALLY_STRIPE_WEBHOOK_SECRET, or this file.
    stripe_webhook_secret_file: Path | None = setting(
        "--stripe-webhook-secret-file",
        OPTIONAL_PATH,
        default=None,
        help="file holding the signing secret (whsec_...) of the Stripe webhook endpoint POST "
        "/webhooks/stripe on the HTTP listener; or set TALLY_STRIPE_WEBHOOK_SECRET. Neither: the "
        "endpoint is not served",
    )
    dunning_schedule_seconds: tuple[int, ...] = setting(
        "--dunning-schedule",
        DURATIONS,
        default=(3 * 86_400, 5 * 86_400, 7 * 86_400),
        help="when a failed invoice payment is retried, counted from the first failure; after the "
        "last retry fails the invoice is uncollectible and its tenant delinquent",
    )
    # Not a flag: how often health probes PostgreSQL; tests shorten it.
    health_interval_seconds: float = 2.0


def issuer_of(config: Config) -> Issuer:
    """The operator printed on invoices and credit notes, as the issuer settings describe it."""
    from server.domain.lifecycle import Issuer  # here: `tally --help` need not import it

    return Issuer(
        name=config.issuer_name,
        address=config.issuer_address,
        tax_id=config.issuer_tax_id,
        invoice_prefix=config.invoice_number_prefix,
        credit_note_prefix=config.credit_note_number_prefix,
    )


def settings(cls: type[Any] = Config, prefix: str = "") -> dict[str, Setting]:
    """The table: every setting of `cls` and its groups, by path (`port`, `limits.stream_idle_seconds`)."""
    table: dict[str, Setting] = {}
    for f in fields(cls):
        if _SETTING in f.metadata:
            table[prefix + f.name] = f.metadata[_SETTING]
        elif _GROUP in f.metadata:
            table.update(settings(f.metadata[_GROUP], f"{prefix}{f.name}."))
    return table


def build_config(values: Mapping[str, Any]) -> Config:
    """A Config from values by attribute path, as `settings()` names them; the others keep their default."""
    config: Config = _build(Config, values, "")
    return config


def _build(cls: Any, values: Mapping[str, Any], prefix: str) -> Any:
    arguments: dict[str, Any] = {}
    for f in fields(cls):
        path = prefix + f.name
        if _GROUP in f.metadata:
            arguments[f.name] = _build(f.metadata[_GROUP], values, path + ".")
        elif path in values:
            arguments[f.name] = values[path]
    return cls(**arguments)
