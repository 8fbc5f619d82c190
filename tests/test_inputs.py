"""Inputs validate themselves: one InvalidArgument naming every bad field at once (server.domain.inputs)."""

from __future__ import annotations

import pytest

from server.domain.aggregation import TimeBucket
from server.domain.errors import InvalidArgument
from server.domain.events import MAX_DIMENSION_KEY_LENGTH
from server.domain.inputs import MAX_SUMMARY_DAYS_HOURLY, RateChange, SummaryQuery
from server.domain.ranges import TimeRange
from server.domain.timeutil import MICROS_PER_DAY, MICROS_PER_HOUR

HOUR = MICROS_PER_HOUR
NOW = 1_000 * HOUR


def violations(error: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in error.value.violations}


def test_a_valid_summary_query_gives_its_range() -> None:
    assert SummaryQuery(2 * HOUR, 5 * HOUR, TimeBucket.DAY, "region").validate() == TimeRange(
        2 * HOUR, 5 * HOUR
    )


def test_a_summary_query_names_every_bad_field_at_once() -> None:
    query = SummaryQuery(None, HOUR + 1, TimeBucket.HOUR, "x" * (MAX_DIMENSION_KEY_LENGTH + 1))
    with pytest.raises(InvalidArgument) as raised:
        query.validate()
    assert set(violations(raised)) == {"start_time", "end_time", "group_by_dimension"}


def test_a_summary_range_out_of_order_is_named_beside_a_bad_dimension() -> None:
    with pytest.raises(InvalidArgument) as raised:
        SummaryQuery(5 * HOUR, 2 * HOUR, TimeBucket.NONE, " padded").validate()
    assert violations(raised) == {
        "group_by_dimension": f"must be a dimension key of at most {MAX_DIMENSION_KEY_LENGTH} characters",
        "end_time": "must be after start_time",
    }


def test_hourly_buckets_have_a_shorter_range_limit() -> None:
    end = MAX_SUMMARY_DAYS_HOURLY * MICROS_PER_DAY + HOUR
    SummaryQuery(0, end, TimeBucket.DAY).validate()
    with pytest.raises(InvalidArgument) as raised:
        SummaryQuery(0, end, TimeBucket.HOUR).validate()
    assert list(violations(raised)) == ["end_time"]


def test_a_valid_rate_change_passes_and_says_whether_it_reprices() -> None:
    change = RateChange("api", "calls", "0.25", "USD", NOW + HOUR)
    change.validate(currency="USD", now_micros=NOW)
    assert not change.reprices_past_usage(NOW)
    past = RateChange("api", "calls", "0.25", effective_micros=NOW - HOUR, reprice_past_usage=True)
    past.validate(currency="USD", now_micros=NOW)
    assert past.reprices_past_usage(NOW)


def test_a_rate_change_names_every_bad_field_at_once() -> None:
    change = RateChange("bad name", "", "-1", "EUR", NOW + 1)
    with pytest.raises(InvalidArgument) as raised:
        change.validate(currency="USD", now_micros=NOW)
    assert set(violations(raised)) == {
        "service",
        "usage_type",
        "unit_price",
        "currency_code",
        "effective_time",
    }


def test_a_past_effective_time_needs_consent() -> None:
    change = RateChange("api", "calls", "1", effective_micros=NOW - HOUR)
    with pytest.raises(InvalidArgument) as raised:
        change.validate(currency="USD", now_micros=NOW)
    assert "re-price usage already reported" in violations(raised)["effective_time"]
