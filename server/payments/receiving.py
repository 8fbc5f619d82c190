"""POST /webhooks/stripe where no TallyServer runs: the parent of `tally serve --workers N`.

With workers the parent owns the one HTTP listener (server.telemetry.workers), so Stripe's
deliveries arrive there. The parent builds what applying them needs (the payment ledger, the
invoice lifecycle's status moves, the dunning schedule) from the configuration and a small
pool of its own; the retries it schedules are outbox jobs, which the workers run. Nothing
here imports gRPC (server.supervisor keeps the parent free of it).
"""

from __future__ import annotations

import time

import asyncpg
from aiohttp import web

from server.billing.lifecycle import Lifecycle
from server.billing.pricer import InvoicePricer
from server.config import Config, issuer_of
from server.domain.pagination import PageTokens
from server.payments.dunning import DunningSchedule
from server.payments.endpoint import StripeWebhookEndpoint
from server.payments.ledger import PaymentLedger
from server.payments.retries import OutboxRetryJobs
from server.storage.credit_notes import CreditNoteStore
from server.storage.database import create_pool
from server.storage.invoices import InvoiceStore
from server.storage.shared_keys import PAGE_TOKEN_KEY, shared_key
from server.telemetry.metrics import STRIPE_WEBHOOKS
from server.telemetry.multiprocess import MetricFiles, MetricsDirectory

# Deliveries are few (one per payment event) and each is one short transaction.
POOL_SIZE = 4


def _wall_micros() -> int:
    return time.time_ns() // 1_000


class ParentWebhooks:
    """The Stripe webhook endpoint mounted on the parent's listener; close() after the listener stops."""

    def __init__(self, config: Config, secret: str) -> None:
        self._config = config
        self._secret = secret
        self._pool: asyncpg.Pool | None = None
        self._files: MetricFiles | None = None

    async def mount(self, app: web.Application, dsn: str, metrics: MetricsDirectory) -> None:
        """Open the pool, build the ledger and add the route to `app` (before the listener starts).

        Each answer is counted in the parent's own metrics file, summed on /metrics with the
        workers' (one `tally_stripe_webhooks_total` series per outcome).
        """
        config = self._config
        self._files = MetricFiles(metrics.path, "parent")
        counts = self._files.counter("tally_stripe_webhooks", STRIPE_WEBHOOKS, ("outcome",))
        self._pool = pool = await create_pool(dsn, min_size=1, max_size=POOL_SIZE)
        invoices = InvoiceStore(pool)
        issuer = issuer_of(config)
        # The ledger only moves statuses (Lifecycle.move_in); pricing never runs here.
        lifecycle = Lifecycle(
            invoices,
            CreditNoteStore(pool),
            InvoicePricer("USD"),
            issuer,
            PageTokens(await shared_key(pool, PAGE_TOKEN_KEY)),
            _wall_micros,
        )
        ledger = PaymentLedger(
            invoices,
            lifecycle,
            DunningSchedule.of_seconds(config.dunning_schedule_seconds),
            OutboxRetryJobs(),
            _wall_micros,
        )

        def count(outcome: str) -> None:
            counts[(outcome,)] += 1

        StripeWebhookEndpoint(self._secret, ledger, time.time, count=count).mount(app)

    async def close(self) -> None:
        """Close the pool (in-flight deliveries have ended with the listener)."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._files is not None:
            self._files.close()
            self._files = None
