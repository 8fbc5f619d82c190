"""The pure arithmetic of meters (buckets, ranges, time-weighted integrals) and retention's cutoff."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.aggregation import (
    Reading,
    Span,
    day_bit,
    decompose,
    hour_integral,
    integrate,
    spans,
    summarize_hour,
    unit_hours,
)
from server.domain.timeutil import MICROS_PER_DAY, MICROS_PER_HOUR, to_datetime, to_micros
from server.storage.retention import check_cutoff

JAN_2026 = to_micros(datetime(2026, 1, 1, tzinfo=UTC))
hours = st.integers(0, 24 * 800)  # hours after 2026-01-01: a little over two years


def _grain_end(grain: str, start: int) -> int:
    if grain == "h":
        return start + MICROS_PER_HOUR
    if grain == "d":
        return start + MICROS_PER_DAY
    moment = to_datetime(start)
    following = (
        moment.replace(year=moment.year + 1, month=1)
        if moment.month == 12
        else moment.replace(month=moment.month + 1)
    )
    return to_micros(following)


@given(first=hours, length=st.integers(1, 24 * 100))
def test_a_range_is_covered_exactly_by_whole_months_days_and_edge_hours(first: int, length: int) -> None:
    start = JAN_2026 + first * MICROS_PER_HOUR
    end = start + length * MICROS_PER_HOUR
    pieces = decompose(start, end)
    at = start
    for grain, piece_start, piece_end in pieces:
        assert piece_start == at
        assert piece_end == _grain_end(grain, piece_start)
        if grain == "d":
            assert piece_start % MICROS_PER_DAY == 0
        if grain == "m":
            assert to_datetime(piece_start).day == 1 and piece_start % MICROS_PER_DAY == 0
        at = _grain_end(grain, piece_start)
    assert at == end
    # The fewest pieces: never 24 hours where a day fits, nor a month's days where the month fits.
    assert sum(1 for piece in pieces if piece.grain == "h") <= 2 * 23
    assert sum(1 for piece in pieces if piece.grain == "d") <= 2 * 30


def test_a_calendar_month_is_one_piece_and_its_edges_are_days_and_hours() -> None:
    start = to_micros(datetime(2026, 1, 30, 22, tzinfo=UTC))
    end = to_micros(datetime(2026, 3, 2, 1, tzinfo=UTC))
    assert [piece.grain for piece in decompose(start, end)] == ["h", "h", "d", "m", "d", "h"]


def test_a_day_is_one_bit_of_its_months_mask() -> None:
    assert day_bit(to_micros(datetime(2026, 3, 1, tzinfo=UTC))) == 1
    assert day_bit(to_micros(datetime(2026, 3, 2, 23, 59, tzinfo=UTC))) == 2
    assert day_bit(to_micros(datetime(2026, 1, 31, 23, tzinfo=UTC))) == 1 << 30  # still a positive int4


def test_day_buckets_are_cut_by_the_range() -> None:
    start = to_micros(datetime(2026, 3, 1, 10, tzinfo=UTC))
    end = to_micros(datetime(2026, 3, 2, 5, tzinfo=UTC))
    assert spans(start, end, "day") == [
        Span(to_micros(datetime(2026, 3, 1, tzinfo=UTC)), start, to_micros(datetime(2026, 3, 2, tzinfo=UTC))),
        Span(to_micros(datetime(2026, 3, 2, tzinfo=UTC)), to_micros(datetime(2026, 3, 2, tzinfo=UTC)), end),
    ]


def test_a_reading_holds_until_the_next_and_carries_into_the_window() -> None:
    h = MICROS_PER_HOUR
    readings = [Reading(h // 2, "a", Decimal("2")), Reading(h + h // 4, "b", Decimal("10"))]
    # Carried 4 for the first half hour, 2 until 1h15, then 10: 2 + 1 + 0.5 + 7.5 over two hours.
    parts = [Span(None, 0, h), Span(None, h, 2 * h)]
    assert [unit_hours(v) for v in integrate(Decimal("4"), readings, parts)] == [Decimal("3"), Decimal("8")]
    # Before the first reading the value is zero.
    assert unit_hours(integrate(None, readings, [Span(None, 0, 2 * h)])[0]) == Decimal("9")


def test_unit_hours_round_half_even_at_twelve_places() -> None:
    assert unit_hours(Decimal(1)) == Decimal("0.000000000278")  # 1 unit-µs = 2.777...e-10 unit-hours
    assert unit_hours(Decimal(MICROS_PER_HOUR) / 3) == Decimal("0.333333333333")


readings_in_hour = st.lists(
    st.tuples(st.integers(0, MICROS_PER_HOUR - 1), st.sampled_from("abc"), st.integers(0, 10_000)),
    min_size=1,
    max_size=8,
)


@given(raw=readings_in_hour, carried=st.none() | st.integers(0, 10_000))
def test_an_hour_summary_composes_to_the_same_integral(
    raw: list[tuple[int, str, int]], carried: int | None
) -> None:
    hour = 5 * MICROS_PER_HOUR
    readings = [Reading(hour + t, e, Decimal(v) / 100) for t, e, v in raw]
    carried_value = None if carried is None else Decimal(carried) / 100
    direct = integrate(carried_value, readings, [Span(None, hour, hour + MICROS_PER_HOUR)])[0]
    assert hour_integral(carried_value, summarize_hour(hour, readings)) == direct
    assert summarize_hour(hour, readings).last_value == max(readings).value


def test_retention_never_drops_the_current_or_the_previous_month() -> None:
    today = date(2026, 1, 15)
    check_cutoff(2025, 12, today)  # drops November and before: allowed
    for year, month in ((2026, 1), (2026, 2)):
        with pytest.raises(ValueError, match="2025-12 or later"):
            check_cutoff(year, month, today)
