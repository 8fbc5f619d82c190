"""The inputs of use cases, as frozen values that validate themselves.

The API layer converts a request into one of these without judging it. The service first
checks who is asking (authorization before validation, AIP-211: a refused caller learns
nothing from the answer), then calls `validate()`, which raises one InvalidArgument naming
every bad field at once: the one validation convention for inputs. The limits checked here
are defined once, beside the values they limit (events, decimals, ranges), and imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.domain.aggregation import TimeBucket
from server.domain.decimals import PRICE_FRACTION_DIGITS, PRICE_INTEGER_DIGITS, check_decimal
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.events import MAX_DIMENSION_KEY_LENGTH, check_name, has_control
from server.domain.ranges import TimeRange, range_violations
from server.domain.timeutil import is_whole_hour

# How long a summary's range may be: hourly buckets over longer ranges would be too many.
MAX_SUMMARY_DAYS_HOURLY = 366
MAX_SUMMARY_DAYS = 3_660


@dataclass(frozen=True, slots=True)
class SummaryQuery:
    """What a usage summary covers: [start, end) on whole UTC hours, its buckets, grouping and meters."""

    start_micros: int | None
    end_micros: int | None
    bucket: TimeBucket = TimeBucket.NONE
    group_by_dimension: str = ""  # "" for no grouping
    meters: tuple[str, ...] = ()  # resource names of the meters to summarise besides the usage types
    # What to compute (a partial response, AIP-157): the usage types' aggregates, and the
    # values of `meters` (which are checked either way).
    with_aggregates: bool = True
    with_meter_values: bool = True

    def validate(self) -> TimeRange:
        """The range the summary covers, or InvalidArgument naming every bad field."""
        violations: list[FieldViolation] = []
        dimension = self.group_by_dimension
        if (
            len(dimension) > MAX_DIMENSION_KEY_LENGTH
            or dimension != dimension.strip()
            or has_control(dimension)
        ):
            violations.append(
                FieldViolation(
                    "group_by_dimension",
                    f"must be a dimension key of at most {MAX_DIMENSION_KEY_LENGTH} characters",
                )
            )
        violations += range_violations(
            self.start_micros,
            self.end_micros,
            start_field="start_time",
            end_field="end_time",
            max_days=MAX_SUMMARY_DAYS_HOURLY if self.bucket == TimeBucket.HOUR else MAX_SUMMARY_DAYS,
        )
        if violations or self.start_micros is None or self.end_micros is None:
            raise InvalidArgument(violations)
        return TimeRange(self.start_micros, self.end_micros)


@dataclass(frozen=True, slots=True)
class RateChange:
    """A new price for one service and usage type, from a time on (None: the next whole hour)."""

    service: str
    usage_type: str
    unit_price: str  # exact decimal text, as sent
    currency_code: str = ""  # "" for the rate card's currency
    effective_micros: int | None = None
    reprice_past_usage: bool = False  # the caller's consent to an effective time in the past

    def reprices_past_usage(self, now_micros: int) -> bool:
        """True if the change takes effect before `now_micros`, re-pricing usage already reported."""
        return self.effective_micros is not None and self.effective_micros < now_micros

    def validate(self, *, currency: str, now_micros: int) -> None:
        """InvalidArgument naming every bad field; `currency` is the rate card's."""
        violations: list[FieldViolation] = []
        for name, value in (("service", self.service), ("usage_type", self.usage_type)):
            if problem := check_name(value):
                violations.append(FieldViolation(name, problem))
        if problem := check_decimal(
            self.unit_price,
            max_integer_digits=PRICE_INTEGER_DIGITS,
            max_fraction_digits=PRICE_FRACTION_DIGITS,
        ):
            violations.append(FieldViolation("unit_price", problem))
        if self.currency_code and self.currency_code != currency:
            violations.append(FieldViolation("currency_code", f"must be the rate card's currency {currency}"))
        effective = self.effective_micros
        if effective is not None and (effective < 0 or not is_whole_hour(effective)):
            violations.append(FieldViolation("effective_time", "must be a whole UTC hour, not before 1970"))
        elif self.reprices_past_usage(now_micros) and not self.reprice_past_usage:
            violations.append(
                FieldViolation(
                    "effective_time",
                    "is in the past: it would re-price usage already reported; "
                    "set reprice_past_usage to do so, or give a time from the next hour on",
                )
            )
        if violations:
            raise InvalidArgument(violations)
