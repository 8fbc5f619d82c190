"""Turning priced usage into invoice lines and a total, exactly.

The rounding rule, in one place: each line's amount is quantity * unit_price computed
exactly, then rounded once to the currency's minor unit, half away from zero
(decimals.MONEY_ROUNDING). The total is the sum of the rounded lines, so an invoice
always adds up as printed. Nothing is rounded before the line amount.

This is the rate card's flat path; each line is priced as a per-unit charge of the
charge engine (server.domain.charges), which extends the same rule to tiers, packages,
flat fees and minimums for plans.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from server.domain.charges import PerUnit, TierPortion, price_usage_model
from server.domain.decimals import EXACT, round_money


@dataclass(frozen=True, slots=True)
class PricedUsage:
    """Usage of one (service, usage_type) at one unit price within an invoice period."""

    service: str
    usage_type: str
    unit_price: Decimal
    quantity: Decimal
    event_count: int


class LineKind(enum.StrEnum):
    """What an invoice line is: usage, a flat fee, the minimum top-up, an adjustment or the tax."""

    USAGE = "usage"
    FLAT_FEE = "flat_fee"
    MINIMUM = "minimum"
    ADJUSTMENT = "adjustment"
    TAX = "tax"


@dataclass(frozen=True, slots=True)
class LineItem:
    """One printed line. `amount` is rounded once; the invoice total is the sum of the amounts.

    Rate card lines are one per (service, usage_type, unit_price). Plan lines name their
    charge (`charge_key`); graduated lines have no single unit price (None) but `tiers`.
    `period_start`/`period_end` say which part of the period a line prices when it is not
    all of it (a plan change mid-period), and which earlier period an adjustment corrects.
    A tax line's quantity is the taxable amount and its unit price the rate (0.2 for 20%).
    """

    service: str
    usage_type: str
    quantity: Decimal
    unit_price: Decimal | None
    amount: Decimal
    event_count: int
    kind: LineKind = LineKind.USAGE
    description: str = ""
    charge_key: str = ""
    period_start: datetime | None = None
    period_end: datetime | None = None
    tiers: tuple[TierPortion, ...] = ()


@dataclass(frozen=True, slots=True)
class InvoiceAmounts:
    """Priced lines and their total, exact to the currency's minor units."""

    lines: tuple[LineItem, ...]
    total: Decimal


def price_usage(usages: Iterable[PricedUsage], minor_digits: int) -> InvoiceAmounts:
    """One line per (service, usage_type, unit_price), ordered so, and their total."""
    merged: dict[tuple[str, str, Decimal], tuple[Decimal, int]] = {}
    for usage in usages:
        key = (usage.service, usage.usage_type, usage.unit_price)
        quantity, count = merged.get(key, (Decimal(0), 0))
        merged[key] = (EXACT.add(quantity, usage.quantity), count + usage.event_count)
    lines = tuple(
        LineItem(
            service=service,
            usage_type=usage_type,
            quantity=quantity,
            unit_price=unit_price,
            amount=round_money(price_usage_model(PerUnit(unit_price), quantity).amount, minor_digits),
            event_count=count,
            charge_key=f"{service}/{usage_type}",
        )
        for (service, usage_type, unit_price), (quantity, count) in sorted(merged.items())
    )
    total = round_money(Decimal(0), minor_digits)
    for line in lines:
        total = EXACT.add(total, line.amount)
    return InvoiceAmounts(lines, total)
