"""Plans, billing profiles and billing periods: plain values and the pure rules between them.

A plan is a named, versioned set of charges in one currency. Each usage charge prices
either the summed quantity of one (service, usage_type) (`UsageTypeRef`) or one meter's
aggregate over the period (`MeterRef`, any aggregation). The default plan, "default", is
the rate card itself: one per-unit charge per usage type, edited with SetRate.

A tenant's billing profile puts it on a plan from a time on (the plan history), with a
billing anchor: periods run from the anchor day of one month to the anchor day of the
next, 00:00 UTC; day 1 is the calendar month, and days 29-31 fall on the last day of
shorter months. Periods are billed from the profile's billing start on, never back
through history; the first period may be shorter, and flat fees are then prorated by
the hour against the full period.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from server.domain.charges import Charge, ChargeModel, FlatFee
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.meters import MeterState, meter_name

DEFAULT_PLAN = "default"
_PLAN_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
MAX_DISPLAY_NAME_CHARS = 200


def check_plan_id(plan_id: str) -> str | None:
    """Why a plan id is not acceptable (AIP-122 style: lower case, digits, '-'), or None."""
    if not _PLAN_ID.fullmatch(plan_id):
        return "must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter"
    return None


@dataclass(frozen=True, slots=True)
class UsageTypeRef:
    """What a usage charge measures: the summed quantity of one (service, usage_type)."""

    service: str
    usage_type: str


@dataclass(frozen=True, slots=True)
class MeterRef:
    """What a meter charge measures: the meter's aggregate over each priced window.

    The aggregate is over all of the meter's groups (a meter's group_by_dimensions split
    its summaries, not its price), computed over the whole window by the meter's own
    aggregation: never a sum of hourly or daily values, which would be wrong for
    UNIQUE_COUNT, MAX, MIN, LATEST and TIME_WEIGHTED.
    """

    meter_id: str  # the {meter} of "meters/{meter}"


Measures = UsageTypeRef | MeterRef


@dataclass(frozen=True, slots=True)
class PlanCharge:
    """A charge of a plan and what it measures (None for a flat fee, which measures nothing)."""

    charge: Charge
    measures: Measures | None

    def __post_init__(self) -> None:
        if isinstance(self.charge.model, FlatFee) and self.measures is not None:
            field = "meter" if isinstance(self.measures, MeterRef) else "usage_type"
            raise InvalidArgument.single(field, "must be unset on a flat fee, which measures nothing")
        if not isinstance(self.charge.model, FlatFee) and self.measures is None:
            raise InvalidArgument.single(
                "usage_type", "is required on a usage charge, unless it prices a meter (meter)"
            )


def meter_ids_of(charges: Sequence[PlanCharge]) -> list[str]:
    """The meters the charges price, each once, sorted."""
    return sorted({c.measures.meter_id for c in charges if isinstance(c.measures, MeterRef)})


def check_meter_refs(
    charges: Sequence[PlanCharge], states: Mapping[str, MeterState], field: str = "charges"
) -> None:
    """Each meter charge names a meter that exists (`states` has it) and still counts (not archived).

    A plan version may not be built on a meter that counts nothing new: it would price
    a value frozen at its archiving. (A meter archived after the version was created
    keeps being priced with what it counted.)
    """
    violations: list[FieldViolation] = []
    for index, plan_charge in enumerate(charges):
        if not isinstance(plan_charge.measures, MeterRef):
            continue
        name = meter_name(plan_charge.measures.meter_id)
        state = states.get(plan_charge.measures.meter_id)
        if state is None:
            violations.append(FieldViolation(f"{field}[{index}].meter", f"names no meter ({name})"))
        elif not state.counting:
            violations.append(
                FieldViolation(f"{field}[{index}].meter", f"{name} is archived: it counts no new events")
            )
    if violations:
        raise InvalidArgument(violations)


@dataclass(frozen=True, slots=True)
class PlanVersion:
    """The charges and minimum of a plan from `effective_from` (a whole hour) until the next version."""

    plan_id: str
    version: int
    effective_from: datetime
    charges: tuple[PlanCharge, ...]
    minimum: Decimal
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    """A price plan, shared by every tenant on it, with its versions oldest first."""

    plan_id: str
    display_name: str
    currency: str
    create_time: datetime
    versions: tuple[PlanVersion, ...]  # oldest first


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """A tenant's own model (and free quantity) for one charge of its plan, by charge key."""

    charge_key: str
    model: ChargeModel
    included_quantity: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class BillingProfile:
    """Who a tenant is on its invoices, what plan prices it from when, and how its periods run."""

    tenant_id: str
    display_name: str
    email: str
    currency: str
    plan_id: str
    anchor_day: int  # 1..31; 1 is the calendar month
    billing_start: datetime
    tax_percentage: Decimal | None
    spend_threshold: Decimal | None
    overrides: tuple[PriceOverride, ...]
    closed_until: datetime  # end of the last closed period (billing_start before the first)
    create_time: datetime
    update_time: datetime
    next_close_time: datetime | None = None  # when the period after closed_until is due to close


@dataclass(frozen=True, slots=True)
class PlanAssignment:
    """The tenant is on `plan_id` from `effective_from` until the next assignment."""

    effective_from: datetime
    plan_id: str


def _boundary(year: int, month: int, anchor_day: int) -> datetime:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC)


def _shift(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + month - 1 + months
    return index // 12, index % 12 + 1


def anchor_period(anchor_day: int, instant: datetime) -> tuple[datetime, datetime]:
    """The full anchor period [start, end) that holds `instant`."""
    year, month = instant.year, instant.month
    start = _boundary(year, month, anchor_day)
    if start > instant:
        year, month = _shift(year, month, -1)
        start = _boundary(year, month, anchor_day)
    return start, _boundary(*_shift(year, month, 1), anchor_day)


@dataclass(frozen=True, slots=True)
class BillingPeriod:
    """A period to bill: [start, end), and the hours of the full anchor period it belongs to."""

    start: datetime
    end: datetime
    full_hours: int

    @property
    def hours(self) -> int:
        """The whole hours in [start, end)."""
        return int((self.end - self.start) / timedelta(hours=1))


def billing_period(anchor_day: int, billing_start: datetime, instant: datetime) -> BillingPeriod:
    """The tenant's period holding `instant` (at or after billing_start): clipped to billing_start."""
    start, end = anchor_period(anchor_day, max(instant, billing_start))
    full_hours = int((end - start) / timedelta(hours=1))
    return BillingPeriod(max(start, billing_start), end, full_hours)


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of a period priced by one plan version (None: the rate card, the default plan)."""

    start: datetime
    end: datetime
    plan_id: str
    version: PlanVersion | None


def segments(
    start: datetime,
    end: datetime,
    assignments: Sequence[PlanAssignment],
    versions: Mapping[str, Sequence[PlanVersion]],
) -> list[Segment]:
    """Split [start, end) at each plan change and each plan version change, in time order.

    Before the first assignment (a tenant without a profile) the default plan applies. A
    stretch of a plan before its first version has no charges (a version None is only the
    default plan's, whose prices the rate card gives hour by hour).
    """
    cuts: list[tuple[datetime, str]] = [(datetime.min.replace(tzinfo=UTC), DEFAULT_PLAN)]
    cuts += [(a.effective_from, a.plan_id) for a in sorted(assignments, key=lambda a: a.effective_from)]
    found: list[Segment] = []
    for index, (from_, plan_id) in enumerate(cuts):
        until = cuts[index + 1][0] if index + 1 < len(cuts) else datetime.max.replace(tzinfo=UTC)
        lo, hi = max(from_, start), min(until, end)
        if lo >= hi:
            continue
        if plan_id == DEFAULT_PLAN:
            found.append(Segment(lo, hi, plan_id, None))
            continue
        plan_versions = sorted(versions.get(plan_id, ()), key=lambda v: v.effective_from)
        for v_index, version in enumerate(plan_versions):
            v_until = (
                plan_versions[v_index + 1].effective_from
                if v_index + 1 < len(plan_versions)
                else datetime.max.replace(tzinfo=UTC)
            )
            v_lo, v_hi = max(version.effective_from, lo), min(v_until, hi)
            if v_lo < v_hi:
                found.append(Segment(v_lo, v_hi, plan_id, version))
    return found


def with_overrides(version: PlanVersion, overrides: Sequence[PriceOverride]) -> tuple[PlanCharge, ...]:
    """The version's charges with the tenant's overrides applied (by charge key)."""
    by_key = {o.charge_key: o for o in overrides}
    charges: list[PlanCharge] = []
    for plan_charge in version.charges:
        override = by_key.get(plan_charge.charge.key)
        if override is None:
            charges.append(plan_charge)
            continue
        charge = plan_charge.charge
        charges.append(
            PlanCharge(
                Charge(charge.key, charge.description, override.model, override.included_quantity),
                plan_charge.measures,
            )
        )
    return tuple(charges)


def check_overrides(overrides: Sequence[PriceOverride], charges: Sequence[PlanCharge]) -> None:
    """Each override names a charge of the plan, once, with a model of the same kind (usage or fee)."""
    by_key = {c.charge.key: c for c in charges}
    seen: set[str] = set()
    violations: list[FieldViolation] = []
    for index, override in enumerate(overrides):
        field = f"price_overrides[{index}]"
        charge = by_key.get(override.charge_key)
        if charge is None:
            violations.append(FieldViolation(f"{field}.charge_key", "names no charge of the plan"))
        elif override.charge_key in seen:
            violations.append(FieldViolation(f"{field}.charge_key", "repeats an earlier override"))
        elif isinstance(charge.charge.model, FlatFee) != isinstance(override.model, FlatFee):
            violations.append(
                FieldViolation(f"{field}.model", "must be a flat fee exactly when the charge is one")
            )
        seen.add(override.charge_key)
    if violations:
        raise InvalidArgument(violations)
