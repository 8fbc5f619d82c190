"""Wiring: the one place that builds Tally's parts, connects them and runs the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from server.api.billing import BillingApi
from server.api.decoding import BoundedRegistration, RequestReader
from server.api.pipeline import EventBudget
from server.api.reflection import SourcePool, load_sources
from server.api.usage import UsageApi
from server.auth.authenticator import Authenticator
from server.auth.devkey import ensure_dev_secret
from server.auth.keys import VerificationKey, load_public_keys, load_secret
from server.auth.limits import SYSTEM_CLOCK, LimitClock, Limiter
from server.auth.sharing import LimitSharing
from server.auth.tokens import TokenVerifier
from server.billing import Billing
from server.config import Config
from server.domain.events import EventRules
from server.domain.pagination import PageTokens
from server.domain.timeutil import MICROS_PER_SECOND
from server.health import DatabaseHealth
from server.metering import Metering
from server.ports import check_port_free
from server.ratecard import RateCardCache
from server.storage.audit import AuditStore
from server.storage.database import create_pool
from server.storage.embedded import EmbeddedPostgres
from server.storage.invoices import InvoiceStore
from server.storage.migrations import migrate
from server.storage.rates import RateStore
from server.storage.shared_keys import PAGE_TOKEN_KEY, shared_key
from server.storage.shared_limits import SharedLimitStore
from server.storage.usage import UsageStore
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc, usage_service_pb2, usage_service_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
)


def now_micros() -> int:
    return time.time_ns() // 1_000


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS credentials if a certificate is configured; with a client CA, clients must present one."""
    if config.tls_cert_file is None:
        if config.tls_key_file or config.tls_client_ca_file:
            raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
        return None
    if config.tls_key_file is None:
        raise ValueError("--tls-cert needs --tls-key")
    client_ca = None
    if config.tls_client_ca_file is not None:
        client_ca = _read(config.tls_client_ca_file, "TLS client CA file")
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key_file, "TLS key file"), _read(config.tls_cert_file, "TLS certificate file"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def memory_bound_options(config: Config) -> list[tuple[str, int]]:
    """gRPC core's limits on what a client can make the server hold before its token is checked."""
    options = [
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # gRPC's "overload protection" also counts calls that have finished but whose memory
        # is not yet freed, and refuses new streams (REFUSED_STREAM, UNAVAILABLE to the
        # client) while a client stays within the limit: seen at 64 concurrent unary calls
        # under a limit of 100. Without it the limit is plain HTTP/2: clients queue the rest.
        ("grpc.http.overload_protection", 0),
    ]
    if config.max_connections:
        options.append(("grpc.max_allowed_incoming_connections", config.max_connections))
    return options


class TallyServer:
    """A running Tally: database, pool, services and the gRPC server. Use start() and stop()."""

    def __init__(
        self, config: Config, *, worker: int | None = None, clock: LimitClock = SYSTEM_CLOCK
    ) -> None:
        """worker: this process's index among the processes of `tally serve --workers N`
        (server.supervisor). Their parent has checked and holds the port, started PostgreSQL
        and migrated the schema, so a worker does none of that; telemetry can tell workers
        apart by it. clock: the rate limits' clock (its monotonic and wall-clock readings, see
        server.auth.limits.LimitClock): tests pass a fake one to step time themselves."""
        self.config = config
        self.worker = worker
        self._clock = clock
        self.port = 0
        self.dsn = ""
        self._embedded: EmbeddedPostgres | None = None
        self._pool: asyncpg.Pool | None = None
        self._read_pool: asyncpg.Pool | None = None
        self._server: grpc.aio.Server | None = None
        self._health: DatabaseHealth | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._metering: Metering | None = None
        self._sharing_task: asyncio.Task[None] | None = None
        # Set when no key is configured and the development secret is in use.
        self.dev_secret_path: Path | None = None

    def _verification_keys(self) -> list[VerificationKey]:
        config = self.config
        keys: list[VerificationKey] = []
        if config.jwt_secret_file is not None:
            keys.append(load_secret(config.jwt_secret_file))
        if config.jwt_public_keys_file is not None:
            keys.extend(load_public_keys(config.jwt_public_keys_file))
        if not keys:
            path, created = ensure_dev_secret(config.data_dir)
            log.warning(
                "NO JWT KEY CONFIGURED: %s the DEVELOPMENT secret %s. It is for development only; "
                "configure --jwt-secret-file or --jwt-public-keys in production.",
                "created" if created else "using",
                path,
            )
            self.dev_secret_path = path
            keys.append(load_secret(path))
        return keys

    async def start(self) -> None:
        """Start everything; ValueError (a bad key or TLS file, a port in use) before anything is started."""
        config = self.config
        limiter = Limiter(config.limits, self._clock)
        authenticator = Authenticator(
            TokenVerifier(self._verification_keys(), issuer=config.jwt_issuer, audience=config.jwt_audience),
            limiter,
        )
        credentials = server_credentials(config)
        if self.worker is None:
            # Before PostgreSQL starts, so that a busy port fails fast and leaves nothing behind.
            # A worker's parent has checked it and holds it (server.ports.reserve_port).
            check_port_free(config.host, config.port)
        if config.database_url:
            self.dsn = config.database_url
        else:
            self._embedded = EmbeddedPostgres(config.data_dir)
            self.dsn = await asyncio.to_thread(self._embedded.start)
        self._pool = await create_pool(self.dsn, min_size=2, max_size=config.pool_size)
        self._read_pool = await create_pool(
            self.dsn, min_size=1, max_size=config.read_pool_size, custom_plans=True
        )
        if self.worker is None:  # a worker's parent migrated once for all of them
            applied = await migrate(self._pool)
            if applied:
                log.info("schema migrated to version %d", applied[-1])

        rate_store = RateStore(self._pool)
        rate_card = RateCardCache(rate_store)
        await rate_card.reload()
        rules = EventRules(
            max_future_micros=config.max_future_seconds * MICROS_PER_SECOND,
            max_age_micros=config.max_event_age_seconds * MICROS_PER_SECOND,
            max_batch_size=config.max_batch_size,
        )
        self._metering = Metering(
            UsageStore(self._pool, self._read_pool),
            rate_card,
            rules,
            now_micros,
            # Half the write pool: lanes hold a connection only while writing, and the other
            # half serves invoice generation, rate changes and partition creation.
            write_lanes=max(1, config.pool_size // 2),
        )
        billing = Billing(
            rate_store,
            InvoiceStore(self._pool),
            AuditStore(self._pool),
            rate_card,
            PageTokens(await shared_key(self._pool, PAGE_TOKEN_KEY)),
            now_micros,
        )

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # gRPC grows a stream's flow-control window with the bandwidth it measures;
                # on a fast link it then buffers megabytes per stream that the server is not
                # reading yet, which made peak memory swing between 130 and 270 MB in the
                # benchmark. With the default window, the events-in-flight budget is what
                # bounds memory (82-85 MB at batches of 2,000 over 4 streams), at the same rate.
                ("grpc.http2.bdp_probe", 0),
                *memory_bound_options(config),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_calls or None,
        )
        # Every request message is read through one bounded reader (server.api.decoding).
        reader = RequestReader(config.max_incoming_requests, config.request_receive_seconds)
        tally = BoundedRegistration(server, reader, tally=True)  # also: undecodable -> INVALID_ARGUMENT
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageApi(self._metering, authenticator, EventBudget(config.max_events_in_flight)), tally
        )
        billing_service_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingApi(billing, authenticator), tally
        )
        open_services = BoundedRegistration(server, reader, tally=False)
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, open_services)
        reflection_names = (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                reflection_names,
                pool=SourcePool(load_sources()),  # `grpcurl describe` shows the proto comments
            ),
            open_services,
        )
        self._health = DatabaseHealth(
            health_servicer, self.dsn, SERVICE_NAMES, interval_seconds=config.health_interval_seconds
        )
        await self._health.set_all(await self._health.check_once())
        address = f"{config.host}:{config.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        await server.start()
        self._server = server
        self._health_task = asyncio.create_task(self._health.run(), name="tally-health")
        # A process without limits has nothing to settle, and no business judging (on its own
        # clock) which of the other processes' shared rows are stale.
        if config.limit_sync_seconds > 0 and not limiter.unlimited:
            sharing = LimitSharing(limiter, SharedLimitStore(self._pool), interval=config.limit_sync_seconds)
            self._sharing_task = asyncio.create_task(sharing.run(), name="tally-shared-limits")

    async def stop(self) -> None:
        """Graceful shutdown: report NOT_SERVING, let in-flight calls and batches finish, close."""
        for task in (self._health_task, self._sharing_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._health is not None:
            await self._health.set_all(False)
        if self._server is not None:
            await self._server.stop(self.config.grace_seconds)
        if self._metering is not None:
            await self._metering.drain()
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                await pool.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
