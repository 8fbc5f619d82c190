"""Tally lines as Stripe invoice items (server.payments.stripe_items): exact minor units, at most 250."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.models import Invoice, InvoiceStatus
from server.domain.pricing import LineItem, LineKind
from server.payments.stripe_items import NotInMinorUnits, minor_units, stripe_items

AT = datetime(2026, 1, 1, tzinfo=UTC)


def invoice(lines: list[tuple[str, str]], currency: str = "USD") -> Invoice:
    items = tuple(
        LineItem(
            service=service,
            usage_type="t",
            quantity=Decimal(1),
            unit_price=None,
            amount=Decimal(a),
            event_count=0,
        )
        for service, a in lines
    )
    return Invoice(
        id="inv_1",
        tenant_id="t",
        period_start=AT,
        period_end=AT,
        currency=currency,
        lines=items,
        total=sum((line.amount for line in items), Decimal(0)),
        status=InvoiceStatus.FINALIZED,
        created_at=AT,
        updated_at=AT,
        computed_at=AT,
        number="TALLY-2026-000001",
    )


def test_minor_units_follow_the_currency_and_refuse_a_fraction_of_one() -> None:
    assert minor_units(Decimal("12.34"), "USD") == 1234
    assert minor_units(Decimal("-0.05"), "EUR") == -5
    assert minor_units(Decimal("1500"), "JPY") == 1500
    assert minor_units(Decimal("1.234"), "BHD") == 1234
    with pytest.raises(NotInMinorUnits):
        minor_units(Decimal("0.001"), "USD")


def test_up_to_250_lines_are_one_item_each_in_order() -> None:
    lines = [("svc", f"{i}.{i % 100:02d}") for i in range(250)]
    items = stripe_items(invoice(lines))
    assert [item.positions for item in items] == [(i,) for i in range(250)]
    assert [item.amount for item in items] == [int(Decimal(a) * 100) for _, a in lines]


def test_beyond_250_lines_of_few_services_each_service_is_one_item() -> None:
    lines = [("a" if i % 2 else "b", "1.00") for i in range(251)]
    items = stripe_items(invoice(lines))
    assert [(item.amount, len(item.positions)) for item in items] == [(12600, 126), (12500, 125)]
    assert "126 lines of Tally invoice TALLY-2026-000001" in items[0].description


def test_beyond_250_groups_consecutive_lines_are_put_together() -> None:
    lines = [(f"svc{i}", "0.01") for i in range(600)]
    items = stripe_items(invoice(lines))
    assert len(items) == 200 and all(len(item.positions) == 3 for item in items)
    assert items[0].description == "Lines 1-3 of Tally invoice TALLY-2026-000001"


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-(10**9), 10**9)), min_size=0, max_size=700
    )
)
def test_items_always_add_up_to_the_invoice_total_in_at_most_250_items(lines: list[tuple[str, int]]) -> None:
    priced = invoice(
        [
            (f"{s}{i if len(lines) > 400 else ''}", str(Decimal(c).scaleb(-2)))
            for i, (s, c) in enumerate(lines)
        ]
    )
    items = stripe_items(priced)
    assert len(items) <= 250
    assert sum(item.amount for item in items) == minor_units(priced.total, "USD")
    assert sorted(p for item in items for p in item.positions) == list(range(len(lines)))


def test_a_tax_line_keeps_its_description() -> None:
    tax = LineItem(
        service="",
        usage_type="",
        quantity=Decimal("10.00"),
        unit_price=Decimal("0.2"),
        amount=Decimal("2.00"),
        event_count=0,
        kind=LineKind.TAX,
        description="VAT 20%",
    )
    base = invoice([("svc", "10.00")])
    items = stripe_items(dataclasses.replace(base, lines=(*base.lines, tax)))
    assert [item.description for item in items][1] == "VAT 20%"
