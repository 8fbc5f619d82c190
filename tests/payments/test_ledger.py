"""PaymentLedger (server.payments.ledger) on an in-memory invoice store, without PostgreSQL.

Stripe's events applied to an invoice's payment: stored once by id, the payment row moved
forward only, dunning's retry job scheduled, the invoice moved through the lifecycle, the
tenant's collection status kept, each fact in one unit of work. The webhook's signature,
the SQL and the outbox worker keep their end-to-end tests (tests/test_stripe_webhooks.py).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from server.billing.lifecycle import Lifecycle
from server.billing.pricer import InvoicePricer
from server.domain.audit import AuditAction
from server.domain.lifecycle import Issuer
from server.domain.models import Invoice, InvoiceStatus, PaymentState
from server.domain.pagination import PageTokens
from server.domain.timeutil import to_micros
from server.domain.webhooks import INVOICE_PAYMENT_FAILED
from server.payments.collection import Collection
from server.payments.dunning import DunningSchedule
from server.payments.events import EventType, StripeEvent
from server.payments.kinds import STRIPE_RETRY_PAYMENT
from server.payments.ledger import STRIPE, PaymentLedger, Received
from server.payments.retries import OutboxRetryJobs
from server.payments.states import CollectionState, Payment
from tests.billing.test_lifecycle import NoNotes
from tests.memory_stores import FakeInvoices

MARCH = datetime(2026, 3, 1, tzinfo=UTC)
APRIL = datetime(2026, 4, 1, tzinfo=UTC)
NOW = APRIL + timedelta(hours=5)
DAY = timedelta(days=1)
SCHEDULE = DunningSchedule.of_seconds([86_400, 3 * 86_400])  # retries 1 and 3 days after the first failure
BILLED = Invoice(
    id="inv_1",
    tenant_id="t1",
    period_start=MARCH,
    period_end=APRIL,
    currency="USD",
    lines=(),
    total=Decimal("40.00"),
    status=InvoiceStatus.FINALIZED,
    created_at=APRIL,
    updated_at=APRIL,
    computed_at=APRIL,
    number="TALLY-2026-000001",
)


def ledger(store: FakeInvoices) -> PaymentLedger:
    clock = lambda: to_micros(NOW)  # noqa: E731
    lifecycle = Lifecycle(
        store, NoNotes(), InvoicePricer("USD"), Issuer(), PageTokens(b"k" * 32), clock, Collection(live=True)
    )
    return PaymentLedger(store, lifecycle, SCHEDULE, OutboxRetryJobs(), clock)


def billed() -> FakeInvoices:
    """A finalized invoice pushed to Stripe (in_1), its payment pending."""
    store = FakeInvoices(BILLED)
    store.payments["inv_1"] = (Payment("inv_1", PaymentState.PENDING, "in_1"), APRIL)
    return store


def event(kind: EventType, attempt: int = 0, *, event_id: str = "evt_1", at: datetime = NOW) -> StripeEvent:
    return StripeEvent(
        event_id,
        kind.value,
        kind,
        at,
        "in_1",
        "in_1",
        "inv_1",
        attempt,
        "card_declined",
        4000,
        "usd",
        ("ch_1",),
    )


async def test_a_failed_payment_schedules_a_retry_publishes_it_and_makes_the_tenant_past_due() -> None:
    store = billed()
    received = await ledger(store).receive(event(EventType.PAYMENT_FAILED, 1), "{}")
    assert received == Received("applied", "inv_1")
    payment = store.payments["inv_1"][0]
    assert (payment.state, payment.attempt_count, payment.next_attempt_time) == (
        PaymentState.FAILED,
        1,
        NOW + DAY,
    )
    assert store.jobs[(STRIPE_RETRY_PAYMENT, "inv_1")]["due"] == NOW + DAY
    ((kind, data),) = store.published
    assert (kind, data["attempt_count"], data["failure"], data["total"]) == (
        INVOICE_PAYMENT_FAILED,
        "1",
        "card_declined",
        "40.00",
    )
    assert store.collections["t1"] == (CollectionState.PAST_DUE, NOW)
    assert [e.action for e in store.audited] == [
        AuditAction.PAYMENT_FAILED,
        AuditAction.COLLECTION_STATUS_CHANGED,
    ]
    assert store.stripe_events["evt_1"] == ("applied", "inv_1")
    assert store.refs == {"ch_1": "inv_1"}
    status = await ledger(store).collection_status("t1", STRIPE)
    assert (status.state, status.past_due_invoices, status.uncollectible_invoices) == (
        CollectionState.PAST_DUE,
        ("inv_1",),
        (),
    )


async def test_a_redelivered_event_is_a_duplicate_and_changes_nothing() -> None:
    store = billed()
    service = ledger(store)
    await service.receive(event(EventType.PAYMENT_FAILED, 1), "{}")
    before = (dict(store.payments), list(store.published), list(store.audited))
    assert await service.receive(event(EventType.PAYMENT_FAILED, 1), "{}") == Received("duplicate")
    assert (dict(store.payments), list(store.published), list(store.audited)) == before


async def test_the_last_failed_retry_makes_the_invoice_uncollectible_and_the_tenant_delinquent() -> None:
    store = billed()
    service = ledger(store)
    for attempt in (1, 2, 3):
        await service.receive(event(EventType.PAYMENT_FAILED, attempt, event_id=f"evt_{attempt}"), "{}")
    assert store.payments["inv_1"][0].state is PaymentState.UNCOLLECTIBLE
    assert store.invoices["inv_1"].status is InvoiceStatus.UNCOLLECTIBLE  # through the lifecycle, audited
    assert AuditAction.INVOICE_UNCOLLECTIBLE in [e.action for e in store.audited]
    assert store.collections["t1"][0] is CollectionState.DELINQUENT


async def test_a_payment_after_failures_marks_the_invoice_paid_and_restores_good_standing() -> None:
    store = billed()
    service = ledger(store)
    await service.receive(event(EventType.PAYMENT_FAILED, 1), "{}")
    assert await service.receive(event(EventType.INVOICE_PAID, event_id="evt_2"), "{}") == Received(
        "applied", "inv_1"
    )
    assert store.payments["inv_1"][0].state is PaymentState.PAID
    assert store.invoices["inv_1"].status is InvoiceStatus.PAID
    assert store.collections["t1"][0] is CollectionState.GOOD_STANDING
    # A late failure of an invoice already paid changes nothing: forward only.
    late = await service.receive(event(EventType.PAYMENT_FAILED, 2, event_id="evt_3"), "{}")
    assert late == Received("unchanged", "inv_1") and store.payments["inv_1"][0].state is PaymentState.PAID


async def test_an_event_about_no_tally_invoice_is_recorded_as_unmatched() -> None:
    store = billed()
    stranger = dataclasses.replace(
        event(EventType.INVOICE_PAID), tally_invoice_id=None, object_id="in_9", refs=()
    )
    assert await ledger(store).receive(stranger, "{}") == Received("unmatched")
    assert store.stripe_events["evt_1"] == ("unmatched", None)
    assert store.payments["inv_1"][0].state is PaymentState.PENDING
