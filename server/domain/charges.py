"""Charge models and the exact price of one charge for one period.

A charge prices one meter's aggregated quantity for a period with one model. Every
model is a frozen dataclass that validates itself on construction and raises
InvalidArgument with every FieldViolation it finds, named relative to itself
("tiers[1].up_to"); whoever builds it from a request puts the request's path in front
(`violations_under("charges[2]", error)` -> "charges[2].tiers[1].up_to").

The rounding rule (the same as server.domain.pricing's, extended to tiers): a charge
is ONE invoice line. Its amount is computed exactly, over all its tiers, packages and
fees, and rounded once to the currency's minor unit, half away from zero. Nothing is
rounded before that, not even a tier; the tier breakdown on a line is exact.

Worked example (docs/billing.md repeats it). Graduated tiers, USD:
    tier 1: up to 1,000 units at 0.10
    tier 2: up to 5,000 units at 0.08
    tier 3: above 5,000 at 0.05
Quantity 7,250.5:
    tier 1:   1,000   x 0.10 = 100.00
    tier 2:   4,000   x 0.08 = 320.00
    tier 3:   2,250.5 x 0.05 = 112.525   (exact; not rounded on its own)
    exact sum                 = 532.525 -> one line of 532.53 (half away from zero)
The same quantity on volume tiers with these bounds reaches tier 3, so every unit is
priced at 0.05: 7,250.5 x 0.05 = 362.525 -> 362.53.

Boundaries: a tier's `up_to` is inclusive (1,000 units are all in tier 1), the next
tier starts just above it. A quantity reaches a tier when it exceeds the tier's lower
bound, so a tier's flat fee is charged only once a unit falls in it, and a billable
quantity of zero costs nothing under any usage model (an unused meter never bills).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum

from server.domain.decimals import (
    EXACT,
    PRICE_FRACTION_DIGITS,
    PRICE_INTEGER_DIGITS,
    QUANTITY_FRACTION_DIGITS,
    QUANTITY_INTEGER_DIGITS,
    check_exact,
)
from server.domain.errors import FieldViolation, InvalidArgument

MAX_TIERS = 100

_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
MAX_DESCRIPTION_CHARS = 200

ZERO = Decimal(0)


class FeeTiming(Enum):
    """When a flat recurring fee is billed: on the invoice opening its period, or closing it."""

    IN_ADVANCE = "in_advance"
    IN_ARREARS = "in_arrears"


def violations_under(path: str, error: InvalidArgument) -> list[FieldViolation]:
    """The violations of a nested value, renamed as fields of `path` ("charges[2]" + "tiers[1].up_to")."""
    return [
        FieldViolation(f"{path}{'' if v.field.startswith('[') else '.'}{v.field}", v.description)
        for v in error.violations
    ]


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


def _check_price(field: str, value: Decimal, violations: list[FieldViolation]) -> None:
    problem = check_exact(
        value, max_integer_digits=PRICE_INTEGER_DIGITS, max_fraction_digits=PRICE_FRACTION_DIGITS
    )
    if problem:
        violations.append(FieldViolation(field, problem))


def _check_quantity(
    field: str, value: Decimal, violations: list[FieldViolation], *, positive: bool = False
) -> None:
    problem = check_exact(
        value,
        max_integer_digits=QUANTITY_INTEGER_DIGITS,
        max_fraction_digits=QUANTITY_FRACTION_DIGITS,
        positive=positive,
    )
    if problem:
        violations.append(FieldViolation(field, problem))


@dataclass(frozen=True, slots=True)
class PerUnit:
    """Every unit at one price (today's rate card)."""

    unit_price: Decimal

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        _check_price("unit_price", self.unit_price, violations)
        _raise_if(violations)


@dataclass(frozen=True, slots=True)
class Tier:
    """Units up to `up_to` (inclusive; None: no upper bound) at `unit_price`, plus `flat_fee` once reached."""

    up_to: Decimal | None
    unit_price: Decimal
    flat_fee: Decimal = ZERO

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        if self.up_to is not None:
            _check_quantity("up_to", self.up_to, violations, positive=True)
        _check_price("unit_price", self.unit_price, violations)
        _check_price("flat_fee", self.flat_fee, violations)
        _raise_if(violations)


def _check_tiers(tiers: Sequence[Tier]) -> None:
    violations: list[FieldViolation] = []
    if not tiers:
        violations.append(FieldViolation("tiers", "must have at least one tier"))
    elif len(tiers) > MAX_TIERS:
        violations.append(FieldViolation("tiers", f"must have at most {MAX_TIERS} tiers"))
    else:
        previous: Decimal | None = None
        for index, tier in enumerate(tiers):
            last = index == len(tiers) - 1
            if tier.up_to is None and not last:
                violations.append(
                    FieldViolation(f"tiers[{index}].up_to", "is required on every tier but the last")
                )
            elif tier.up_to is not None and last:
                violations.append(
                    FieldViolation(
                        f"tiers[{index}].up_to",
                        "must be unset on the last tier, so that every quantity has a price",
                    )
                )
            elif tier.up_to is not None and previous is not None and tier.up_to <= previous:
                violations.append(
                    FieldViolation(
                        f"tiers[{index}].up_to",
                        f"must be greater than tiers[{index - 1}].up_to ({previous})",
                    )
                )
            if tier.up_to is not None:
                previous = tier.up_to
    _raise_if(violations)


@dataclass(frozen=True, slots=True)
class Graduated:
    """Each unit priced by the tier it falls in; each reached tier adds its flat fee."""

    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        _check_tiers(self.tiers)


@dataclass(frozen=True, slots=True)
class Volume:
    """All units priced at the one tier the total reaches, plus that tier's flat fee."""

    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        _check_tiers(self.tiers)


@dataclass(frozen=True, slots=True)
class Package:
    """`price` per started block of `size` units: 1,001 units in blocks of 1,000 are 2 blocks."""

    size: Decimal
    price: Decimal

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        _check_quantity("size", self.size, violations, positive=True)
        _check_price("price", self.price, violations)
        _raise_if(violations)


@dataclass(frozen=True, slots=True)
class FlatFee:
    """A recurring fee per period, prorated by the hour when only part of the period is covered."""

    amount: Decimal
    timing: FeeTiming = FeeTiming.IN_ARREARS

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        _check_price("amount", self.amount, violations)
        _raise_if(violations)


UsageModel = PerUnit | Graduated | Volume | Package
ChargeModel = UsageModel | FlatFee


@dataclass(frozen=True, slots=True)
class Charge:
    """One line of a plan: a key (the meter it prices), its printed description and its model.

    `included_quantity` is free each period and comes off before the model applies:
    billable = max(0, quantity - included_quantity). It is the way to give free units
    before packaging or tiers; flat fees have no quantity and so none.
    """

    key: str
    description: str
    model: ChargeModel
    included_quantity: Decimal = ZERO

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        if not isinstance(self.key, str) or not _KEY.fullmatch(self.key):
            violations.append(
                FieldViolation("key", "must be 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':', '/', '-'")
            )
        if len(self.description) > MAX_DESCRIPTION_CHARS:
            violations.append(
                FieldViolation("description", f"must be at most {MAX_DESCRIPTION_CHARS} characters")
            )
        _check_quantity("included_quantity", self.included_quantity, violations)
        if isinstance(self.model, FlatFee) and self.included_quantity:
            violations.append(
                FieldViolation("included_quantity", "must be 0 for a flat fee, which has no quantity")
            )
        _raise_if(violations)

    @property
    def is_usage(self) -> bool:
        return not isinstance(self.model, FlatFee)


@dataclass(frozen=True, slots=True)
class TierPortion:
    """The part of a line that one tier prices, exact and unrounded.

    `tier` counts from 1 as printed; the tier covers quantities above `above` up to
    `up_to` (None: unbounded). `amount` = quantity x unit_price + flat_fee, exactly.
    """

    tier: int
    above: Decimal
    up_to: Decimal | None
    quantity: Decimal
    unit_price: Decimal
    flat_fee: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class UsagePrice:
    """The exact, unrounded price of a billable quantity under one usage model, with its parts."""

    amount: Decimal
    unit_price: Decimal | None  # per unit; volume: the reached tier's; package: per block; graduated: None
    tiers: tuple[TierPortion, ...] = ()
    packages: Decimal | None = None  # package model: blocks started (a whole number)


def billable_quantity(quantity: Decimal, included: Decimal) -> Decimal:
    """What is left to bill after the period's free quantity: never below zero."""
    return max(ZERO, EXACT.subtract(quantity, included))


def _portion(index: int, above: Decimal, tier: Tier, quantity: Decimal) -> TierPortion:
    amount = EXACT.add(EXACT.multiply(quantity, tier.unit_price), tier.flat_fee)
    return TierPortion(index + 1, above, tier.up_to, quantity, tier.unit_price, tier.flat_fee, amount)


def _graduated(tiers: Sequence[Tier], billable: Decimal) -> UsagePrice:
    portions: list[TierPortion] = []
    above = ZERO
    for index, tier in enumerate(tiers):
        if billable <= above:
            break
        top = billable if tier.up_to is None else min(billable, tier.up_to)
        portions.append(_portion(index, above, tier, EXACT.subtract(top, above)))
        if tier.up_to is None:
            break
        above = tier.up_to
    amount = ZERO
    for portion in portions:
        amount = EXACT.add(amount, portion.amount)
    return UsagePrice(amount, None, tuple(portions))


def _volume(tiers: Sequence[Tier], billable: Decimal) -> UsagePrice:
    if billable == 0:
        return UsagePrice(ZERO, None)
    above = ZERO
    for index, tier in enumerate(tiers):
        if tier.up_to is None or billable <= tier.up_to:
            portion = _portion(index, above, tier, billable)
            return UsagePrice(portion.amount, tier.unit_price, (portion,))
        above = tier.up_to
    raise AssertionError("validated tiers end with an unbounded tier")


def _package(model: Package, billable: Decimal) -> UsagePrice:
    blocks = EXACT.divide_int(billable, model.size)
    if EXACT.remainder(billable, model.size) != 0:
        blocks = EXACT.add(blocks, 1)
    return UsagePrice(EXACT.multiply(blocks, model.price), model.price, packages=blocks)


def price_usage_model(model: UsageModel, billable: Decimal) -> UsagePrice:
    """The exact price of `billable` units (after the included quantity) under `model`."""
    match model:
        case PerUnit(unit_price=unit_price):
            return UsagePrice(EXACT.multiply(billable, unit_price), unit_price)
        case Graduated(tiers=tiers):
            return _graduated(tiers, billable)
        case Volume(tiers=tiers):
            return _volume(tiers, billable)
        case Package():
            return _package(model, billable)
