"""Billing (server.billing.service) on in-memory stores: the rate card's use cases without PostgreSQL.

Invoices run on InvoiceStore's transactions and keep their end-to-end tests (tests/test_billing.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import cast

import pytest

from server.billing import Billing
from server.domain.access import ALL_TENANTS, BILLING_ADMIN, Caller, Principal
from server.domain.audit import AuditAction
from server.domain.errors import InvalidArgument, PermissionDenied
from server.domain.inputs import RateChange
from server.domain.models import Rate
from server.domain.pagination import PageTokens
from server.domain.timeutil import MICROS_PER_HOUR, to_datetime, to_micros
from server.ratecard import RateCardCache
from server.storage.invoices import InvoiceStore
from tests.memory_stores import EPOCH, FakeAuditReader, FakeRateBook

NOW = to_micros(datetime(2026, 3, 1, 12, 30, tzinfo=UTC))
NEXT_HOUR = to_datetime(to_micros(datetime(2026, 3, 1, 13, tzinfo=UTC)))
ADMIN = Caller(Principal("finance", ALL_TENANTS, frozenset({BILLING_ADMIN})), "req-1")


async def billing(rates: FakeRateBook) -> tuple[Billing, RateCardCache]:
    rate_card = RateCardCache(rates)
    await rate_card.reload()
    # The rate card's use cases never open an invoice transaction.
    no_invoices = cast(InvoiceStore, object())
    service = Billing(rates, no_invoices, FakeAuditReader(), rate_card, PageTokens(b"k" * 32), lambda: NOW)
    return service, rate_card


async def test_a_new_usage_type_is_priced_from_the_epoch_and_audited() -> None:
    rates = FakeRateBook()
    service, rate_card = await billing(rates)
    rate = await service.set_rate(RateChange("api", "calls", "0.25"), ADMIN)
    assert isinstance(rate, Rate)
    assert (rate.unit_price, rate.currency, rate.effective_from) == (Decimal("0.25"), "USD", EPOCH)
    assert rate_card.first_effective("api", "calls") == 0  # ingestion accepts it at once
    (entry,) = rates.audited
    assert (entry.action, entry.principal, entry.request_id) == (AuditAction.RATE_SET, "finance", "req-1")
    assert entry.after is not None and entry.after["unit_price"] == "0.25"


async def test_a_known_usage_type_changes_price_from_the_next_hour() -> None:
    rates = FakeRateBook(Rate("api", "calls", Decimal("0.25"), "USD", EPOCH, EPOCH))
    service, _ = await billing(rates)
    rate = await service.set_rate(RateChange("api", "calls", "0.30"), ADMIN)
    assert isinstance(rate, Rate) and rate.effective_from == NEXT_HOUR
    page = await service.list_rates(None, True, 10, "")
    assert [(r.unit_price, r.effective_from) for r in page.items] == [
        (Decimal("0.25"), EPOCH),
        (Decimal("0.30"), NEXT_HOUR),
    ]


async def test_only_an_all_tenants_caller_may_change_the_rate_card() -> None:
    rates = FakeRateBook()
    service, _ = await billing(rates)
    one_tenant = Caller(Principal("ops", frozenset({"t1"}), frozenset({BILLING_ADMIN})), "req-2")
    with pytest.raises(PermissionDenied):
        await service.set_rate(RateChange("api", "calls", "not a price"), one_tenant)
    assert rates.rates == [] and rates.audited == []


async def test_a_bad_rate_change_writes_nothing() -> None:
    rates = FakeRateBook()
    service, _ = await billing(rates)
    past = RateChange("api", "calls", "1", effective_micros=NOW - NOW % MICROS_PER_HOUR - MICROS_PER_HOUR)
    with pytest.raises(InvalidArgument) as raised:
        await service.set_rate(past, ADMIN)
    assert [v.field for v in raised.value.violations] == ["effective_time"]
    assert rates.rates == [] and rates.audited == []
