"""Wiring: the one place that builds Tally's parts, connects them and runs the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import asyncpg
import grpc
import stripe
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from server.api.billing import BillingApi
from server.api.decoding import BoundedRegistration, RequestReader
from server.api.meters import MeterApi
from server.api.notifications import NotificationApi
from server.api.payments import PaymentApi
from server.api.reflection import SourcePool, load_sources
from server.api.usage import UsageApi
from server.auth.authenticator import Authenticator
from server.auth.devkey import ensure_dev_secret
from server.auth.keys import VerificationKey, load_public_keys, load_secret
from server.auth.limits import SYSTEM_CLOCK, LimitClock, Limiter
from server.auth.sharing import LimitSharing
from server.auth.tokens import TokenVerifier
from server.billing import Billing
from server.billing.lifecycle import Lifecycle
from server.billing.periods import CloseScheduler, Periods
from server.billing.plans import Plans
from server.billing.pricer import InvoicePricer
from server.config import Config, issuer_of
from server.domain.events import EventRules
from server.domain.pagination import PageTokens
from server.domain.timeutil import MICROS_PER_SECOND
from server.health import DatabaseHealth
from server.metering import Metering
from server.metering.corrections import Corrections
from server.metering.meters import MeterCatalog
from server.metering.pipeline import EventBudget
from server.notifications.delivery import DELIVER_JOB, DeliveryHandler, WebhookSender
from server.notifications.subscriptions import Subscriptions
from server.payments.collection import Collection
from server.payments.dunning import DunningSchedule
from server.payments.endpoint import StripeWebhookEndpoint
from server.payments.health import PaymentsHealth
from server.payments.ledger import PaymentLedger
from server.payments.outbox import JobHandler, Outbox
from server.payments.retries import RETRY_KIND, OutboxRetryJobs, StripeInvoicePayer, retry_handler
from server.payments.signature import load_webhook_secret
from server.payments.stripe_client import stripe_api_key, stripe_client
from server.payments.stripe_push import RequestPacer, StripePush, StripeSettings, requests_per_second
from server.ports import check_port_free
from server.ratecard import RateCardCache
from server.storage.audit import AuditStore
from server.storage.corrections import CorrectionStore
from server.storage.credit_notes import CreditNoteStore
from server.storage.database import create_pool
from server.storage.embedded import EmbeddedPostgres
from server.storage.folding import Folder
from server.storage.invoices import InvoiceStore
from server.storage.meter_backfill import MeterBackfiller
from server.storage.meters import MeterStore
from server.storage.migrations import migrate
from server.storage.plan_book import PlanStore
from server.storage.rates import RateStore
from server.storage.shared_keys import PAGE_TOKEN_KEY, shared_key
from server.storage.shared_limits import SharedLimitStore
from server.storage.stats import read_figures
from server.storage.usage import UsageStore
from server.storage.webhooks import WebhookStore
from server.telemetry.calls import CallTelemetry
from server.telemetry.figures import DatabaseFigures
from server.telemetry.http import HttpListener
from server.telemetry.ingest import IngestTelemetry
from server.telemetry.logs import AccessLog
from server.telemetry.metrics import Metrics
from server.telemetry.multiprocess import MetricFiles
from server.telemetry.tracing import (
    INSTRUMENTATION_NAME,
    instrument_queries,
    resource,
    tracer_provider_from_env,
)
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    meter_service_pb2,
    meter_service_pb2_grpc,
    notification_service_pb2,
    notification_service_pb2_grpc,
    payment_service_pb2,
    payment_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)

log = logging.getLogger(__name__)

# Shutdown, after the grace period: how long batches already being written may take to
# commit, and how long closing the pools may wait for busy connections before it
# terminates them (asyncpg's close waits for every connection, for ever if one hangs).
DRAIN_SECONDS = 10.0
POOL_CLOSE_SECONDS = 5.0

SERVICE_NAMES = (
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
    meter_service_pb2.DESCRIPTOR.services_by_name["MeterService"].full_name,
    notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name,
    payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name,
)


def now_micros() -> int:
    """The wall clock in microseconds since the epoch: the server's `now` for events and billing."""
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


def memory_bound_options(config: Config) -> list[tuple[str, int]]:
    """GRPC core's limits on what a client can make the server hold before its token is checked."""
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


GAUGE_PUBLISH_SECONDS = 1.0


async def _publish_gauges(metrics: Metrics) -> None:
    """Write a worker's events-in-flight gauge to its metrics file, every GAUGE_PUBLISH_SECONDS.

    The gauge is read, not counted, so the parent's scrape sees it at most this old.
    """
    while True:
        metrics.publish_events_in_flight()
        await asyncio.sleep(GAUGE_PUBLISH_SECONDS)


class TallyServer:
    """A running Tally: database, pool, services and the gRPC server. Use start() and stop().

    `worker`: this process's index among the processes of `tally serve --workers N`
    (server.supervisor). Their parent has checked and holds the port, started PostgreSQL and
    migrated the schema, so a worker does none of that; telemetry can tell workers apart by it.
    `clock`: the rate limits' clock (monotonic and wall-clock readings, server.auth.limits.LimitClock):
    tests pass a fake one to step time themselves.
    `wall_clock`: the time of day in microseconds since the epoch, which drives the event
    window, billing and period close: tests pass a fake one to close periods by themselves.
    `tracer_provider`: where spans go; None reads the OTEL_* variables (server.telemetry.tracing).
    `log_stream`: where access lines go (with config.access_log), by default standard error.
    `environ`: where TALLY_STRIPE_API_KEY and TALLY_STRIPE_WEBHOOK_SECRET are read from; `tally
    serve` passes the process's environment, and the default (none) keeps tests and embedded
    servers in simulation mode.
    `metric_files`: a worker's metrics files, which its parent sums on /metrics
    (server.telemetry.multiprocess); the worker then serves no HTTP of its own.
    """

    def __init__(
        self,
        config: Config,
        *,
        tracer_provider: TracerProvider | None = None,
        log_stream: TextIO | None = None,
        worker: int | None = None,
        clock: LimitClock = SYSTEM_CLOCK,
        wall_clock: Callable[[], int] = now_micros,
        environ: Mapping[str, str] | None = None,
        metric_files: MetricFiles | None = None,
    ) -> None:
        self.config = config
        self._environ = environ or {}
        self._metric_files = metric_files
        self._gauge_task: asyncio.Task[None] | None = None
        self.worker = worker
        self._clock = clock
        self.wall_clock = wall_clock
        # Webhooks and dunning (server.payments.ledger): tests reach the ledger here.
        self.payments: PaymentLedger | None = None
        self.port = 0
        self.http_port = 0  # the HTTP listener's port once started (with config.http_port set)
        self._tracer_provider = tracer_provider
        self._owns_tracer_provider = False
        self._uninstrument: Callable[[], None] | None = None
        self.metrics: Metrics | None = None
        self._http: HttpListener | None = None
        self._log_stream = log_stream
        self._access_log_task: asyncio.Task[None] | None = None
        self.dsn = ""
        self._embedded: EmbeddedPostgres | None = None
        self._pool: asyncpg.Pool | None = None
        self._read_pool: asyncpg.Pool | None = None
        self._server: grpc.aio.Server | None = None
        self._health: DatabaseHealth | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._folding_task: asyncio.Task[None] | None = None
        self._backfill_task: asyncio.Task[None] | None = None
        self._metering: Metering | None = None
        self._scheduler: CloseScheduler | None = None
        # The period close use cases, for ClosePeriod and for tests that drive the scheduler.
        self.periods: Periods | None = None
        self._budget: EventBudget | None = None
        self._sharing_task: asyncio.Task[None] | None = None
        # Set when no key is configured and the development secret is in use.
        self.dev_secret_path: Path | None = None
        # The transactional outbox's worker (Stripe pushes...): tests drive it with drain().
        self.outbox: Outbox | None = None
        self.payments_health: PaymentsHealth | None = None
        self._stripe_http: stripe.HTTPXClient | None = None
        self._webhook_sender: WebhookSender | None = None  # outbound webhooks' HTTP client

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
        stripe_key = stripe_api_key(config.stripe_api_key_file, self._environ)
        stripe_settings = StripeSettings(config.stripe_collection_method, config.stripe_days_until_due)
        # Before anything starts, like the key files: a bad schedule or secret file stops the start.
        dunning = DunningSchedule.of_seconds(config.dunning_schedule_seconds)
        webhook_secret = load_webhook_secret(config.stripe_webhook_secret_file, self._environ)
        http_host = config.http_host or config.host
        if self.worker is None:
            # Before PostgreSQL starts, so that a busy port fails fast and leaves nothing behind.
            # A worker's parent has checked it and holds it (server.ports.reserve_port).
            check_port_free(config.host, config.port)
        if config.http_port:
            check_port_free(http_host, config.http_port)
        if self._tracer_provider is None:
            self._tracer_provider = tracer_provider_from_env(os.environ)
            self._owns_tracer_provider = self._tracer_provider is not None
        tracer = None
        if self._tracer_provider is not None:
            tracer = self._tracer_provider.get_tracer(INSTRUMENTATION_NAME)
            self._uninstrument = instrument_queries(self._tracer_provider)
        registry = CollectorRegistry()
        self.metrics = metrics = Metrics(
            registry, resource(), tenant_labels=config.metrics_tenant_labels, files=self._metric_files
        )
        access_log = None
        if config.access_log:
            access_log = AccessLog(self._log_stream or sys.stderr, config.log_format)
        call_telemetry = CallTelemetry(metrics, tracer=tracer, access_log=access_log)
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
        page_tokens = PageTokens(await shared_key(self._pool, PAGE_TOKEN_KEY))
        meters = MeterCatalog(MeterStore(self._pool), rate_card, page_tokens)
        await meters.reload()
        rules = EventRules(
            max_future_micros=config.max_future_seconds * MICROS_PER_SECOND,
            max_age_micros=config.max_event_age_seconds * MICROS_PER_SECOND,
            max_batch_size=config.max_batch_size,
        )
        budget = self._budget = EventBudget(config.max_events_in_flight)
        metrics.watch_events_in_flight(lambda: budget.in_use)
        self._metering = Metering(
            UsageStore(self._pool, self._read_pool),
            rate_card,
            rules,
            self.wall_clock,
            meters,
            limiter=limiter,
            budget=budget,
            # Half the write pool: lanes hold a connection only while writing, and the other
            # half serves invoice generation, rate changes and partition creation.
            write_lanes=max(1, config.pool_size // 2),
            telemetry=IngestTelemetry(metrics, tracer),
        )
        invoices = InvoiceStore(self._pool)
        page_tokens = PageTokens(await shared_key(self._pool, PAGE_TOKEN_KEY))
        billing = Billing(
            rate_store, invoices, AuditStore(self._pool), rate_card, page_tokens, self.wall_clock
        )
        pricer = InvoicePricer(billing.currency)
        issuer = issuer_of(config)
        lifecycle = Lifecycle(
            invoices,
            CreditNoteStore(self._pool),
            pricer,
            issuer,
            page_tokens,
            self.wall_clock,
            Collection(live=stripe_key is not None),
        )
        grace = timedelta(seconds=config.period_close_grace_seconds)
        plans = Plans(PlanStore(invoices), rate_store, page_tokens, self.wall_clock, billing.currency, grace)
        self.periods = Periods(invoices, pricer, lifecycle, self.wall_clock, grace)
        self.payments = payments = PaymentLedger(
            invoices, lifecycle, dunning, OutboxRetryJobs(), self.wall_clock
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
            UsageApi(
                self._metering,
                authenticator,
                call_telemetry,
                Corrections(CorrectionStore(self._pool), meters),
            ),
            tally,
        )
        meter_service_pb2_grpc.add_MeterServiceServicer_to_server(
            MeterApi(meters, authenticator, call_telemetry), tally
        )
        billing_service_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingApi(billing, lifecycle, plans, self.periods, authenticator, call_telemetry), tally
        )
        notification_service_pb2_grpc.add_NotificationServiceServicer_to_server(
            NotificationApi(
                Subscriptions(WebhookStore(self._pool), page_tokens, self.wall_clock),
                authenticator,
                call_telemetry,
            ),
            tally,
        )
        payment_service_pb2_grpc.add_PaymentServiceServicer_to_server(
            PaymentApi(payments, authenticator, call_telemetry), tally
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
        self.payments_health = PaymentsHealth(health_servicer)
        await self.payments_health.serving()
        self._webhook_sender = WebhookSender()
        handlers: dict[str, JobHandler] = {
            DELIVER_JOB: DeliveryHandler(self._webhook_sender, self.wall_clock)
        }
        payer: StripeInvoicePayer | None = None  # simulation mode: dunning retries call nothing
        if stripe_key is None:
            log.info(
                "Stripe: no API key (TALLY_STRIPE_API_KEY or --stripe-api-key-file): simulation mode, "
                "finalized invoices are not sent to Stripe and their payment state is 'simulated'"
            )
        else:
            client, self._stripe_http = stripe_client(stripe_key, config.stripe_api_base)
            push = StripePush(
                client,
                self.wall_clock,
                settings=stripe_settings,
                pacer=RequestPacer(requests_per_second(stripe_key)),
                on_auth_failure=self.payments_health.refused,
                attempts=payments,
            )
            handlers.update(push.handlers())
            payer = StripeInvoicePayer(client)
        handlers[RETRY_KIND] = retry_handler(payments, payer, self.payments_health.refused)
        self.outbox = Outbox(
            self._pool,
            handlers,
            self.wall_clock,
            poll_seconds=config.outbox_interval_seconds or 1.0,
            observe=metrics.count_outbox_step,
        )
        address = f"{config.host}:{config.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        await server.start()
        self._server = server
        with suppress_instrumentation():  # the probe's queries are not traces of their own
            self._health_task = asyncio.create_task(self._health.run(), name="tally-health")
            self._folding_task = asyncio.create_task(Folder(self._pool).run(), name="tally-folding")
            self._backfill_task = asyncio.create_task(
                MeterBackfiller(self._pool).run(), name="tally-meter-backfill"
            )
        if access_log is not None:
            self._access_log_task = asyncio.create_task(access_log.run(), name="tally-access-log")
        if self._metric_files is not None:
            self._gauge_task = asyncio.create_task(_publish_gauges(metrics), name="tally-metric-gauges")
        if config.http_port is not None:
            read_pool = self._read_pool
            health = self._health
            figures = DatabaseFigures(lambda: read_figures(read_pool, timeout_seconds=2.0))
            figures.register(metrics.meter)
            self._http = HttpListener(registry, lambda: health.serving, figures)
            if webhook_secret is not None:
                wall_clock = self.wall_clock
                StripeWebhookEndpoint(
                    webhook_secret, payments, lambda: wall_clock() / 1e6, count=metrics.count_stripe_webhook
                ).mount(self._http.app)
            else:
                log.info("no Stripe webhook secret configured: POST /webhooks/stripe is not served")
            await self._http.start(http_host, config.http_port)
            self.http_port = self._http.port
        # A process without limits has nothing to settle, and no business judging (on its own
        # clock) which of the other processes' shared rows are stale.
        if config.limit_sync_seconds > 0 and not limiter.unlimited:
            sharing = LimitSharing(limiter, SharedLimitStore(self._pool), interval=config.limit_sync_seconds)
            self._sharing_task = asyncio.create_task(sharing.run(), name="tally-shared-limits")
        if config.period_close_interval_seconds > 0:
            self._scheduler = CloseScheduler(self.periods, config.period_close_interval_seconds)
            self._scheduler.start()
        if (
            webhook_secret is not None and config.http_port is None and self.worker is None
        ):  # a parent warns for its workers
            log.warning("a Stripe webhook secret is configured but no --http-port: no webhook is received")
        if config.outbox_interval_seconds > 0 and handlers:
            self.outbox.start()

    @property
    def events_in_flight(self) -> int:
        """Streamed events read and not yet answered, over all streams (see metering.pipeline)."""
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
        for task in (
            self._health_task,
            self._sharing_task,
            self._folding_task,
            self._backfill_task,
            self._gauge_task,
        ):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    # A task that had died must not stop the shutdown before the pools close.
                    log.exception("background task %s had failed", task.get_name())
        if self._scheduler is not None:
            # Bounded: a close in progress may finish (it is one transaction), then the task ends.
            await self._scheduler.stop(self.config.grace_seconds)
        if self.outbox is not None:
            # Bounded: steps under way get the grace period, then roll back whole (resumed later).
            await self.outbox.stop(self.config.grace_seconds)
        if self.payments_health is not None:
            await self.payments_health.stopping()
        if self._health is not None:
            await self._health.set_all(False)
        if self._server is not None:
            await self._server.stop(self.config.grace_seconds)
        if self._webhook_sender is not None:  # after the outbox: no POST is under way
            await self._webhook_sender.close()
        if self._metering is not None:
            try:
                async with asyncio.timeout(drain_seconds):
                    await self._metering.drain()
            except TimeoutError:
                log.warning("writes still in flight %g s into shutdown: closing anyway", drain_seconds)
        if self._http is not None:  # answered 503 on /readyz while the calls drained
            await self._http.stop()
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                await _close(pool, close_seconds)
        if self._stripe_http is not None:
            await self._stripe_http.close_async()  # type: ignore[no-untyped-call]
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        await self._stop_telemetry()

    async def _stop_telemetry(self) -> None:
        if self._access_log_task is not None:  # writes the last lines
            self._access_log_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._access_log_task
        if self.metrics is not None:
            self.metrics.shutdown()
        if self._uninstrument is not None:
            self._uninstrument()
            self._uninstrument = None
        if self._owns_tracer_provider and self._tracer_provider is not None:
            self._tracer_provider.shutdown()  # exports the spans still queued

    async def wait_for_termination(self) -> None:
        """Wait until the gRPC server has stopped; start() must have been called."""
        assert self._server is not None
        await self._server.wait_for_termination()
