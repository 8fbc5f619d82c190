"""Periods (server.billing.periods) on an in-memory invoice store, without PostgreSQL.

The scheduler's closes (a block per unit of work, the tenants it hands back one by one, a
failure postponed an hour), ClosePeriod and spend thresholds, against FakeInvoices. The
locks, SKIP LOCKED and the SQL keep their end-to-end tests (tests/test_period_close*.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from server.billing.lifecycle import Lifecycle
from server.billing.periods import Periods
from server.billing.pricer import InvoicePricer
from server.domain.access import ALL_TENANTS, BILLING_ADMIN, Caller, Principal
from server.domain.audit import AuditAction
from server.domain.errors import ErrorReason, NotFound
from server.domain.lifecycle import Issuer
from server.domain.models import InvoiceKind, InvoiceStatus
from server.domain.pagination import PageTokens
from server.domain.plans import DEFAULT_PLAN, BillingProfile, PlanAssignment
from server.domain.timeutil import to_micros
from server.domain.webhooks import INVOICE_FINALIZED, THRESHOLD_CROSSED
from server.payments.collection import Collection
from tests.billing.test_lifecycle import NoNotes
from tests.memory_stores import FakeInvoices

MARCH = datetime(2026, 3, 1, tzinfo=UTC)
APRIL = datetime(2026, 4, 1, tzinfo=UTC)
MAY = datetime(2026, 5, 1, tzinfo=UTC)
GRACE = timedelta(hours=2)
NOW = APRIL + timedelta(hours=3)  # March's closes are due (April 1st + 2 h)
ADMIN = Caller(Principal("finance", ALL_TENANTS, frozenset({BILLING_ADMIN})), "req-1")
QUERIES = ("analytics", "query", Decimal("0.50"), Decimal("30"), 30)  # 15.00 on the rate card


def profile(tenant_id: str, *, threshold: str | None = None) -> tuple[BillingProfile, list[PlanAssignment]]:
    """A monthly profile on the rate card, billed from March, its first close due April 1st + grace."""
    return (
        BillingProfile(
            tenant_id=tenant_id,
            display_name=f"{tenant_id} Ltd",
            email="billing@example.com",
            currency="USD",
            plan_id=DEFAULT_PLAN,
            anchor_day=1,
            billing_start=MARCH,
            tax_percentage=None,
            spend_threshold=None if threshold is None else Decimal(threshold),
            overrides=(),
            closed_until=MARCH,
            create_time=MARCH,
            update_time=MARCH,
            next_close_time=APRIL + GRACE,
        ),
        [PlanAssignment(MARCH, DEFAULT_PLAN)],
    )


def periods(store: FakeInvoices, now: datetime = NOW) -> Periods:
    clock = lambda: to_micros(now)  # noqa: E731
    pricer = InvoicePricer("USD")
    lifecycle = Lifecycle(
        store, NoNotes(), pricer, Issuer(), PageTokens(b"k" * 32), clock, Collection(live=False)
    )
    return Periods(store, pricer, lifecycle, clock, GRACE)


async def test_the_scheduler_closes_every_due_period_in_a_block_and_moves_the_cursor() -> None:
    store = FakeInvoices()
    for tenant in ("t1", "t2"):
        store.profiles[tenant] = profile(tenant)
        store.usage[tenant] = [QUERIES]
    assert await periods(store).close_due() == 2
    invoices = sorted(store.invoices.values(), key=lambda i: i.tenant_id)
    assert [(i.tenant_id, i.status, i.total, i.period_start, i.period_end) for i in invoices] == [
        ("t1", InvoiceStatus.FINALIZED, Decimal("15.00"), MARCH, APRIL),
        ("t2", InvoiceStatus.FINALIZED, Decimal("15.00"), MARCH, APRIL),
    ]
    assert sorted(i.number for i in invoices) == ["TALLY-2026-000001", "TALLY-2026-000002"]
    for tenant in ("t1", "t2"):
        closed = store.profiles[tenant][0]
        assert (closed.closed_until, closed.next_close_time) == (APRIL, MAY + GRACE)
    assert set(store.units) == {"due block"}  # no tenant left to close one by one
    # Nothing is due any more: a second round closes nothing and writes nothing.
    assert await periods(store).close_due() == 0 and len(store.invoices) == 2


async def test_a_tenant_whose_lock_another_process_holds_is_left_to_it() -> None:
    store = FakeInvoices()
    store.profiles["t1"] = profile("t1")
    store.busy.add("t1")
    assert await periods(store).close_due() == 0
    assert store.invoices == {} and store.profiles["t1"][0].closed_until == MARCH


async def test_a_close_that_fails_is_postponed_an_hour_and_the_others_are_closed() -> None:
    store = FakeInvoices()
    store.profiles["t1"] = profile("t1")
    store.profiles["t2"] = profile("t2")
    store.usage["t1"] = [("analytics", "query", None, Decimal("3"), 3)]  # usage without a rate
    store.usage["t2"] = [QUERIES]
    assert await periods(store).close_due() == 1
    assert [i.tenant_id for i in store.invoices.values()] == ["t2"]
    failed = store.profiles["t1"][0]
    assert (failed.closed_until, failed.next_close_time) == (MARCH, NOW + timedelta(hours=1))


async def test_close_period_of_a_tenant_without_a_profile_is_not_found_and_writes_nothing() -> None:
    store = FakeInvoices()
    with pytest.raises(NotFound) as raised:
        await periods(store).close_period("t1", ADMIN)
    assert raised.value.reason is ErrorReason.BILLING_PROFILE_NOT_FOUND
    assert (store.invoices, store.audited, store.numbers) == ({}, [], {})


async def test_close_period_closes_the_oldest_open_period_even_before_it_ends() -> None:
    store = FakeInvoices()
    store.profiles["t1"] = profile("t1")
    store.usage["t1"] = [QUERIES]
    invoice = await periods(store, now=MARCH + timedelta(days=10)).close_period("t1", ADMIN)
    assert (invoice.status, invoice.period_end, invoice.total) == (  # type: ignore[union-attr]
        InvoiceStatus.FINALIZED,
        APRIL,
        Decimal("15.00"),
    )
    assert store.profiles["t1"][0].closed_until == APRIL
    assert [e.action for e in store.audited] == [AuditAction.INVOICE_CREATED, AuditAction.INVOICE_FINALIZED]


async def test_a_crossed_spend_threshold_bills_an_interim_invoice_once() -> None:
    store = FakeInvoices()
    store.profiles["t1"] = profile("t1", threshold="10")
    store.profiles["t2"] = profile("t2", threshold="20")  # 15.00 has not reached it
    store.usage["t1"] = store.usage["t2"] = [QUERIES]
    service = periods(store, now=MARCH + timedelta(days=10))
    assert await service.bill_thresholds() == 1
    (interim,) = store.invoices.values()
    assert (interim.tenant_id, interim.kind, interim.status, interim.total) == (
        "t1",
        InvoiceKind.INTERIM,
        InvoiceStatus.FINALIZED,
        Decimal("15.00"),
    )
    # The crossing is published before the invoice's own finalization, which it caused.
    assert [(kind, data.get("amount")) for kind, data in store.published] == [
        (THRESHOLD_CROSSED, "15.00"),
        (INVOICE_FINALIZED, None),
    ]
    assert store.published[1][1]["total"] == "15.00"
