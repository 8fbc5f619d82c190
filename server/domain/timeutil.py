"""Time values: microseconds since the Unix epoch (UTC) inside Tally, whole hours at the edges.

Usage is rolled up per UTC hour, so every range that reads rollups (summaries, invoice
periods, rate changes) must start and end on an hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

MICROS_PER_SECOND = 1_000_000
MICROS_PER_HOUR = 3600 * MICROS_PER_SECOND
MICROS_PER_DAY = 24 * MICROS_PER_HOUR
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_datetime(micros: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime."""
    return EPOCH + timedelta(microseconds=micros)


def to_micros(value: datetime) -> int:
    """An aware datetime as microseconds since the epoch, exactly (no float on the way)."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * MICROS_PER_SECOND + delta.microseconds


def is_whole_hour(micros: int) -> bool:
    """True if `micros` falls on a UTC hour."""
    return micros % MICROS_PER_HOUR == 0


def next_hour(micros: int) -> int:
    """The first whole hour strictly after `micros`."""
    return (micros // MICROS_PER_HOUR + 1) * MICROS_PER_HOUR
