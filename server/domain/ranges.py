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


def range_violations(
    start_micros: int | None,
    end_micros: int | None,
    *,
    start_field: str,
    end_field: str,
    max_days: int,
) -> list[FieldViolation]:
    """Every rule the range breaks (its order and length only once both ends are valid)."""
    violations: list[FieldViolation] = []
    for name, value in ((start_field, start_micros), (end_field, end_micros)):
        if value is None:
            violations.append(FieldViolation(name, "is required"))
        elif value < 0:
            violations.append(FieldViolation(name, "must not be before 1970-01-01T00:00:00Z"))
        elif not is_whole_hour(value):
            violations.append(FieldViolation(name, "must be a whole UTC hour (usage is kept per hour)"))
    if violations or start_micros is None or end_micros is None:
        return violations
    if end_micros <= start_micros:
        violations.append(FieldViolation(end_field, f"must be after {start_field}"))
    elif end_micros - start_micros > max_days * MICROS_PER_DAY:
        violations.append(FieldViolation(end_field, f"must be at most {max_days} days after {start_field}"))
    return violations


def check_range(
    start_micros: int | None,
    end_micros: int | None,
    *,
    start_field: str,
    end_field: str,
    max_days: int,
) -> TimeRange:
    """The range, or InvalidArgument naming every rule it breaks."""
    violations = range_violations(
        start_micros, end_micros, start_field=start_field, end_field=end_field, max_days=max_days
    )
    if violations or start_micros is None or end_micros is None:
        raise InvalidArgument(violations)
    return TimeRange(start_micros, end_micros)
