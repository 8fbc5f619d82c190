"""Server settings, from command-line flags with TALLY_* environment variables as defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from server.auth.limits import LimitSettings


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tally"


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None  # None: start the embedded PostgreSQL under data_dir
    max_batch_size: int = 10_000
    max_future_seconds: int = 300
    max_event_age_seconds: int = 35 * 86_400  # older events need a backfill (usage:backfill)
    # What callers can make the server hold before their token is checked: docs/security.md,
    # "Memory bound", has the arithmetic and the test that measures it.
    max_message_bytes: int = 4 * 1024 * 1024
    max_incoming_requests: int = 16  # request messages being received at once (server.api.decoding)
    request_receive_seconds: float = 10.0  # how long one may take to arrive
    max_connections: int = 256  # 0: unlimited
    max_streams_per_connection: int = 100
    max_concurrent_calls: int = 1_000  # all connections together, streams included; 0: unlimited
    max_events_in_flight: int = 20_000  # streamed events held between reading and committing, all streams
    pool_size: int = 8
    read_pool_size: int = 4
    grace_seconds: float = 10.0
    health_interval_seconds: float = 2.0
    # Bearer tokens. With neither key file, a development secret is created under data_dir.
    jwt_secret_file: Path | None = None  # HS256 secret
    jwt_public_keys_file: Path | None = None  # RS256/ES256 public keys, PEM or JWKS
    jwt_issuer: str | None = None  # None: `iss` is not checked
    jwt_audience: str | None = "tally"  # None: `aud` is not checked
    # TLS: a certificate and key turn it on; a client CA also requires client certificates.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    limits: LimitSettings = field(default_factory=LimitSettings)
    # How often rate limits and stream counts are settled with the other server processes on
    # the database (server.auth.sharing); 0: limits per process.
    limit_sync_seconds: float = 0.1
    # Telemetry (server.telemetry). Traces are configured by the standard OTEL_* variables.
    http_port: int | None = None  # /metrics, /healthz, /readyz; None: no HTTP listener, 0: any free port
    http_host: str | None = None  # None: the same as host
    access_log: bool = False  # one line per call (tally.access); `tally serve` turns it on
    log_format: str = "text"  # "text" or "json" (log lines and access lines)
    metrics_tenant_labels: bool = False  # a tenant label on the event counters (one series per tenant)
