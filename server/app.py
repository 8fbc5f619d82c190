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
from grpc_reflection.v1alpha import reflection

from server.api.billing import BillingApi
from server.api.decoding import TolerantRegistration
from server.api.pipeline import EventBudget
from server.api.usage import UsageApi
from server.auth.authenticator import Authenticator
from server.auth.devkey import ensure_dev_secret
from server.auth.keys import VerificationKey, load_public_keys, load_secret
from server.auth.limits import Limiter
from server.auth.tokens import TokenVerifier
from server.billing import Billing
from server.config import Config
from server.domain.events import EventRules
from server.domain.timeutil import MICROS_PER_SECOND
from server.health import DatabaseHealth
from server.metering import Metering
from server.ratecard import RateCardCache
from server.storage.audit import AuditStore
from server.storage.database import create_pool
from server.storage.embedded import EmbeddedPostgres
from server.storage.invoices import InvoiceStore
from server.storage.migrations import migrate
from server.storage.rates import RateStore
from server.storage.usage import UsageStore
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc, usage_service_pb2, usage_service_pb2_grpc

log = logging.getLogger(__name__)

# Shutdown, after the grace period: how long batches already being written may take to
# commit, and how long closing the pools may wait for busy connections before it
# terminates them (asyncpg's close waits for every connection, for ever if one hangs).
DRAIN_SECONDS = 10.0
POOL_CLOSE_SECONDS = 5.0

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


async def _close(pool: asyncpg.Pool, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await pool.close()
    except TimeoutError:
        log.warning("database connections still busy %g s into shutdown: terminated", seconds)
        pool.terminate()


class TallyServer:
    """A running Tally: database, pool, services and the gRPC server. Use start() and stop()."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.port = 0
        self.dsn = ""
        self._embedded: EmbeddedPostgres | None = None
        self._pool: asyncpg.Pool | None = None
        self._read_pool: asyncpg.Pool | None = None
        self._server: grpc.aio.Server | None = None
        self._health: DatabaseHealth | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._metering: Metering | None = None
        self._budget: EventBudget | None = None
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
        """Start everything; ValueError (a bad key or TLS file) before anything is started."""
        config = self.config
        authenticator = Authenticator(
            TokenVerifier(self._verification_keys(), issuer=config.jwt_issuer, audience=config.jwt_audience),
            Limiter(config.limits),
        )
        credentials = server_credentials(config)
        if config.database_url:
            self.dsn = config.database_url
        else:
            self._embedded = EmbeddedPostgres(config.data_dir)
            self.dsn = await asyncio.to_thread(self._embedded.start)
        self._pool = await create_pool(self.dsn, min_size=2, max_size=config.pool_size)
        self._read_pool = await create_pool(
            self.dsn, min_size=1, max_size=config.read_pool_size, custom_plans=True
        )
        applied = await migrate(self._pool)
        if applied:
            log.info("schema migrated to version %d", applied[-1])

        rate_store = RateStore(self._pool)
        rate_card = RateCardCache(rate_store)
        await rate_card.reload()
        rules = EventRules(
            max_future_micros=config.max_future_seconds * MICROS_PER_SECOND,
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
        billing = Billing(rate_store, InvoiceStore(self._pool), AuditStore(self._pool), rate_card, now_micros)

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
            ],
        )
        tolerant = TolerantRegistration(server)  # undecodable requests: INVALID_ARGUMENT
        self._budget = EventBudget(config.max_events_in_flight)
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageApi(self._metering, authenticator, self._budget), tolerant
        )
        billing_service_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingApi(billing, authenticator), tolerant
        )
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
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

    @property
    def events_in_flight(self) -> int:
        """Streamed events read and not yet answered, over all streams (see api.pipeline)."""
        return 0 if self._budget is None else self._budget.in_use

    async def stop(
        self, *, drain_seconds: float = DRAIN_SECONDS, close_seconds: float = POOL_CLOSE_SECONDS
    ) -> None:
        """Graceful shutdown, every step bounded (grace + drain + close + PostgreSQL's own stop).

        Health turns NOT_SERVING and no new call is accepted; calls in flight have
        `grace_seconds` to finish, then gRPC cancels them (clients see UNAVAILABLE, and
        streams end and give back what they hold within the pipeline's cleanup bound).
        Batches already handed to a write lane get `drain_seconds` to commit; the pools
        then close, and connections still busy after `close_seconds` are terminated (their
        transactions roll back whole). Last, the embedded PostgreSQL stops.
        """
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._health is not None:
            await self._health.set_all(False)
        if self._server is not None:
            await self._server.stop(self.config.grace_seconds)
        if self._metering is not None:
            try:
                async with asyncio.timeout(drain_seconds):
                    await self._metering.drain()
            except TimeoutError:
                log.warning("writes still in flight %g s into shutdown: closing anyway", drain_seconds)
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                await _close(pool, close_seconds)
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
