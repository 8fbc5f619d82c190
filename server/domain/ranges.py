"""Time ranges of summaries and invoice periods: required, ordered, on whole hours, bounded."""

from __future__ import annotations

from dataclasses import dataclass

from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.timeutil import MICROS_PER_DAY, is_whole_hour


@dataclass(frozen=True, slots=True)
class TimeRange:
    """[start_micros, end_micros), both whole UTC hours."""

    start_micros: int
    end_micros: int


def check_range(
    start_micros: int | None,
    end_micros: int | None,
    *,
    start_field: str,
    end_field: str,
    max_days: int,
) -> TimeRange:
    violations: list[FieldViolation] = []
    for name, value in ((start_field, start_micros), (end_field, end_micros)):
        if value is None:
            violations.append(FieldViolation(name, "is required"))
        elif value < 0:
            violations.append(FieldViolation(name, "must not be before 1970-01-01T00:00:00Z"))
        elif not is_whole_hour(value):
            violations.append(FieldViolation(name, "must be a whole UTC hour (usage is kept per hour)"))
    if violations:
        raise InvalidArgument(violations)
    assert start_micros is not None and end_micros is not None
    if end_micros <= start_micros:
        raise InvalidArgument.single(end_field, f"must be after {start_field}")
    if end_micros - start_micros > max_days * MICROS_PER_DAY:
        raise InvalidArgument.single(end_field, f"must be at most {max_days} days after {start_field}")
    return TimeRange(start_micros, end_micros)
