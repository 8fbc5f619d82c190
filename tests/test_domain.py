"""Pure logic: decimal parsing and formatting, the rounding rule, event validation, page tokens."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.decimals import check_decimal, format_money, format_price, format_quantity
from server.domain.errors import InvalidArgument
from server.domain.events import EventRules, RawEvent, columns_of, validate_batch
from server.domain.pagination import ID, MICROS, NAME, PageTokens
from server.domain.pricing import PricedUsage, price_usage


class Catalog:
    def first_effective(self, service: str, usage_type: str) -> int | None:
        return 0 if (service, usage_type) == ("s", "u") else None


def raw(tenant: str, event_id: str, quantity: str = "1") -> RawEvent:
    return RawEvent(tenant, event_id, "s", "u", quantity, 1_000, {})


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0", True),
        ("1.5", True),
        ("007.250", True),
        ("1" * 18, True),
        ("0." + "1" * 9, True),
        ("", False),
        ("-1", False),
        ("+1", False),
        ("1e3", False),
        ("NaN", False),
        ("inf", False),
        (" 1", False),
        ("1.", False),
        (".5", False),
        ("1" * 19, False),
        ("0." + "1" * 10, False),
        ("\u0661", False),
    ],
)
def test_quantity_text_rules(text: str, ok: bool) -> None:
    assert (check_decimal(text, max_integer_digits=18, max_fraction_digits=9) is None) is ok


def test_formatting_never_uses_exponents() -> None:
    assert format_quantity(Decimal("1E+3")) == "1000"
    assert format_quantity(Decimal("5.000")) == "5"
    assert format_quantity(Decimal("0.000000001")) == "0.000000001"
    assert format_price(Decimal("0.1"), 2) == "0.10"
    assert format_price(Decimal("0.0001"), 2) == "0.0001"
    assert format_money(Decimal("0.005"), 2) == "0.01"
    assert format_money(Decimal("12"), 0) == "12"


def test_line_amount_rounds_once_half_away_from_zero() -> None:
    usages = [
        PricedUsage("a", "x", Decimal("0.01"), Decimal("0.5"), 1),  # 0.005 -> 0.01
        PricedUsage("a", "x", Decimal("0.01"), Decimal("0.5"), 1),  # merged: 1.0 * 0.01 = 0.01
        PricedUsage("b", "y", Decimal("0.02"), Decimal("0.125"), 3),  # 0.0025 -> 0.00
    ]
    amounts = price_usage(usages, 2)
    assert [(line.service, line.quantity, line.amount, line.event_count) for line in amounts.lines] == [
        ("a", Decimal("1.0"), Decimal("0.01"), 2),
        ("b", Decimal("0.125"), Decimal("0.00"), 3),
    ]
    assert amounts.total == Decimal("0.01")


@given(st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 10**6)), max_size=30))
def test_total_is_exactly_the_sum_of_rounded_lines(pairs: list[tuple[int, int]]) -> None:
    usages = [
        PricedUsage(f"s{i}", "u", Decimal(price).scaleb(-6), Decimal(q).scaleb(-3), 1)
        for i, (q, price) in enumerate(pairs)
    ]
    amounts = price_usage(usages, 2)
    assert amounts.total == sum((line.amount for line in amounts.lines), Decimal(0))
    for line in amounts.lines:
        assert line.amount == line.amount.quantize(Decimal("0.01"))
        assert abs(line.amount - line.quantity * line.unit_price) <= Decimal("0.005")


def test_batch_validation_dedupes_sorts_and_rejects_individually() -> None:
    events = [raw("t", "b"), raw("t", "a"), raw("t", "b", "9"), raw("t", "c", "-1"), raw("", "d")]
    batch = validate_batch(events, Catalog(), EventRules(), now_micros=10**9)
    columns = columns_of(batch.rows)
    assert columns.event_ids == ["a", "b"]  # in key order, whatever the batch order
    assert columns.quantities == ["1", "1"]  # the first report of "b" wins
    assert batch.repeated_in_batch == 1
    assert [(r.index, r.field) for r in batch.rejections] == [(3, "quantity"), (4, "tenant_id")]


def test_page_tokens_round_trip_and_are_bound_to_their_filter() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode("invoices:a", [5, "inv_1"])
    assert tokens.decode(token, "invoices:a", (MICROS, ID)) == [5, "inv_1"]
    assert tokens.decode("", "invoices:a", (MICROS, ID)) is None
    for bad_filter, shape in (("invoices:b", (MICROS, ID)), ("invoices:a", (NAME, NAME))):
        with pytest.raises(InvalidArgument):
            tokens.decode(token, bad_filter, shape)
    with pytest.raises(InvalidArgument):
        tokens.decode("%%%", "invoices:a", (MICROS, ID))


def test_a_page_token_signed_with_another_key_is_refused() -> None:
    token = PageTokens(b"k" * 32).encode("invoices:a", [5, "inv_1"])
    with pytest.raises(InvalidArgument) as raised:
        PageTokens(b"j" * 32).decode(token, "invoices:a", (MICROS, ID))
    assert raised.value.violations[0].field == "page_token"


@pytest.mark.parametrize(
    "key",
    [
        [10**20, "x"],
        [-(10**18), "x"],
        [0, "x" * 129],
        [0, "inv_\x00"],
        [0.5, "x"],
        [True, "x"],
        [0],
        [0, "x", 1],
    ],
)
def test_a_validly_signed_key_out_of_range_is_refused(key: list[object]) -> None:
    tokens = PageTokens(b"k" * 32)
    with pytest.raises(InvalidArgument):
        tokens.decode(tokens.encode("f", key), "f", (MICROS, ID))


def test_a_page_token_key_must_be_long_enough() -> None:
    with pytest.raises(ValueError):
        PageTokens(b"short")


def test_pricing_stays_exact_beyond_the_default_28_digits() -> None:
    quantity = Decimal("999999999999999999.999999999")  # the largest quantity one event may carry
    price = Decimal("999999999999999999.999999999999")
    amounts = price_usage([PricedUsage("s", "u", price, quantity, 1)] * 3, 2)
    assert amounts.lines[0].quantity == Decimal("2999999999999999999.999999997")
    # Exact product: 2999999999999999999999999996997000000.000000000000000000003
    assert amounts.lines[0].amount == Decimal("2999999999999999999999999996997000000.00")
    assert amounts.total == amounts.lines[0].amount
    # Python's default context (28 digits) would have lost the digits that matter here.
    assert amounts.lines[0].quantity * price == Decimal("2.999999999999999999999999997E+36")
