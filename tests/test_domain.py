"""Pure logic: decimal parsing and formatting, the rounding rule, event validation, page tokens."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.decimals import (
    canonical_quantity,
    check_decimal,
    format_money,
    format_price,
    format_quantity,
)
from server.domain.errors import InvalidArgument
from server.domain.events import EventRow, EventRules, RawEvent, columns_of, validate_batch
from server.domain.meters import Aggregation, Meter, MeterMap, MeterSpec, MeterState, contribution
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


# Quantities as check_decimal accepts them (ASCII digits; up to 18 + 9 digits, leading and
# trailing zeros included).
_QUANTITY_TEXTS = st.from_regex(r"[0-9]{1,18}(\.[0-9]{1,9})?", fullmatch=True)


@given(_QUANTITY_TEXTS)
def test_canonical_quantity_is_the_decimal_formatting(text: str) -> None:
    # A UNIQUE_COUNT of quantities stores this text: the batch path and a cancellation
    # (which formats the stored numeric) must name one value the same way.
    assert check_decimal(text, max_integer_digits=18, max_fraction_digits=9) is None
    assert canonical_quantity(text) == format_quantity(Decimal(text))


_TYPES = [("storage", "gb_hour"), ("analytics", "query")]
_KEYS = ["region", "user", "plan"]


@st.composite
def _meter_sets(draw: st.DrawFn) -> list[Meter]:
    meters = []
    for number in range(draw(st.integers(1, 6))):
        service, usage_type = draw(st.sampled_from(_TYPES))
        aggregation = draw(st.sampled_from(list(Aggregation)))
        spec = MeterSpec(
            meter_id=f"m{number}",
            service=service,
            usage_type=usage_type,
            aggregation=aggregation,
            filter=draw(st.dictionaries(st.sampled_from(_KEYS), st.sampled_from(["a", "b"]), max_size=1)),
            value_dimension=draw(st.sampled_from(["", *_KEYS]))
            if aggregation is Aggregation.UNIQUE_COUNT
            else "",
            group_by=tuple(draw(st.lists(st.sampled_from(_KEYS), max_size=2, unique=True))),
        )
        state = draw(st.sampled_from(list(MeterState)))
        meters.append(Meter(number + 1, spec, state, datetime(2026, 1, 1, tzinfo=UTC), None))
    return meters


@st.composite
def _event_rows(draw: st.DrawFn) -> list[EventRow]:
    rows = []
    for number in range(draw(st.integers(0, 30))):
        service, usage_type = draw(st.sampled_from([*_TYPES, ("compute", "cpu_hour")]))
        values = st.sampled_from(["a", "b", "é"])
        dimensions = draw(st.dictionaries(st.sampled_from(_KEYS), values, max_size=3))
        dimensions_json = (
            json.dumps(dimensions, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
            if dimensions
            else "{}"
        )
        rows.append(
            EventRow(
                f"t{draw(st.integers(0, 2))}",
                f"e{number}",
                service,
                usage_type,
                draw(st.sampled_from(["1", "1.0", "1.50", "01.5", "0", "0.000", "2.25"])),
                draw(st.integers(0, 10**16)),
                dimensions_json,
            )
        )
    return rows


@given(_meter_sets(), _event_rows())
def test_a_batch_is_matched_to_the_meters_as_each_of_its_events_alone(
    meters: list[Meter], rows: list[EventRow]
) -> None:
    # Cancellations and backfills match one event at a time (contribution); a live batch
    # matches in one pass with what it worked out per dimension set cached. They must agree
    # entry for entry, or a cancellation would look for a value the batch never stored.
    found = MeterMap(meters).contributions(rows)
    expected = []
    for row in rows:
        for meter in meters:
            if not meter.state.counting or meter.spec.aggregation.additive:
                continue
            if (meter.spec.service, meter.spec.usage_type) != (row.service, row.usage_type):
                continue
            entry = contribution(meter, json.loads(row.dimensions_json), row.quantity)
            if entry is not None:
                expected.append(
                    (
                        row.tenant_id,
                        row.event_id,
                        entry.meter_id,
                        entry.kind,
                        entry.value,
                        entry.group_values,
                        row.time_micros,
                    )
                )
    assert list(zip(*found.columns(), strict=True)) == expected
