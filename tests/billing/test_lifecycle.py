"""Lifecycle.move (server.billing.lifecycle) on an in-memory invoice store, without PostgreSQL.

The store runs the move as one unit of work (Transactions.run_in_tenant_transaction); the
retry policy and the SQL keep their end-to-end tests (tests/test_invoice_lifecycle.py).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import cast

import pytest

from server.billing.lifecycle import Lifecycle
from server.billing.pricer import InvoicePricer
from server.domain.access import ALL_TENANTS, BILLING_ADMIN, Caller, Principal
from server.domain.audit import AuditAction
from server.domain.errors import ErrorReason, FailedPrecondition, NotFound
from server.domain.lifecycle import Issuer
from server.domain.models import Invoice, InvoiceStatus
from server.domain.pagination import PageTokens
from server.domain.requests import Once, Replayed, RequestKey
from server.domain.timeutil import to_datetime, to_micros
from server.storage.credit_notes import CreditNoteStore
from tests.memory_stores import FakeInvoices

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


def lifecycle(store: FakeInvoices) -> Lifecycle:
    # A draft's void touches no credit note and mirrors nothing at Stripe.
    no_notes = cast(CreditNoteStore, object())
    return Lifecycle(store, no_notes, InvoicePricer("USD"), Issuer(), PageTokens(b"k" * 32), lambda: NOW)


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
