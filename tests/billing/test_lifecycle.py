"""Lifecycle (server.billing.lifecycle) on an in-memory invoice store, without PostgreSQL.

Finalizing, status moves and credit notes, each one unit of work
(InvoiceBook.run_in_tenant_transaction) whose every write (number, payment, outbox job,
webhook event, audit entry, request id) commits or rolls back together. The retry policy
and the SQL keep their end-to-end tests (tests/test_invoice_lifecycle.py).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Generic, Protocol

import pytest

from server.billing.lifecycle import Lifecycle
from server.billing.pricer import InvoicePricer
from server.domain.access import ALL_TENANTS, BILLING_ADMIN, Caller, Principal
from server.domain.audit import AuditAction
from server.domain.errors import ErrorReason, FailedPrecondition, NotFound
from server.domain.lifecycle import Issuer
from server.domain.models import CreditNote, Invoice, InvoiceStatus, PaymentState
from server.domain.pagination import PageTokens
from server.domain.requests import Once, Replayed, RequestKey
from server.domain.stores import BillingTransaction
from server.domain.timeutil import to_datetime, to_micros
from server.payments.collection import Collection
from server.payments.kinds import STRIPE_CREDIT_NOTE, STRIPE_INVOICE, STRIPE_VOID
from server.payments.stores import PaymentTransaction
from tests.memory_stores import FakeBillingTransaction, FakeInvoices

NOW = to_micros(datetime(2026, 3, 1, 12, 30, tzinfo=UTC))
ADMIN = Caller(Principal("finance", ALL_TENANTS, frozenset({BILLING_ADMIN})), "req-1")
MARCH = datetime(2026, 3, 1, tzinfo=UTC)
DRAFT = Invoice(
    id="inv_1",
    tenant_id="t1",
    period_start=MARCH,
    period_end=datetime(2026, 4, 1, tzinfo=UTC),
    currency="USD",
    lines=(),
    total=Decimal("12.50"),
    status=InvoiceStatus.DRAFT,
    created_at=MARCH,
    updated_at=MARCH,
    computed_at=MARCH,
)


class NoNotes:
    """A CreditNoteBook with nothing to list (these tests read notes from the fake transaction)."""

    async def list_for_tenant(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[CreditNote]:
        return []


def lifecycle(store: FakeInvoices, *, live: bool = False) -> Lifecycle:
    """`live`: a Stripe key is configured (payments pending, pushes queued)."""
    return Lifecycle(
        store,
        NoNotes(),
        InvoicePricer("USD"),
        Issuer(),
        PageTokens(b"k" * 32),
        lambda: NOW,
        Collection(live=live),
    )


def test_the_fake_transaction_has_every_method_of_the_protocol() -> None:
    """A method the Protocol gains must be faked too, or these tests would not reach it."""
    for protocol in (BillingTransaction, PaymentTransaction):
        parts = [cls for cls in protocol.__mro__ if cls not in (object, Protocol, Generic)]
        wanted = {name for cls in parts for name in vars(cls) if not name.startswith("_")}
        assert wanted - set(dir(FakeBillingTransaction)) == set(), protocol
    assert len(wanted) > 40


def once(request_id: str, target: InvoiceStatus) -> Once[Invoice]:
    fingerprint = hashlib.sha256(target.value.encode()).digest()
    return Once(
        RequestKey("finance", "MoveInvoice", request_id, fingerprint), lambda i: i.status.value.encode()
    )


async def test_voiding_a_draft_stamps_it_and_audits_it_in_the_tenants_transaction() -> None:
    store = FakeInvoices(DRAFT)
    invoice = await lifecycle(store).move("t1", "inv_1", InvoiceStatus.VOID, ADMIN)
    assert isinstance(invoice, Invoice)
    assert (invoice.status, invoice.void_time) == (InvoiceStatus.VOID, to_datetime(NOW))
    assert store.invoices["inv_1"] == invoice
    (entry,) = store.audited
    assert (entry.action, entry.tenant_id, entry.resource) == (
        AuditAction.INVOICE_VOIDED,
        "t1",
        "invoices/inv_1",
    )
    assert (entry.before, entry.after) == (
        {"status": "draft", "number": ""},
        {"status": "void", "number": ""},
    )
    assert store.units == ["tenant t1"]  # one unit of work, under the tenant's lock


async def test_another_tenants_invoice_is_not_found_and_its_request_id_stays_unclaimed() -> None:
    store = FakeInvoices(DRAFT)
    with pytest.raises(NotFound) as raised:
        await lifecycle(store).move("t2", "inv_1", InvoiceStatus.VOID, ADMIN, once("r1", InvoiceStatus.VOID))
    assert raised.value.reason is ErrorReason.INVOICE_NOT_FOUND
    assert store.invoices["inv_1"] == DRAFT and store.audited == []
    assert store.requests == {}  # the claim rolled back with the change


async def test_a_move_the_status_does_not_allow_changes_nothing() -> None:
    store = FakeInvoices(DRAFT)
    with pytest.raises(FailedPrecondition) as raised:
        await lifecycle(store).move("t1", "inv_1", InvoiceStatus.PAID, ADMIN, once("r1", InvoiceStatus.PAID))
    assert raised.value.reason is ErrorReason.INVOICE_STATUS_INVALID
    assert store.invoices["inv_1"] == DRAFT and store.audited == [] and store.requests == {}


async def test_a_retried_request_id_replays_the_first_answer_without_a_second_change() -> None:
    store = FakeInvoices(DRAFT)
    service = lifecycle(store)
    first = await service.move("t1", "inv_1", InvoiceStatus.VOID, ADMIN, once("r1", InvoiceStatus.VOID))
    again = await service.move("t1", "inv_1", InvoiceStatus.VOID, ADMIN, once("r1", InvoiceStatus.VOID))
    assert isinstance(first, Invoice) and again == Replayed(b"void")
    assert len(store.audited) == 1 and store.units == ["tenant t1", "tenant t1"]


async def test_finalizing_prices_numbers_records_the_payment_and_publishes_in_one_unit() -> None:
    store = FakeInvoices(DRAFT)
    # (service, usage type, unit price, quantity, events): priced by the rate card (no profile).
    store.usage["t1"] = [("analytics", "query", Decimal("0.002"), Decimal("1234.5"), 12)]
    invoice = await lifecycle(store).finalize("t1", "inv_1", ADMIN)
    assert isinstance(invoice, Invoice)
    assert (invoice.status, invoice.number) == (InvoiceStatus.FINALIZED, "TALLY-2026-000001")
    assert invoice.total == Decimal("2.47")  # 1234.5 x 0.002 = 2.469, to the cent
    assert [(line.usage_type, line.quantity, line.amount) for line in invoice.lines] == [
        ("query", Decimal("1234.5"), Decimal("2.47"))
    ]
    assert invoice.finalize_time == to_datetime(NOW)
    assert {i: (row.state, at) for i, (row, at) in store.payments.items()} == {
        "inv_1": (PaymentState.SIMULATED, to_datetime(NOW))
    }
    assert store.jobs == {}  # simulation mode queues nothing for Stripe
    ((event_type, data),) = store.published
    assert (event_type, data["number"], data["total"]) == ("invoice.finalized", "TALLY-2026-000001", "2.47")
    (entry,) = store.audited
    assert entry.action is AuditAction.INVOICE_FINALIZED
    assert (entry.after["status"], entry.after["number"], entry.after["total"]) == (
        "finalized",
        invoice.number,
        "2.47",
    )
    assert store.units == ["tenant t1"]
    # The next invoice takes the next number of the same sequence.
    second = Invoice(**{**vars_of(DRAFT), "id": "inv_2"})
    store.invoices["inv_2"] = second
    assert (await lifecycle(store).finalize("t1", "inv_2", ADMIN)).number == "TALLY-2026-000002"  # type: ignore[union-attr]


def vars_of(invoice: Invoice) -> dict[str, object]:
    return {name: getattr(invoice, name) for name in Invoice.__dataclass_fields__}


async def test_usage_without_a_rate_refuses_the_finalization_and_takes_no_number() -> None:
    store = FakeInvoices(DRAFT)
    store.usage["t1"] = [("analytics", "query", None, Decimal("3"), 3)]
    with pytest.raises(FailedPrecondition) as raised:
        await lifecycle(store).finalize("t1", "inv_1", ADMIN)
    assert raised.value.reason is ErrorReason.USAGE_NOT_PRICED
    assert store.invoices["inv_1"] == DRAFT
    assert (store.numbers, store.payments, store.published, store.audited) == ({}, {}, [], [])


async def test_live_collection_queues_the_push_and_mirrors_a_void_and_a_credit_note() -> None:
    store = FakeInvoices(DRAFT)
    store.usage["t1"] = [("analytics", "query", Decimal("1"), Decimal("10"), 10)]
    service = lifecycle(store, live=True)
    invoice = await service.finalize("t1", "inv_1", ADMIN)
    assert isinstance(invoice, Invoice) and invoice.payment is not None
    assert invoice.payment.state is PaymentState.PENDING
    assert list(store.jobs) == [(STRIPE_INVOICE, "inv_1")]
    note = await service.create_credit_note("t1", "inv_1", "4.00", "goodwill", ADMIN)
    assert isinstance(note, CreditNote) and note.amount == Decimal("4.00")
    assert note.number == "TALLY-CN-2026-000001"
    assert store.jobs[(STRIPE_CREDIT_NOTE, note.id)]["invoice_id"] == "inv_1"
    await service.move("t1", "inv_1", InvoiceStatus.VOID, ADMIN)
    assert (STRIPE_VOID, "inv_1") in store.jobs


async def test_a_credit_note_never_exceeds_what_is_left_of_the_invoice() -> None:
    store = FakeInvoices(DRAFT)
    store.usage["t1"] = [("analytics", "query", Decimal("1"), Decimal("10"), 10)]
    service = lifecycle(store)
    await service.finalize("t1", "inv_1", ADMIN)
    assert isinstance(await service.create_credit_note("t1", "inv_1", "7.50", "refund", ADMIN), CreditNote)
    with pytest.raises(FailedPrecondition) as raised:
        await service.create_credit_note("t1", "inv_1", "2.51", "too much", ADMIN)
    assert raised.value.reason is ErrorReason.CREDIT_EXCEEDS_INVOICE
    assert raised.value.metadata["creditable"] == "2.50"
    assert [n.amount for n in store.notes] == [Decimal("7.50")]  # the refused note left nothing
    assert store.numbers[("Tally", "TALLY-CN-2026-")] == 1  # nor took a number
    assert isinstance(await service.create_credit_note("t1", "inv_1", "2.50", "the rest", ADMIN), CreditNote)


async def test_a_draft_cannot_be_credited() -> None:
    store = FakeInvoices(DRAFT)
    with pytest.raises(FailedPrecondition) as raised:
        await lifecycle(store).create_credit_note("t1", "inv_1", "1", "early", ADMIN)
    assert raised.value.reason is ErrorReason.INVOICE_STATUS_INVALID
    assert store.notes == [] and store.numbers == {}
