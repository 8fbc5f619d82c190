"""Validation of usage events, and their shaping into columns for one bulk insert.

An event is rejected for the first rule it breaks; the other events of its batch go
on. Event times must fall in a window around the server's clock (at most `max_age`
back, `max_future` ahead), as in every metering system: late usage would silently change
invoices already sent, and one stray timestamp would otherwise create storage for every
month since 1970. Older usage goes through an explicit backfill, which skips the age
limit and is audited (see server.metering).

Valid events are de-duplicated within the batch (the first occurrence wins, the
others count as duplicates). Columns for a write are sorted by (tenant_id, event_id):
concurrent transactions then take their row locks in the same order and cannot deadlock
on each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import NamedTuple, Protocol

from server.domain.access import Caller
from server.domain.decimals import QUANTITY_FRACTION_DIGITS, QUANTITY_INTEGER_DIGITS, check_decimal
from server.domain.errors import FieldViolation
from server.domain.timeutil import MICROS_PER_DAY, MICROS_PER_HOUR, MICROS_PER_SECOND, to_datetime

MAX_ID_LENGTH = 128
MAX_DIMENSIONS = 16
MAX_DIMENSION_KEY_LENGTH = 64
MAX_DIMENSION_VALUE_LENGTH = 256
# A service or usage type on the rate card (and so in every event that is accepted).
MAX_NAME_LENGTH = 64

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAME = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_NAME_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class RawEvent:
    """An event as the client sent it, already out of its protobuf."""

    tenant_id: str
    event_id: str
    service: str
    usage_type: str
    quantity: str
    time_micros: int | None  # None: the client left it unset, so the receive time applies
    dimensions: Mapping[str, str]
    time_error: str | None = None  # set by the edge when the timestamp itself is malformed


class IncomingBatch(Protocol):
    """A batch as it arrives on a stream: its size and flag are known before its events are decoded."""

    @property
    def size(self) -> int: ...

    @property
    def backfill(self) -> bool: ...

    def events(self) -> list[RawEvent]:
        """The batch's events, decoded (done once the batch's size has been accepted)."""
        ...


@dataclass(frozen=True, slots=True)
class EventRules:
    """Limits that every event and batch must keep (configurable per server)."""

    max_future_micros: int = 5 * 60 * MICROS_PER_SECOND
    max_batch_size: int = 10_000
    # 35 days, as Stripe's meter events: a month's usage can still arrive after its invoice
    # period has ended, and a late retry of a few days is never refused.
    max_age_micros: int = 35 * MICROS_PER_DAY


class UsageTypeCatalog(Protocol):
    """Which (service, usage_type) pairs are priced, and from when."""

    def first_effective(self, service: str, usage_type: str) -> int | None:
        """Micros of the first rate's effective time, or None for an unknown usage type."""
        ...


class RejectionCause(Enum):
    INVALID = "invalid"  # the event breaks a rule; fix it before resending
    PERMISSION_DENIED = "permission_denied"  # the caller may not report usage for its tenant


# The same reason for every tenant the caller may not act for, existing or not.
NOT_YOUR_TENANT = "the caller may not report usage for this tenant"


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event that was not recorded, and why."""

    index: int
    event_id: str
    field: str
    reason: str
    cause: RejectionCause = RejectionCause.INVALID


@dataclass(slots=True)
class EventColumns:
    """Valid, distinct events as parallel columns, sorted by (tenant_id, event_id)."""

    tenant_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    usage_types: list[str] = field(default_factory=list)
    quantities: list[str] = field(default_factory=list)
    times_micros: list[int] = field(default_factory=list)
    dimensions_json: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.event_ids)


# An event's idempotency key: (tenant_id, event_id).
EventKey = tuple[str, str]


class EventRow(NamedTuple):
    """A valid event as it is stored: one row of EventColumns (a tuple, cheap on the hot path)."""

    tenant_id: str
    event_id: str
    service: str
    usage_type: str
    quantity: str  # exact decimal text, as validated
    time_micros: int
    dimensions_json: str

    @property
    def key(self) -> EventKey:
        return (self.tenant_id, self.event_id)


@dataclass(frozen=True, slots=True)
class ValidatedBatch:
    rows: dict[EventKey, EventRow]  # distinct valid events, first occurrence of each key
    rejections: list[Rejection]
    repeated_in_batch: int  # valid events whose key appeared earlier in the same batch
    # Who asked for this batch to be backfilled (it is audited); None for usage in the window.
    backfill_by: Caller | None = None


def has_control(value: str) -> bool:
    return _CONTROL.search(value) is not None


def check_id(value: str) -> str | None:
    """Why `value` is not an acceptable tenant or event id, or None."""
    if not value:
        return "is required"
    if len(value) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    if _CONTROL.search(value):
        return "contains a control character"
    if value != value.strip():
        return "has leading or trailing white space"
    return None


def check_name(value: str) -> str | None:
    """Why `value` is not an acceptable service or usage type for the rate card, or None."""
    if not _NAME.fullmatch(value):
        return f"must be 1 to {MAX_NAME_LENGTH} characters of A-Z, a-z, 0-9, '_', '.', '-'"
    return None


def _check_dimensions(dimensions: Mapping[str, str]) -> FieldViolation | None:
    if len(dimensions) > MAX_DIMENSIONS:
        return FieldViolation("dimensions", f"has more than {MAX_DIMENSIONS} entries")
    for key, value in dimensions.items():
        if not key or len(key) > MAX_DIMENSION_KEY_LENGTH or _CONTROL.search(key):
            return FieldViolation(
                "dimensions",
                f"key {key[:70]!r} must be 1 to {MAX_DIMENSION_KEY_LENGTH} characters"
                " without control characters",
            )
        if len(value) > MAX_DIMENSION_VALUE_LENGTH or _CONTROL.search(value):
            return FieldViolation(
                f"dimensions[{key}]",
                f"must be at most {MAX_DIMENSION_VALUE_LENGTH} characters without control characters",
            )
    return None


def _span(micros: int) -> str:
    """A duration for people: "35 days", "12 hours" or "90 s"."""
    for unit, name in ((MICROS_PER_DAY, "days"), (MICROS_PER_HOUR, "hours")):
        if micros % unit == 0:
            return f"{micros // unit} {name}"
    return f"{micros // MICROS_PER_SECOND} s"


def check_event(
    event: RawEvent, catalog: UsageTypeCatalog, rules: EventRules, now_micros: int, *, backfill: bool = False
) -> list[FieldViolation]:
    """Every rule the event breaks, in field order (empty if it is valid).

    A backfill accepts times older than the window; every other rule still holds.
    """
    violations: list[FieldViolation] = []
    if problem := check_id(event.tenant_id):
        violations.append(FieldViolation("tenant_id", problem))
    if problem := check_id(event.event_id):
        violations.append(FieldViolation("event_id", problem))
    first_effective = catalog.first_effective(event.service, event.usage_type)
    if not event.service:
        violations.append(FieldViolation("service", "is required"))
    if not event.usage_type:
        violations.append(FieldViolation("usage_type", "is required"))
    if event.service and event.usage_type and first_effective is None:
        violations.append(
            FieldViolation(
                "usage_type",
                f"{event.service}/{event.usage_type} is not on the rate card (see BillingService.ListRates)",
            )
        )
    if problem := check_decimal(
        event.quantity,
        max_integer_digits=QUANTITY_INTEGER_DIGITS,
        max_fraction_digits=QUANTITY_FRACTION_DIGITS,
    ):
        violations.append(FieldViolation("quantity", problem))
    if event.time_error is not None:
        violations.append(FieldViolation("event_time", event.time_error))
    elif event.time_micros is not None:
        if event.time_micros > now_micros + rules.max_future_micros:
            ahead = rules.max_future_micros // MICROS_PER_SECOND
            violations.append(
                FieldViolation("event_time", f"is more than {ahead} s ahead of the server's clock")
            )
        elif not backfill and event.time_micros < now_micros - rules.max_age_micros:
            violations.append(
                FieldViolation(
                    "event_time",
                    f"is more than {_span(rules.max_age_micros)} before the server's clock; older usage "
                    "must be backfilled (IngestUsage or StreamUsage with backfill set, scope usage:backfill)",
                )
            )
        elif first_effective is not None and event.time_micros < first_effective:
            violations.append(
                FieldViolation(
                    "event_time",
                    f"is before the first rate of {event.service}/{event.usage_type} took effect "
                    f"({to_datetime(first_effective).isoformat()})",
                )
            )
    if dimension_problem := _check_dimensions(event.dimensions):
        violations.append(dimension_problem)
    return violations


def _dimensions_json(dimensions: Mapping[str, str]) -> str:
    if not dimensions:
        return "{}"
    return json.dumps(dict(dimensions), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def event_row(event: RawEvent, now_micros: int) -> EventRow:
    """A valid event as one row of EventColumns (the receive time fills a missing time)."""
    return EventRow(
        event.tenant_id,
        event.event_id,
        event.service,
        event.usage_type,
        event.quantity,
        now_micros if event.time_micros is None else event.time_micros,
        _dimensions_json(event.dimensions),
    )


def columns_of(rows: Mapping[EventKey, EventRow]) -> EventColumns:
    """Distinct rows by key, as columns in key order."""
    columns = EventColumns()
    for key in sorted(rows):
        tenant_id, event_id, service, usage_type, quantity, time_micros, dimensions = rows[key]
        columns.tenant_ids.append(tenant_id)
        columns.event_ids.append(event_id)
        columns.services.append(service)
        columns.usage_types.append(usage_type)
        columns.quantities.append(quantity)
        columns.times_micros.append(time_micros)
        columns.dimensions_json.append(dimensions)
    return columns


def validate_batch(
    events: Sequence[RawEvent],
    catalog: UsageTypeCatalog,
    rules: EventRules,
    now_micros: int,
    may_act_for: Callable[[str], bool] = lambda tenant_id: True,
    *,
    backfill: bool = False,
) -> ValidatedBatch:
    """Split a batch into distinct valid rows and rejections (see the module docstring).

    An event for a tenant the caller may not act for is rejected with PERMISSION_DENIED
    before any other check, so that nothing about that tenant is looked at or revealed.
    """
    rejections: list[Rejection] = []
    rows: dict[EventKey, EventRow] = {}
    repeated = 0
    for index, event in enumerate(events):
        if check_id(event.tenant_id) is None and not may_act_for(event.tenant_id):
            rejections.append(
                Rejection(
                    index, event.event_id, "tenant_id", NOT_YOUR_TENANT, RejectionCause.PERMISSION_DENIED
                )
            )
            continue
        violations = check_event(event, catalog, rules, now_micros, backfill=backfill)
        if violations:
            first = violations[0]
            rejections.append(Rejection(index, event.event_id, first.field, first.description))
            continue
        key = (event.tenant_id, event.event_id)
        if key in rows:
            repeated += 1
            continue
        rows[key] = event_row(event, now_micros)
    return ValidatedBatch(rows, rejections, repeated)


@dataclass(frozen=True, slots=True)
class CancelledEvent:
    """A cancelled event as it was recorded, and when it was cancelled."""

    tenant_id: str
    event_id: str
    service: str
    usage_type: str
    quantity: Decimal
    event_time: datetime
    dimensions: dict[str, str]
    cancel_time: datetime
