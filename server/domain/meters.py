"""Meters: what a tenant's events are aggregated into, and which events each meter reads.

A meter reads the events of one (service, usage_type) whose dimensions include all of its
`filter` entries, and aggregates them with one of seven aggregations. SUM and COUNT are
computed from the hourly rollups that every event already updates (they hold every
dimension), so they cost ingestion nothing. The other five store what they need per
event (see `contributions`): live batches from the meter's creation on, and a backfill
(server.storage.backfill) for the events recorded before it, while the meter is BACKFILLING.

This module is pure: the validation of a new meter, and the precomputed map that turns a
batch of event rows into the rows each non-additive meter stores.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from server.domain.decimals import canonical_quantity
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.events import (
    MAX_DIMENSION_KEY_LENGTH,
    MAX_DIMENSION_VALUE_LENGTH,
    MAX_DIMENSIONS,
    EventRow,
    check_name,
)
from server.domain.timeutil import MICROS_PER_HOUR

METERS = "meters/"
# AIP-122 resource id: lower case letters, digits and hyphens, starting with a letter.
_METER_ID = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_GROUP_BY = 4
MAX_DESCRIPTION = 1_024


class Aggregation(enum.StrEnum):
    """How a meter combines its events' quantities (or counts them).

    SUM, COUNT, MAX, MIN and LATEST are quantities or event counts; UNIQUE_COUNT counts
    distinct values; TIME_WEIGHTED integrates a gauge over time, in unit-hours.
    """

    SUM = "sum"
    COUNT = "count"
    MAX = "max"
    MIN = "min"
    LATEST = "latest"
    UNIQUE_COUNT = "unique_count"
    TIME_WEIGHTED = "time_weighted"

    @property
    def additive(self) -> bool:
        """Computed from the rollups that every event updates: no storage of its own."""
        return self in (Aggregation.SUM, Aggregation.COUNT)


class MeterState(enum.StrEnum):
    """A meter's state: counting unless archived; a new one is first rebuilt from earlier events."""

    BACKFILLING = "backfilling"  # counts new events, and is being rebuilt from the earlier ones
    ACTIVE = "active"
    ARCHIVED = "archived"

    @property
    def counting(self) -> bool:
        """Whether batches add their events to the meter."""
        return self is not MeterState.ARCHIVED


def initial_state(aggregation: Aggregation) -> MeterState:
    """SUM and COUNT read the rollups, which hold every event; the others must be rebuilt first."""
    return MeterState.ACTIVE if aggregation.additive else MeterState.BACKFILLING


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """How far a meter's rebuild from the events recorded before its creation has come."""

    scanned_events: int  # recorded events read so far, of every usage type
    counted_events: int  # of those, the events the meter counts
    end_time: datetime | None  # when it finished; None while backfilling, and for SUM and COUNT


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """A meter as a client defines it."""

    meter_id: str  # the {meter} of "meters/{meter}"
    service: str
    usage_type: str
    aggregation: Aggregation
    filter: Mapping[str, str] = field(default_factory=dict)
    value_dimension: str = ""  # UNIQUE_COUNT of this dimension; "" counts distinct quantities
    group_by: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class Meter:
    """A stored meter. `id` is its internal key in the aggregation tables."""

    id: int
    spec: MeterSpec
    state: MeterState
    create_time: datetime
    archive_time: datetime | None
    backfill: BackfillProgress = BackfillProgress(0, 0, None)

    @property
    def name(self) -> str:
        """The meter's resource name, "meters/{meter}"."""
        return meter_name(self.spec.meter_id)

    def may_group_by(self, dimension: str) -> bool:
        """SUM and COUNT read rollups that hold every dimension; the others store only their group-by ones."""
        return not dimension or self.spec.aggregation.additive or dimension in self.spec.group_by


def meter_name(meter_id: str) -> str:
    """The resource name "meters/{meter}" of `meter_id`."""
    return f"{METERS}{meter_id}"


def parse_meter_name(name: str, field: str = "name") -> str:
    """The {meter} of "meters/{meter}"; InvalidArgument naming `field` otherwise."""
    meter_id = name[len(METERS) :] if name.startswith(METERS) else ""
    if not _METER_ID.fullmatch(meter_id):
        raise InvalidArgument.single(
            field,
            "must be a resource name of the form 'meters/{meter}', {meter} being 1 to 63 lower-case"
            " letters, digits and hyphens, starting with a letter",
        )
    return meter_id


def _check_dimension_key(key: str) -> str | None:
    if not key or len(key) > MAX_DIMENSION_KEY_LENGTH or key != key.strip() or not key.isprintable():
        return f"must be a dimension key of 1 to {MAX_DIMENSION_KEY_LENGTH} printable characters"
    return None


def check_spec(spec: MeterSpec, field_prefix: str = "meter.") -> None:
    """InvalidArgument listing every rule the definition breaks."""
    violations: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        violations.append(FieldViolation(f"{field_prefix}{name}", description))

    if not _METER_ID.fullmatch(spec.meter_id):
        bad("meter_id", "must be 1 to 63 lower-case letters, digits and hyphens, starting with a letter")
    for name, value in (("service", spec.service), ("usage_type", spec.usage_type)):
        if problem := check_name(value):
            bad(name, problem)
    if len(spec.filter) > MAX_DIMENSIONS:
        bad("filter", f"has more than {MAX_DIMENSIONS} entries")
    for key, value in spec.filter.items():
        if problem := _check_dimension_key(key):
            bad("filter", f"key {key[:70]!r} {problem}")
        elif len(value) > MAX_DIMENSION_VALUE_LENGTH or not value.isprintable():
            bad(f"filter[{key}]", f"must be at most {MAX_DIMENSION_VALUE_LENGTH} printable characters")
    if spec.value_dimension:
        if spec.aggregation is not Aggregation.UNIQUE_COUNT:
            bad("value_dimension", "is only for UNIQUE_COUNT meters")
        elif problem := _check_dimension_key(spec.value_dimension):
            bad("value_dimension", problem)
    if len(spec.group_by) > MAX_GROUP_BY:
        bad("group_by_dimensions", f"has more than {MAX_GROUP_BY} entries")
    if len(set(spec.group_by)) != len(spec.group_by):
        bad("group_by_dimensions", "lists a dimension twice")
    for key in spec.group_by:
        if problem := _check_dimension_key(key):
            bad("group_by_dimensions", f"{key[:70]!r} {problem}")
    if len(spec.description) > MAX_DESCRIPTION or not spec.description.isprintable():
        bad("description", f"must be at most {MAX_DESCRIPTION} printable characters")
    if violations:
        raise InvalidArgument(violations)


def _json(values: Mapping[str, str]) -> str:
    """Canonical JSON (sorted keys, compact), as the event rows' dimensions are."""
    if not values:
        return "{}"
    return json.dumps(dict(values), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@dataclass(slots=True)
class Contributions:
    """What a batch adds to the non-additive meters, as parallel columns (one entry per event and meter).

    `kinds` says which table the entry goes to: "v" MAX/MIN/LATEST values, "u" UNIQUE_COUNT
    values, "r" TIME_WEIGHTED readings. Only entries whose event turns out to be new are stored.
    """

    tenant_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    meter_ids: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    group_values: list[str] = field(default_factory=list)
    times_micros: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.event_ids)

    def columns(self) -> tuple[list[str], list[str], list[int], list[str], list[str], list[str], list[int]]:
        """The columns in the order the statements that store them take them (CONTRIB_FROM)."""
        return (
            self.tenant_ids,
            self.event_ids,
            self.meter_ids,
            self.kinds,
            self.values,
            self.group_values,
            self.times_micros,
        )


_KINDS = {
    Aggregation.MAX: "v",
    Aggregation.MIN: "v",
    Aggregation.LATEST: "v",
    Aggregation.UNIQUE_COUNT: "u",
    Aggregation.TIME_WEIGHTED: "r",
}


@dataclass(frozen=True, slots=True)
class Contribution:
    """One event's entry for one meter (see Contributions)."""

    meter_id: int
    kind: str
    value: str
    group_values: str


def contribution(meter: Meter, dimensions: Mapping[str, str], quantity: str) -> Contribution | None:
    """What the event adds to the non-additive meter, or None if the meter does not read it.

    The caller has matched service and usage type; this checks the filter and, for a
    UNIQUE_COUNT of a dimension, that the event carries that dimension.
    """
    shape = _shape(meter, dimensions)
    return None if shape is None else _entry(meter, shape, quantity)


# What a meter takes from an event's dimensions alone: its group JSON, and the value of
# its value dimension (UNIQUE_COUNT of a dimension; None otherwise). None: not read.
_Shape = tuple[str, str | None]


def _shape(meter: Meter, dimensions: Mapping[str, str]) -> _Shape | None:
    spec = meter.spec
    for key, wanted in spec.filter.items():
        if dimensions.get(key) != wanted:
            return None
    value: str | None = None
    if spec.aggregation is Aggregation.UNIQUE_COUNT and spec.value_dimension:
        value = dimensions.get(spec.value_dimension)
        if value is None:
            return None
    return _json({key: dimensions[key] for key in spec.group_by if key in dimensions}), value


def _entry(meter: Meter, shape: _Shape, quantity: str) -> Contribution:
    group_values, value = shape
    if value is None:
        value = _value_of(meter, quantity)
    return Contribution(meter.id, _KINDS[meter.spec.aggregation], value, group_values)


def _value_of(meter: Meter, quantity: str) -> str:
    """The value a meter without a value dimension stores: the event's quantity."""
    if meter.spec.aggregation is Aggregation.UNIQUE_COUNT:
        return canonical_quantity(quantity)  # "1.50" and "1.5" are one value
    return quantity


# How a batch's events of one dimension set reach one meter, worked out once per batch:
# (meter id, kind, group JSON, the value of its value dimension or None, whether a value
# taken from the quantity is canonicalised). None: the meter does not read them.
_Plan = tuple[int, str, str, str | None, bool]


def _plan(meter: Meter, dimensions_json: str) -> _Plan | None:
    shape = _shape(meter, json.loads(dimensions_json) if dimensions_json != "{}" else {})
    if shape is None:
        return None
    aggregation = meter.spec.aggregation
    return meter.id, _KINDS[aggregation], shape[0], shape[1], aggregation is Aggregation.UNIQUE_COUNT


class MeterMap:
    """The counting non-additive meters by (service, usage_type), for matching a batch in one pass.

    A BACKFILLING meter is matched too: the backfill covers only what came before it.
    """

    def __init__(self, meters: Iterable[Meter]) -> None:
        self._by_type: dict[tuple[str, str], list[Meter]] = {}
        for meter in meters:
            if meter.state.counting and not meter.spec.aggregation.additive:
                self._by_type.setdefault((meter.spec.service, meter.spec.usage_type), []).append(meter)

    def __bool__(self) -> bool:
        return bool(self._by_type)

    def contributions(self, rows: Sequence[EventRow]) -> Contributions:
        """The entries of these event rows (in their order) for every meter that reads them."""
        found = Contributions()
        if not self._by_type:
            return found
        # A batch repeats a few dimension sets (regions, plans...): what a meter takes from
        # one is worked out once per batch, not parsed and serialised again for every event.
        # This loop runs for every event of every batch, hence the local names.
        plans: dict[tuple[int, str], _Plan | None] = {}
        by_type = self._by_type
        tenant_ids, event_ids, meter_ids = found.tenant_ids, found.event_ids, found.meter_ids
        kinds, values, groups, times = found.kinds, found.values, found.group_values, found.times_micros
        for tenant_id, event_id, service, usage_type, quantity, time_micros, dimensions_json in rows:
            meters = by_type.get((service, usage_type))
            if not meters:
                continue
            for meter in meters:
                key = (meter.id, dimensions_json)
                if key in plans:
                    plan = plans[key]
                else:
                    plan = plans[key] = _plan(meter, dimensions_json)
                if plan is None:
                    continue
                meter_id, kind, group_values, value, canonical = plan
                if value is None:
                    value = canonical_quantity(quantity) if canonical else quantity
                tenant_ids.append(tenant_id)
                event_ids.append(event_id)
                meter_ids.append(meter_id)
                kinds.append(kind)
                values.append(value)
                groups.append(group_values)
                times.append(time_micros)
        return found


def hour_of(micros: int) -> int:
    """The start of the UTC hour that holds `micros`."""
    return micros - micros % MICROS_PER_HOUR
