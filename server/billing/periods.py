"""Billing periods: the live preview, closing a period (ClosePeriod), and the scheduler that closes them.

Closing a tenant's period generates its invoice and finalizes it in one transaction,
which also moves the profile's `closed_until` to the period's end and sets when the next
close is due (that period's end plus the grace period). The tenant's invoice lock and
the profile row make it exactly once: the scheduler only tries the lock (another process
closing the same tenant makes it skip the tenant) and then checks, under the lock, that
the close is still due, so two `tally serve` processes on one database never close a
period twice, and a period closed by ClosePeriod is not closed again. The scheduler closes
tenants a block per transaction (server.billing.closing) under the same locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from server.billing.closing import BlockClose, close_block
from server.billing.lifecycle import Lifecycle
from server.billing.pricer import InvoicePricer, PricedInvoice
from server.domain.access import Caller, Principal
from server.domain.audit import AuditAction, AuditEntry, invoice_state
from server.domain.decimals import MINOR_UNITS, format_money, format_quantity
from server.domain.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TallyError,
    Unavailable,
)
from server.domain.events import check_id
from server.domain.models import Invoice, InvoiceKind, InvoiceStatus
from server.domain.names import invoice_name
from server.domain.plans import BillingPeriod, anchor_period, billing_period
from server.domain.requests import Once, Replayed
from server.domain.stores import BillingTransaction, InvoiceBook
from server.domain.timeutil import MICROS_PER_HOUR, to_datetime
from server.domain.webhooks import THRESHOLD_CROSSED, rfc3339

log = logging.getLogger(__name__)

# The principal named in the audit trail for the scheduler's closes.
SCHEDULER = "tally-period-close"


def profile_missing(tenant_id: str) -> NotFound:
    """NotFound (BILLING_PROFILE_NOT_FOUND): the tenant has no profile, so no periods to bill."""
    return NotFound(
        "the tenant has no billing profile (SetBillingProfile creates one)",
        reason=ErrorReason.BILLING_PROFILE_NOT_FOUND,
    )


class Periods:
    """The live preview of the open period, and closing periods, by ClosePeriod or when due.

    A close is due `grace` after its period ends, so late usage still reaches its invoice.
    """

    def __init__(
        self,
        invoices: InvoiceBook,
        pricer: InvoicePricer,
        lifecycle: Lifecycle,
        now_micros: Callable[[], int],
        grace: timedelta,
    ) -> None:
        self._invoices = invoices
        self._pricer = pricer
        self._lifecycle = lifecycle
        self._now_micros = now_micros
        self.grace = grace

    async def preview(self, tenant_id: str, principal: Principal) -> Invoice:
        """PreviewInvoice: the open period priced now, not stored (a tenant without profile: this month)."""
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("parent", problem)
        principal.require_tenant(tenant_id)
        now = to_datetime(self._now_micros())

        async def work(tx: BillingTransaction) -> tuple[datetime, datetime, PricedInvoice]:
            found = await tx.profile(tenant_id)
            if found is None:
                start, end = anchor_period(1, now)
            else:
                profile = found[0]
                period = billing_period(
                    profile.anchor_day, profile.billing_start, max(now, profile.closed_until)
                )
                start, end = period.start, period.end
            return start, end, await self._pricer.price(tx, tenant_id, start, end)

        start, end, priced = await self._invoices.run_read(work)
        return dataclasses.replace(
            priced.draft(tenant_id, start, end, InvoiceKind.FINAL, now), id=""
        )  # not stored

    async def close_in(
        self, tx: BillingTransaction, tenant_id: str, caller: Caller, due_by: datetime | None
    ) -> Invoice | None:
        """Close the tenant's oldest open period in `tx` (holding the tenant's lock).

        With `due_by`, only if its close is due by then (the scheduler); None if not due.
        """
        found = await tx.profile(tenant_id, lock=True)
        if found is None:
            raise profile_missing(tenant_id)
        profile = found[0]
        if due_by is not None and profile.next_close_time is not None and profile.next_close_time > due_by:
            return None
        period = billing_period(profile.anchor_day, profile.billing_start, profile.closed_until)
        # The cursor first: finalizing (last) holds the numbering sequence until the commit.
        following = billing_period(profile.anchor_day, profile.billing_start, period.end)
        await tx.mark_closed(tenant_id, period.end, following.end + self.grace)
        invoice: Invoice | None = None
        for other_id, other_start, other_end, status in await tx.overlapping(
            tenant_id, period.start, period.end
        ):
            if (other_start, other_end) != (period.start, period.end):
                raise FailedPrecondition(
                    f"the period overlaps invoice {other_id} "
                    f"[{other_start.isoformat()}, {other_end.isoformat()}) of this tenant",
                    reason=ErrorReason.INVOICE_PERIOD_OVERLAP,
                    metadata={"invoice": invoice_name(tenant_id, other_id)},
                )
            invoice = await tx.lock(other_id)
            assert invoice is not None
            if status is InvoiceStatus.DRAFT:
                invoice = await self._lifecycle.finalize_in(tx, invoice, caller)
        if invoice is None:
            priced = await self._pricer.price(tx, tenant_id, period.start, period.end, found)
            at = to_datetime(self._now_micros())
            draft = await _save_draft(tx, tenant_id, period, priced, InvoiceKind.FINAL, at)
            await tx.append_audit(
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=AuditAction.INVOICE_CREATED,
                    tenant_id=tenant_id,
                    resource=f"invoices/{draft.id}",
                    before=None,
                    after=invoice_state(draft),
                )
            )
            invoice = await self._lifecycle.finalize_in(tx, draft, caller, priced)
        return invoice

    async def close_period(
        self, tenant_id: str, caller: Caller, once: Once[Invoice] | None = None
    ) -> Invoice | Replayed:
        """ClosePeriod: close the tenant's oldest open period now, even before it ends."""
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("parent", problem)
        caller.principal.require_tenant(tenant_id)

        async def work(tx: BillingTransaction) -> Invoice | Replayed:
            if once is not None and (stored := await tx.claim(once.key)) is not None:
                return Replayed(stored)
            invoice = await self.close_in(tx, tenant_id, caller, None)
            assert invoice is not None
            if once is not None:
                await tx.complete(once.key, once.encode(invoice))
            return invoice

        return await self._invoices.run_in_tenant_transaction(tenant_id, work)

    async def close_due(self, *, batch: int = 500, blocks: int = 2, workers: int = 4) -> int:
        """Close every period whose close is due now (period end + grace); the number closed.

        Tenants are closed `batch` at a time, one transaction per block, `blocks` blocks in
        flight (server.billing.closing: while PostgreSQL writes one block, this process
        prices the next); the few a block hands back (an invoice already over the period,
        usage without a rate) are closed one transaction each, `workers` at a time. A
        tenant whose close fails is logged and tried again an hour later. A block that runs
        out of its time bound (e.g. tenants with long histories on a loaded machine) is
        tried again with a quarter of the tenants.
        """
        now = to_datetime(self._now_micros())
        caller = Caller(scheduler_principal(), f"close-{uuid.uuid4().hex[:12]}")
        gate = asyncio.Semaphore(workers)

        async def close_one(tenant_id: str) -> int:
            async with gate:
                return await self._close_one(tenant_id, caller, now)

        async def close_blocks() -> int:
            closed, size = 0, batch
            while True:
                claimed: list[str] = []
                try:
                    block = await self._invoices.run_in_due_block(
                        now, size, functools.partial(self._close_block, now, caller, claimed)
                    )
                except Unavailable as exc:
                    if size == 1 or not isinstance(exc.__cause__, TimeoutError):
                        raise
                    # The block ran out of its time (rolled back whole): a smaller one fits,
                    # or at worst one tenant at a time, so the closes still get done.
                    size = max(1, size // 4)
                    log.warning("period close of a block ran out of time: %d tenants a block now", size)
                    continue
                except TallyError as exc:
                    # Something failed the block whole: close its tenants one by one, so that
                    # the one at fault is postponed and the others are closed.
                    log.warning("period close of a block of %d tenants failed: %s", len(claimed), exc.message)
                    block = BlockClose([], claimed)
                if not claimed:
                    return closed  # none due, or the rest is being closed by another process
                results = await asyncio.gather(*(close_one(t) for t in block.left))
                progress = len(block.closed) + sum(results)
                closed += progress
                if progress == 0:
                    return closed  # the rest is being closed by another process, or postponed

        return sum(await asyncio.gather(*(close_blocks() for _ in range(blocks))))

    async def _close_block(
        self, now: datetime, caller: Caller, claimed: list[str], tx: BillingTransaction, tenants: list[str]
    ) -> BlockClose:
        claimed[:] = tenants
        if not tenants:
            return BlockClose([], [])
        at = to_datetime(self._now_micros())
        return await close_block(tx, tenants, self._pricer, self._lifecycle, caller, at, self.grace)

    async def bill_thresholds(self) -> int:
        """Spend thresholds: an interim invoice for each tenant whose open period has passed its threshold.

        The open period's amount not yet billed (priced now, minus what its interim invoices
        billed) is compared with the profile's threshold; when it reaches it, an interim
        invoice for that amount is finalized, under the tenant's lock. Checked every round
        of the scheduler, so an interim invoice follows the crossing within one interval.
        Returns the number of interim invoices made.
        """
        now = to_datetime(self._now_micros())
        caller = Caller(scheduler_principal(), f"threshold-{uuid.uuid4().hex[:12]}")
        billed = 0
        for tenant_id in await self._invoices.with_threshold():
            try:
                billed += await self._invoices.run_if_tenant_free(
                    tenant_id, functools.partial(self._bill_threshold, tenant_id, caller, now)
                )
            except TallyError as exc:
                log.warning("interim invoice of tenant %r failed: %s", tenant_id, exc.message)
        return billed

    async def _bill_threshold(
        self, tenant_id: str, caller: Caller, now: datetime, tx: BillingTransaction | None
    ) -> int:
        if tx is None:
            return 0
        found = await tx.profile(tenant_id)
        if found is None or (threshold := found[0].spend_threshold) is None:
            return 0
        profile = found[0]
        period = billing_period(profile.anchor_day, profile.billing_start, max(now, profile.closed_until))
        priced = await self._pricer.price(tx, tenant_id, period.start, period.end, found)
        if priced.unpriced or priced.amounts.total < threshold:
            return 0
        draft = await _save_draft(tx, tenant_id, period, priced, InvoiceKind.INTERIM, now)
        invoice_id, amounts = draft.id, priced.amounts
        # Before the invoice's own invoice.finalized: the crossing is what made it.
        crossed = {
            "tenant_id": tenant_id,
            "spend_threshold": format_quantity(threshold),
            "amount": format_money(amounts.total, MINOR_UNITS.get(priced.currency, 2)),
            "currency_code": priced.currency,
            "period_start_time": rfc3339(period.start),
            "period_end_time": rfc3339(period.end),
            "invoice": invoice_name(tenant_id, invoice_id),
        }
        await tx.publish(THRESHOLD_CROSSED, crossed, time=now)
        await self._lifecycle.finalize_in(tx, draft, caller, priced)
        return 1

    async def _close_one(self, tenant_id: str, caller: Caller, now: datetime) -> int:
        async def work(tx: BillingTransaction | None) -> int:
            if tx is None:
                return 0  # another process is closing it; it will be done there
            return 0 if await self.close_in(tx, tenant_id, caller, now) is None else 1

        try:
            return await self._invoices.run_if_tenant_free(tenant_id, work)
        except TallyError as exc:
            log.warning("period close of tenant %r failed, retried in an hour: %s", tenant_id, exc.message)
            retry_at = now + timedelta(microseconds=MICROS_PER_HOUR)

            async def postpone(tx: BillingTransaction) -> None:
                await tx.postpone_close(tenant_id, retry_at)

            await self._invoices.run_in_transaction(postpone)
            return 0


async def _save_draft(
    tx: BillingTransaction,
    tenant_id: str,
    period: BillingPeriod,
    priced: PricedInvoice,
    kind: InvoiceKind,
    at: datetime,
) -> Invoice:
    """Store the priced period as a new draft invoice of `kind`; the draft, as finalize_in takes it."""
    draft = priced.draft(tenant_id, period.start, period.end, kind, at)
    await tx.save(
        draft.id,
        tenant_id,
        draft.period_start,
        draft.period_end,
        draft.currency,
        draft.total,
        draft.lines,
        kind,
    )
    return draft


def scheduler_principal() -> Principal:
    """The scheduler's own principal: all tenants, no scopes (it calls no RPC)."""
    return Principal(subject=SCHEDULER, tenants="all", scopes=frozenset())


class CloseScheduler:
    """The task that closes due periods every `interval_seconds`; stop() ends it within one close."""

    def __init__(self, periods: Periods, interval_seconds: float) -> None:
        self._periods = periods
        self._interval = interval_seconds
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background task; it runs until stop()."""
        self._task = asyncio.create_task(self._run(), name="tally-period-close")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._periods.close_due()
                await self._periods.bill_thresholds()
            except TallyError as exc:  # the database is down: try again next round
                log.warning("period close round failed: %s", exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def stop(self, timeout_seconds: float) -> None:
        """Stop: let the close in progress finish (bounded by `timeout_seconds`), then cancel."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_seconds)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
