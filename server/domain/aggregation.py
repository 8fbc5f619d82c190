"""Pure arithmetic of meter aggregations: time buckets, range decomposition, time-weighted integrals.

Times are microseconds since the epoch, UTC; ranges are [start, end) on whole hours.

- Buckets: a summary's hour, day or month buckets are labelled by their UTC start; the
  first and last may be cut by the range (a day bucket of a range starting at 10:00 covers
  10:00 to midnight).
- Decomposition: a range as whole UTC months, whole days and edge hours, the fewest
  pieces, so that an exact distinct count over any range reads the distinct values of at
  most ~2 + 2 x 30 + 2 x 23 stored buckets instead of one per hour.
- Time-weighted integral: each reading of a gauge holds from its time until the next
  reading (readings ordered by time, then event id); the last reading before a window
  carries into it; before the first reading the value is zero. The integral is exact in
  unit-microseconds (value x duration) and given in unit-hours, rounded half-even to
  TIME_WEIGHTED_DIGITS decimal places (an hour is 3.6e9 microseconds, whose factor 9 makes
  most quotients non-terminating).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal
from enum import StrEnum
from typing import NamedTuple

from server.domain.timeutil import MICROS_PER_DAY, MICROS_PER_HOUR, to_datetime, to_micros

TIME_WEIGHTED_DIGITS = 12
_EXACT = Context(prec=200, rounding=ROUND_HALF_EVEN)
_HOUR = Decimal(MICROS_PER_HOUR)
_QUANTUM = Decimal(1).scaleb(-TIME_WEIGHTED_DIGITS)


class TimeBucket(StrEnum):
    """The buckets a summary can be split into; NONE is the whole range as one total."""

    NONE = ""
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


def _month_start(micros: int) -> int:
    moment = to_datetime(micros)
    return to_micros(datetime(moment.year, moment.month, 1, tzinfo=UTC))


def _next_month(micros: int) -> int:
    moment = to_datetime(micros)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return to_micros(datetime(year, month, 1, tzinfo=UTC))


def month_bounds(micros: int) -> tuple[int, int]:
    """[start, end) of the UTC month holding `micros`."""
    start = _month_start(micros)
    return start, _next_month(start)


def day_bit(micros: int) -> int:
    """The bit of the UTC day holding `micros` in a month's mask of days: 1 << (day of month - 1).

    UNIQUE_COUNT keeps each value's days of a month as such a mask (meter_distinct_months).
    """
    return 1 << (to_datetime(micros).day - 1)


def bucket_start(micros: int, bucket: TimeBucket) -> int:
    """The start of the bucket holding `micros`; TimeBucket.NONE has none (it is the caller's range)."""
    if bucket == TimeBucket.HOUR:
        return micros - micros % MICROS_PER_HOUR
    if bucket == TimeBucket.DAY:
        return micros - micros % MICROS_PER_DAY
    if bucket == TimeBucket.MONTH:
        return _month_start(micros)
    raise ValueError(bucket)


def _bucket_end(start: int, bucket: TimeBucket) -> int:
    if bucket == TimeBucket.HOUR:
        return start + MICROS_PER_HOUR
    if bucket == TimeBucket.DAY:
        return start + MICROS_PER_DAY
    return _next_month(start)


class Span(NamedTuple):
    """The part [start, end) of a summary's range that one bucket covers, and the bucket's label."""

    label: int | None  # bucket start in micros; None when the summary has no buckets
    start: int
    end: int


def spans(start: int, end: int, bucket: TimeBucket) -> list[Span]:
    """The summary's buckets over [start, end), in order."""
    if bucket == TimeBucket.NONE:
        return [Span(None, start, end)]
    found = []
    label = bucket_start(start, bucket)
    while label < end:
        following = _bucket_end(label, bucket)
        found.append(Span(label, max(start, label), min(end, following)))
        label = following
    return found


class Piece(NamedTuple):
    """One part of a range as `decompose` cuts it: a whole UTC month, day or hour, [start, end).

    UNIQUE_COUNT counts values at these three grains (meter_unique_counts), and keeps them
    per hour and per month with the month's days (meter_distinct_hours and _months).
    """

    grain: str  # "h" hour, "d" UTC day, "m" UTC month
    start: int
    end: int


def decompose(start: int, end: int) -> list[Piece]:
    """[start, end) (whole hours) as whole months, whole days and edge hours, in time order."""
    pieces: list[Piece] = []
    at = start
    while at < end:
        if at == _month_start(at) and _next_month(at) <= end:
            pieces.append(Piece("m", at, _next_month(at)))
        elif at % MICROS_PER_DAY == 0 and at + MICROS_PER_DAY <= end:
            pieces.append(Piece("d", at, at + MICROS_PER_DAY))
        else:
            pieces.append(Piece("h", at, at + MICROS_PER_HOUR))
        at = pieces[-1].end
    return pieces


class Reading(NamedTuple):
    """One value of a TIME_WEIGHTED series: the event's time (microseconds), its id and value.

    `integrate` takes them in (time, event_id) order, so readings at the same time give the
    same series however they arrived.
    """

    time: int
    event_id: str
    value: Decimal


def unit_hours(unit_micros: Decimal) -> Decimal:
    """unit-microseconds as unit-hours, rounded half-even to TIME_WEIGHTED_DIGITS places."""
    return _EXACT.divide(unit_micros, _HOUR).quantize(_QUANTUM, rounding=ROUND_HALF_EVEN, context=_EXACT)


def integrate(carried: Decimal | None, readings: Sequence[Reading], parts: Iterable[Span]) -> list[Decimal]:
    """The exact integral (unit-microseconds) of one series over each span.

    `carried` is the value of the last reading before the first span (None: no reading,
    zero); `readings` are the readings from the first span's start to the last span's end,
    in (time, event_id) order. Spans are in order and do not overlap.
    """
    ordered = sorted(readings)
    results = []
    index = 0
    value = carried if carried is not None else Decimal(0)
    for part in parts:
        total = Decimal(0)
        at = part.start
        # Readings before this span (between spans) still change the value carried.
        while index < len(ordered) and ordered[index].time < part.start:
            value = ordered[index].value
            index += 1
        while index < len(ordered) and ordered[index].time < part.end:
            reading = ordered[index]
            total = _EXACT.add(total, _EXACT.multiply(value, Decimal(reading.time - at)))
            at = reading.time
            value = reading.value
            index += 1
        total = _EXACT.add(total, _EXACT.multiply(value, Decimal(part.end - at)))
        results.append(total)
    return results


class HourSummary(NamedTuple):
    """What one hour of one series contributes, given the value carried into it.

    `inner` is the integral (unit-microseconds) from the hour's first reading to the
    hour's end, using only the hour's readings; `first_time` and `last_value` let a later
    query compose hours without reading their readings again.
    """

    hour: int
    first_time: int
    inner: Decimal
    last_value: Decimal


def summarize_hour(hour: int, readings: Sequence[Reading]) -> HourSummary:
    """The HourSummary of an hour with at least one reading."""
    ordered = sorted(readings)
    inner = integrate(ordered[0].value, ordered[1:], [Span(None, ordered[0].time, hour + MICROS_PER_HOUR)])[0]
    return HourSummary(hour, ordered[0].time, inner, ordered[-1].value)


def hour_integral(carried: Decimal | None, summary: HourSummary) -> Decimal:
    """The integral over the whole hour of a summarized hour, given the value carried into it."""
    before = (carried or Decimal(0)) * Decimal(summary.first_time - summary.hour)
    return _EXACT.add(before, summary.inner)
