"""Plans, their charges and price models, and billing profiles: plain frozen dataclasses.

A charge prices one usage type's summed quantity over a period (or is a flat fee) with
one model: PerUnit, Graduated, Volume, Package or FlatFee. Prices and quantities are
Decimals (an int or a decimal string is read exactly; a float is refused), as in
tally_client.models; the conversions to and from protobuf live in tally_client.convert_pricing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from tally_client.models import exact


def _exact_fields(value: object, *names: str) -> None:
    """Store each of `names` of a frozen dataclass as an exact Decimal (TypeError for a float)."""
    for name in names:
        object.__setattr__(value, name, exact(getattr(value, name), name))


@dataclass(frozen=True, slots=True)
class PerUnit:
    """Every unit at `unit_price`."""

    unit_price: Decimal

    def __post_init__(self) -> None:
        _exact_fields(self, "unit_price")


@dataclass(frozen=True, slots=True)
class PriceTier:
    """One tier: units above the previous tier's `up_to`, up to this one inclusive (None: unbounded).

    `flat_fee` is charged once when the tier is reached.
    """

    unit_price: Decimal
    up_to: Decimal | None = None
    flat_fee: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        _exact_fields(self, "unit_price", "flat_fee")
        if self.up_to is not None:
            _exact_fields(self, "up_to")


@dataclass(frozen=True, slots=True)
class Graduated:
    """Tiers, each unit priced by the tier it falls in; the last tier is unbounded."""

    tiers: tuple[PriceTier, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(self.tiers))


@dataclass(frozen=True, slots=True)
class Volume:
    """Tiers, every unit priced by the tier the total reaches; the last tier is unbounded."""

    tiers: tuple[PriceTier, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(self.tiers))


@dataclass(frozen=True, slots=True)
class Package:
    """`price` per started block of `size` units (1,001 units in blocks of 1,000 are two blocks)."""

    size: Decimal
    price: Decimal

    def __post_init__(self) -> None:
        _exact_fields(self, "size", "price")


class FeeTiming(enum.Enum):
    """When a flat fee is billed."""

    IN_ARREARS = "in_arrears"
    IN_ADVANCE = "in_advance"


@dataclass(frozen=True, slots=True)
class FlatFee:
    """A recurring fee of `amount` per period, prorated by the hour over part of a period."""

    amount: Decimal
    timing: FeeTiming = FeeTiming.IN_ARREARS

    def __post_init__(self) -> None:
        _exact_fields(self, "amount")


PriceModel = PerUnit | Graduated | Volume | Package | FlatFee
"""How a charge (or a tenant's price override) turns a quantity into an amount."""


@dataclass(frozen=True, slots=True)
class Charge:
    """One charge of a plan version, one invoice line: `key` names it (price overrides use it).

    A usage charge measures the summed quantity of (`service`, `usage_type`), less
    `included_quantity`; a FlatFee charge measures nothing (both empty).
    """

    key: str
    model: PriceModel
    service: str = ""
    usage_type: str = ""
    description: str = ""
    included_quantity: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        _exact_fields(self, "included_quantity")


@dataclass(frozen=True, slots=True)
class PlanVersion:
    """The charges of a plan from `effective_time` on (until the next version)."""

    version: int
    effective_time: datetime
    charges: tuple[Charge, ...]
    minimum_amount: Decimal
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    """A named, versioned set of charges in one currency; "default" is the rate card."""

    name: str
    plan_id: str
    display_name: str
    currency_code: str
    versions: tuple[PlanVersion, ...]
    create_time: datetime


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """A tenant's own model (and included quantity) for the charge `charge_key` of its plan."""

    charge_key: str
    model: PriceModel
    included_quantity: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        _exact_fields(self, "included_quantity")


@dataclass(frozen=True, slots=True)
class BillingProfile:
    """Who a tenant is on its invoices, which plan prices it and how its periods run.

    `plan_id` is the plan's id ("default" for the rate card). `tax_percentage` and
    `spend_threshold` are None when not set. `closed_until_time` is the end of the last
    closed period (the billing start before the first close).
    """

    name: str
    tenant_id: str
    display_name: str
    email: str
    currency_code: str
    plan_id: str
    billing_anchor_day: int
    billing_start_time: datetime
    tax_percentage: Decimal | None
    spend_threshold: Decimal | None
    price_overrides: tuple[PriceOverride, ...]
    closed_until_time: datetime | None
    create_time: datetime
    update_time: datetime
