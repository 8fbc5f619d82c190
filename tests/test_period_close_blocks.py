"""The period-close task closes tenants in blocks (server.billing.closing): same invoices, same guarantees.

Each case is set up twice, on twin tenants: one twin is closed by ClosePeriod's path (one
tenant per transaction), the other by the scheduler's blocks, and their invoices must be
the same line for line. A crash inside a block (after its writes and numbers, before its
commit) must leave nothing of that block, and a re-run must close every tenant once,
with no gap in the numbers.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from server.app import TallyServer
from server.billing.lifecycle import Lifecycle
from server.billing.periods import Periods, scheduler_principal
from server.billing.pricer import InvoicePricer
from server.config import Config
from server.domain.access import Caller
from server.domain.audit import AuditAction
from server.domain.lifecycle import Issuer, expand_prefix
from server.domain.pagination import PageTokens
from server.payments.collection import Collection
from server.storage.credit_notes import CreditNoteStore
from server.storage.invoices import InvoiceStore, InvoiceTransaction
from tally.v1 import billing_service_pb2, resources_pb2, usage_service_pb2
from tests.billing_helpers import create_plan, flat_fee, graduated_api_charge, per_unit, set_profile, uploads
from tests.conftest import new_tenant
from tests.helpers import event, hour_start, ts
from tests.test_period_close import close, fake_clock

R = resources_pb2


def next_anchor_day() -> int:
    """Tomorrow's day of the month (or 1): the period that began before now ends within a day."""
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    return tomorrow.day if tomorrow.day <= 28 else 1


async def next_close(db: asyncpg.Pool, tenant: str) -> datetime:
    found: datetime = await db.fetchval(
        "SELECT next_close_time FROM billing_profiles WHERE tenant_id = $1", tenant
    )
    return found


async def invoices_of(db: asyncpg.Pool, tenant: str) -> list[tuple[Any, ...]]:
    """Everything an invoice says but its id and number, its lines included, in period order."""
    rows = await db.fetch(
        "SELECT id, kind, status, period_start, period_end, currency, total, plan_ids,"
        " parties->'customer' AS customer FROM invoices WHERE tenant_id = $1"
        " ORDER BY period_start, kind, finalize_time",
        tenant,
    )
    found = []
    for row in rows:
        lines = await db.fetch(
            "SELECT service, usage_type, quantity, unit_price, amount, event_count, kind, charge_key,"
            " period_start, period_end, tiers::text FROM invoice_line_items WHERE invoice_id = $1"
            " ORDER BY position",
            row["id"],
        )
        customer = row["customer"].replace(tenant, "<tenant>") if row["customer"] else None
        found.append((*tuple(row)[1:-1], customer, [tuple(line) for line in lines]))
    return found


Setup = Callable[[str], Awaitable[None]]


async def test_blocks_price_every_case_as_a_single_close(
    server_config: Config,
    tally: TallyServer,
    usage: Any,
    billing: Any,
    db: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    anchor, start = next_anchor_day(), hour_start(-30)
    graduated = await create_plan(billing, [graduated_api_charge(), flat_fee("10")], minimum_amount="20")
    small = await create_plan(billing, [per_unit("uploads", "wpk_upload", "1"), flat_fee("72")])
    large = await create_plan(billing, [per_unit("uploads", "wpk_upload", "0.5"), flat_fee("144")])

    async def profile(tenant: str, **fields: Any) -> None:
        await set_profile(billing, tenant, billing_anchor_day=anchor, billing_start_time=ts(start), **fields)

    async def rate_card(tenant: str) -> None:
        await profile(tenant)
        await uploads(usage, tenant, "7", hour_start(-20))
        await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(
                event=event(
                    tenant, service="analytics", usage_type="report", quantity="3", time=hour_start(-3)
                )
            )
        )

    async def plan_with_minimum_and_tax(tenant: str) -> None:
        await profile(tenant, plan=graduated.name, tax_percentage="20")
        await uploads(usage, tenant, "90", hour_start(-20))

    async def interim_invoice(tenant: str) -> None:
        await profile(tenant, plan=graduated.name, spend_threshold="8")
        await uploads(usage, tenant, "90", hour_start(-20))  # 9.00 and a part of the fee: over 8

    async def plan_change(tenant: str) -> None:
        await profile(tenant, plan=small.name)
        await uploads(usage, tenant, "4", hour_start(-20))
        await uploads(usage, tenant, "4", hour_start(-2))
        await set_profile(billing, tenant, plan=large.name, plan_effective_time=ts(hour_start(-10)))

    async def draft_over_the_period(tenant: str) -> None:
        await profile(tenant)
        await uploads(usage, tenant, "5", hour_start(-20))
        period = (await close_bounds(db, tenant))[0]
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}", period_start_time=ts(period[0]), period_end_time=ts(period[1])
            )
        )
        await uploads(usage, tenant, "2", hour_start(-3))  # after the draft: the close prices it again

    async def late_usage(tenant: str) -> None:
        await profile(tenant, plan=graduated.name)
        await uploads(usage, tenant, "90", hour_start(-20))
        await close(billing, tenant)  # the first period closed early: 9.00 + 10.00, +1.00 to the minimum
        await uploads(usage, tenant, "20", hour_start(-10))  # late: the next invoice adjusts by +1.50

    cases: dict[str, Setup] = {
        "rate_card": rate_card,
        "plan_with_minimum_and_tax": plan_with_minimum_and_tax,
        "interim_invoice": interim_invoice,
        "plan_change": plan_change,
        "draft_over_the_period": draft_over_the_period,
        "late_usage": late_usage,
    }
    twins = {name: (new_tenant(), new_tenant()) for name in cases}
    for name, setup in cases.items():
        for tenant in twins[name]:
            await setup(tenant)
    assert tally.periods is not None
    await tally.periods.bill_thresholds()  # the interim invoices, at the real time
    for tenant in twins["interim_invoice"]:
        await uploads(usage, tenant, "30", hour_start(-3))  # 120 uploads: 11.00, 2.00 more

    # When every twin's periods so far are due (the late-usage twins' next one ends a month on).
    due = max([await next_close(db, t) for pair in twins.values() for t in pair]) + timedelta(minutes=1)
    _, clock = fake_clock(due)
    server = TallyServer(
        dataclasses.replace(server_config, period_close_interval_seconds=0), wall_clock=clock
    )
    await server.start()
    try:
        periods = server.periods
        assert periods is not None
        caller = Caller(scheduler_principal(), "one-by-one")
        for one_by_one, _ in twins.values():
            while await next_close(db, one_by_one) <= due:
                await periods.close_period(one_by_one, caller)
        handed_back: list[str] = []
        close_one = periods._close_one

        async def recording(tenant: str, caller: Caller, at: datetime) -> int:
            handed_back.append(tenant)
            return await close_one(tenant, caller, at)

        monkeypatch.setattr(periods, "_close_one", recording)
        await periods.close_due()
    finally:
        await server.stop()

    in_blocks = {pair[1] for pair in twins.values()}
    # Only the draft's twin needs the single close (its draft is finalized, not a new invoice).
    assert in_blocks.intersection(handed_back) == {twins["draft_over_the_period"][1]}
    for name, (one_by_one, in_block) in twins.items():
        assert await invoices_of(db, in_block) == await invoices_of(db, one_by_one), name
        assert await next_close(db, in_block) == await next_close(db, one_by_one) > due, name

    async def totals(tenant: str) -> list[asyncpg.Record]:
        return await db.fetch(
            "SELECT kind, status, total FROM invoices WHERE tenant_id = $1 ORDER BY period_start, kind",
            tenant,
        )

    block_twin = {name: pair[1] for name, pair in twins.items()}
    # The first periods are partial (fees and minimums prorated by the hour); the second
    # ones are whole. A whole period without usage: fee 10.00, 10.00 up to the minimum of
    # 20.00, tax 20%: 24.00.
    assert [r["total"] for r in await totals(block_twin["plan_with_minimum_and_tax"])][1] == Decimal("24.00")
    # The period cost 11.00 and its share of the fee; the interim invoice billed all but 2.00.
    assert next((r["kind"], r["total"]) for r in await totals(block_twin["interim_invoice"])) == (
        "final",
        Decimal("2.00"),
    )
    # The late 20 uploads: 110 cost 10.50, 9.00 was billed: +1.50 beside the whole period's 20.00.
    assert [r["total"] for r in await totals(block_twin["late_usage"])][1] == Decimal("21.50")


async def close_bounds(db: asyncpg.Pool, tenant: str) -> list[tuple[datetime, datetime]]:
    """The tenant's first open period, [closed_until, next_close_time - grace) with grace 1 h."""
    row = await db.fetchrow(
        "SELECT closed_until, next_close_time FROM billing_profiles WHERE tenant_id = $1", tenant
    )
    return [(row["closed_until"], row["next_close_time"] - timedelta(hours=1))]


class Crash(Exception):
    """The process dies here: nothing after it runs, the transaction is never committed."""


class CrashingInvoices(InvoiceStore):
    """An InvoiceStore whose `crash_in`-th block dies after its writes and numbers, before its commit."""

    def __init__(self, pool: asyncpg.Pool, crash_in: int) -> None:
        super().__init__(pool)
        self.blocks = 0
        self.crash_in = crash_in

    @asynccontextmanager
    async def due_block_transaction(
        self, now: datetime, limit: int
    ) -> AsyncIterator[tuple[InvoiceTransaction, list[str]]]:
        async with super().due_block_transaction(now, limit) as (tx, tenants):
            yield tx, tenants
            self.blocks += 1
            if self.blocks == self.crash_in:
                raise Crash


async def test_crash_inside_a_block_then_rerun_closes_each_tenant_once_without_gaps(
    server_config: Config, usage: Any, billing: Any, db: asyncpg.Pool
) -> None:
    tenants = sorted(new_tenant() for _ in range(7))
    for i, tenant in enumerate(tenants):
        await set_profile(
            billing, tenant, billing_anchor_day=next_anchor_day(), billing_start_time=ts(hour_start(-30))
        )
        await uploads(usage, tenant, str(i + 1), hour_start(-2))
    due = max([await next_close(db, t) for t in tenants]) + timedelta(minutes=1)
    now, clock = fake_clock(due)
    issuer = Issuer(name=server_config.issuer_name, invoice_prefix=server_config.invoice_number_prefix)
    store = CrashingInvoices(db, crash_in=2)
    pricer = InvoicePricer("USD")
    lifecycle = Lifecycle(store, CreditNoteStore(db), pricer, issuer, PageTokens(b"k" * 32), clock)
    crashing = Periods(store, pricer, lifecycle, clock, timedelta(hours=1))

    with pytest.raises(Crash):
        await crashing.close_due(batch=3, blocks=1)

    written = await db.fetch("SELECT tenant_id, status FROM invoices WHERE tenant_id = ANY($1)", tenants)
    assert {r["status"] for r in written} <= {"finalized"}  # no draft of the dead block is left
    assert len(written) < len(tenants)  # the dead block's tenants are not closed
    assert store.blocks == 2

    server = TallyServer(
        dataclasses.replace(server_config, period_close_interval_seconds=0), wall_clock=clock
    )
    await server.start()
    try:
        assert server.periods is not None
        await server.periods.close_due(batch=3)
        await server.periods.close_due(batch=3)  # nothing is due any more: closes nothing
    finally:
        await server.stop()

    rows = await db.fetch(
        "SELECT id, tenant_id, status, total, number FROM invoices WHERE tenant_id = ANY($1)"
        " ORDER BY tenant_id",
        tenants,
    )
    assert [r["tenant_id"] for r in rows] == tenants  # one invoice each
    assert {r["status"] for r in rows} == {"finalized"}
    assert [r["total"] for r in rows] == [Decimal(i + 1) / 10 for i in range(len(tenants))]
    # Every number of the sequence belongs to exactly one invoice: the dead block gave its back.
    prefix = expand_prefix(issuer.invoice_prefix, datetime.fromtimestamp(now[0] / 1e6, UTC))
    last = await db.fetchval(
        "SELECT last_number FROM document_sequences WHERE issuer = $1 AND prefix = $2", issuer.name, prefix
    )
    numbers = await db.fetch(
        "SELECT number FROM invoices WHERE issuer = $1 AND number LIKE $2 || '%'", issuer.name, prefix
    )
    assert sorted(int(r["number"].removeprefix(prefix)) for r in numbers) == list(range(1, last + 1))
    # Each invoice audited once as created and once as finalized, with its number.
    audited = await db.fetch(
        "SELECT resource, action, after->>'number' AS number FROM audit_events"
        " WHERE tenant_id = ANY($1) AND resource LIKE 'invoices/%' ORDER BY id",
        tenants,
    )
    assert sorted((a["resource"], a["action"], a["number"]) for a in audited) == sorted(
        [(f"invoices/{r['id']}", AuditAction.INVOICE_CREATED, None) for r in rows]
        + [(f"invoices/{r['id']}", AuditAction.INVOICE_FINALIZED, r["number"]) for r in rows]
    )


class SlowInvoices(InvoiceStore):
    """An InvoiceStore whose blocks of more than `fits` tenants run out of time."""

    def __init__(self, pool: asyncpg.Pool, fits: int) -> None:
        super().__init__(pool)
        self.fits = fits
        self.sizes: list[int] = []

    @asynccontextmanager
    async def due_block_transaction(
        self, now: datetime, limit: int
    ) -> AsyncIterator[tuple[InvoiceTransaction, list[str]]]:
        async with super().due_block_transaction(now, limit) as (tx, tenants):
            self.sizes.append(limit)
            if len(tenants) > self.fits:
                raise TimeoutError  # as asyncio.timeout raises it when an attempt runs out
            yield tx, tenants


async def test_block_that_runs_out_of_time_is_closed_in_smaller_blocks(
    server_config: Config, usage: Any, billing: Any, db: asyncpg.Pool
) -> None:
    tenants = sorted(new_tenant() for _ in range(5))
    for tenant in tenants:
        await set_profile(
            billing, tenant, billing_anchor_day=next_anchor_day(), billing_start_time=ts(hour_start(-30))
        )
        await uploads(usage, tenant, "3", hour_start(-2))
    due = max([await next_close(db, t) for t in tenants]) + timedelta(minutes=1)
    _, clock = fake_clock(due)
    issuer = Issuer(name=server_config.issuer_name, invoice_prefix=server_config.invoice_number_prefix)
    store = SlowInvoices(db, fits=2)
    pricer = InvoicePricer("USD")
    lifecycle = Lifecycle(store, CreditNoteStore(db), pricer, issuer, PageTokens(b"k" * 32), clock)
    periods = Periods(store, pricer, lifecycle, clock, timedelta(hours=1))

    assert await periods.close_due(batch=8, blocks=1) >= len(tenants)

    assert store.sizes[:2] == [8, 2]  # the block of 8 ran out of time, blocks of 2 fit
    rows = await db.fetch("SELECT tenant_id, status, total FROM invoices WHERE tenant_id = ANY($1)", tenants)
    assert sorted((r["tenant_id"], r["status"], r["total"]) for r in rows) == [
        (t, "finalized", Decimal("0.30")) for t in tenants
    ]


async def test_block_close_records_payments_queues_stripe_pushes_and_publishes_finalized(
    server_config: Config, usage: Any, billing: Any, db: asyncpg.Pool
) -> None:
    tenants = sorted(new_tenant() for _ in range(4))
    for i, tenant in enumerate(tenants):
        await set_profile(
            billing, tenant, billing_anchor_day=next_anchor_day(), billing_start_time=ts(hour_start(-30))
        )
        await uploads(usage, tenant, str(i + 1), hour_start(-2))
    due = max([await next_close(db, t) for t in tenants]) + timedelta(minutes=1)
    _, clock = fake_clock(due)
    issuer = Issuer(name=server_config.issuer_name, invoice_prefix=server_config.invoice_number_prefix)
    store = InvoiceStore(db)
    pricer = InvoicePricer("USD")
    live = Collection(live=True)  # as with a Stripe key
    lifecycle = Lifecycle(store, CreditNoteStore(db), pricer, issuer, PageTokens(b"k" * 32), clock, live)
    periods = Periods(store, pricer, lifecycle, clock, timedelta(hours=1))
    subscription = f"ws_{uuid.uuid4().hex}"
    await db.execute(
        "INSERT INTO webhook_subscriptions (id, url, secret, event_types, create_time)"
        " VALUES ($1, 'http://127.0.0.1:9/none', 'secret-0123456789abcdef', $2, now())",
        subscription,
        ["invoice.finalized"],
    )
    try:
        await periods.close_due(batch=8, blocks=1)
    finally:
        await db.execute("DELETE FROM webhook_subscriptions WHERE id = $1", subscription)
    invoices = await db.fetch(
        "SELECT i.id, i.tenant_id, i.number, p.state FROM invoices i"
        " JOIN invoice_payments p ON p.invoice_id = i.id WHERE i.tenant_id = ANY($1) ORDER BY i.tenant_id",
        tenants,
    )
    ids = [r["id"] for r in invoices]
    # The session server runs no Stripe handler; no other test may see these jobs as theirs.
    jobs = await db.fetch(
        "UPDATE outbox_jobs SET state = 'stopped' WHERE kind = 'stripe.invoice' AND subject = ANY($1)"
        " RETURNING subject",
        ids,
    )
    assert [r["tenant_id"] for r in invoices] == tenants  # each closed, each with a payment record
    assert {r["state"] for r in invoices} == {"pending"}
    assert sorted(r["subject"] for r in jobs) == sorted(ids)  # one push job per invoice
    published = await db.fetch(
        "SELECT data->>'invoice' AS invoice, data->>'number' AS number FROM webhook_events"
        " WHERE type = 'invoice.finalized' AND data->>'tenant_id' = ANY($1)",
        tenants,
    )
    assert sorted((p["invoice"], p["number"]) for p in published) == sorted(
        (f"tenants/{r['tenant_id']}/invoices/{r['id']}", r["number"]) for r in invoices
    )
