"""An invoice's lines from the pieces of its period: plan segments, late-usage adjustments and tax.

The charge engine (charges, period_pricing, adjustments) prices one plan over one period.
An invoice may span several: a plan change or a new plan version mid-period splits it
into segments, each priced on its own (usage charges on the segment's usage, meter
charges on the meter's aggregate over exactly the segment, flat fees and the minimum
prorated by the segment's hours against the full period), and the rate
card (the default plan) prices its segments line per unit price as it always has. Then:

    adjustments = for each earlier billed period: re-priced now minus billed, per charge
    tax         = (every line above) x percentage / 100, rounded once, as its own line
    total       = the sum of every line, so the invoice adds up as printed
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

from server.domain.adjustments import adjustment_lines
from server.domain.charges import FlatFee
from server.domain.currencies import Currency
from server.domain.decimals import EXACT, round_money
from server.domain.period_pricing import (
    ChargeLine,
    MinimumLine,
    PlanTerms,
    PricedPeriod,
    Proration,
    Tax,
    Totals,
    price_period,
)
from server.domain.plans import BillingPeriod, MeterRef, PlanCharge, Segment, UsageTypeRef
from server.domain.pricing import InvoiceAmounts, LineItem, LineKind, PricedUsage, price_usage
from server.domain.ranges import TimeRange
from server.domain.timeutil import to_micros

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class SegmentUsage:
    """A segment, the charges that price it (None: the rate card) and its usage.

    For rate card segments `usage` carries the rate card's unit price per hour group; for
    plan segments the unit price is ignored and the quantities are summed per usage type.
    `meters` is the aggregate of each meter the segment's charges price, by meter id,
    over exactly [segment.start, segment.end) (a meter without a value there is 0).
    """

    segment: Segment
    charges: tuple[PlanCharge, ...] | None
    usage: tuple[PricedUsage, ...]
    meters: Mapping[str, Decimal] = field(default_factory=dict)


def _hours(start: datetime, end: datetime) -> int:
    return (to_micros(end) - to_micros(start)) // 3_600_000_000


def price_segments(
    currency: Currency, period: BillingPeriod, pieces: Sequence[SegmentUsage]
) -> list[LineItem]:
    """The usage, fee and minimum lines of a period, segment after segment."""
    lines: list[LineItem] = []
    for piece in pieces:
        segment = piece.segment
        whole = (segment.start, segment.end) == (period.start, period.end)
        part_start, part_end = (None, None) if whole else (segment.start, segment.end)
        if piece.charges is None:
            rated = price_usage(piece.usage, currency.minor_units).lines
            if whole:  # rate card lines price the whole period already (no copies: a close prices thousands)
                lines.extend(rated)
            else:
                lines.extend(replace(line, period_start=part_start, period_end=part_end) for line in rated)
            continue
        assert segment.version is not None
        totals: dict[tuple[str, str], tuple[Decimal, int]] = {}
        for usage in piece.usage:
            quantity, count = totals.get((usage.service, usage.usage_type), (ZERO, 0))
            totals[(usage.service, usage.usage_type)] = (
                EXACT.add(quantity, usage.quantity),
                count + usage.event_count,
            )
        quantities: dict[str, Decimal] = {}
        for plan_charge in piece.charges:
            match plan_charge.measures:
                case UsageTypeRef(service=service, usage_type=usage_type):
                    quantities[plan_charge.charge.key] = totals.get((service, usage_type), (ZERO, 0))[0]
                case MeterRef(meter_id=meter_id):
                    quantities[plan_charge.charge.key] = piece.meters.get(meter_id, ZERO)
        hours = _hours(segment.start, segment.end)
        proration = None if hours == period.full_hours else Proration(hours, period.full_hours)
        terms = PlanTerms(currency, tuple(c.charge for c in piece.charges), segment.version.minimum)
        priced = price_period(terms, quantities, proration=proration)
        for plan_charge, charge_line in zip(piece.charges, priced.lines, strict=True):
            # A meter's line names its charge only: its quantity is the meter's aggregate,
            # not a usage type's sum, and it has no event count of its own.
            ref = plan_charge.measures if isinstance(plan_charge.measures, UsageTypeRef) else None
            lines.append(
                LineItem(
                    service=ref.service if ref else "",
                    usage_type=ref.usage_type if ref else "",
                    quantity=charge_line.quantity,
                    unit_price=charge_line.unit_price,
                    amount=charge_line.amount,
                    event_count=totals.get((ref.service, ref.usage_type), (ZERO, 0))[1] if ref else 0,
                    kind=LineKind.FLAT_FEE
                    if isinstance(plan_charge.charge.model, FlatFee)
                    else LineKind.USAGE,
                    description=charge_line.description,
                    charge_key=charge_line.charge_key,
                    tiers=charge_line.tiers,
                    period_start=part_start,
                    period_end=part_end,
                )
            )
        if priced.minimum is not None:
            lines.append(
                LineItem(
                    service="",
                    usage_type="",
                    quantity=Decimal(1),
                    unit_price=priced.minimum.minimum,
                    amount=priced.minimum.amount,
                    event_count=0,
                    kind=LineKind.MINIMUM,
                    description=priced.minimum.description,
                    period_start=part_start,
                    period_end=part_end,
                )
            )
    return lines


def _key(line: LineItem) -> str | None:
    # An adjustment of the minimum top-up has no charge key ("").
    if line.kind is LineKind.MINIMUM or (line.kind is LineKind.ADJUSTMENT and not line.charge_key):
        return None
    return line.charge_key


def billed_by_charge(lines: Iterable[LineItem]) -> dict[str | None, Decimal]:
    """What lines billed per charge key (None: the minimum top-up); tax is not a charge."""
    billed: dict[str | None, Decimal] = {}
    for line in lines:
        if line.kind is LineKind.TAX:
            continue
        key = _key(line)
        billed[key] = EXACT.add(billed.get(key, ZERO), line.amount)
    return billed


def _as_priced_period(currency: Currency, lines: Sequence[LineItem]) -> PricedPeriod:
    """Re-priced lines folded into one line per charge, as the engine's adjustments expect."""
    by_key: dict[str, tuple[str, Decimal]] = {}
    minimum: Decimal | None = None
    for line in lines:
        if line.kind is LineKind.MINIMUM:
            minimum = EXACT.add(minimum or ZERO, line.amount)
            continue
        description, amount = by_key.get(line.charge_key, (line.description or line.charge_key, ZERO))
        by_key[line.charge_key] = (description, EXACT.add(amount, line.amount))
    zero = round_money(ZERO, currency.minor_units)
    charge_lines = tuple(
        ChargeLine(key, description, Decimal(1), Decimal(1), None, amount)
        for key, (description, amount) in by_key.items()
    )
    minimum_line = None if minimum is None else MinimumLine("Minimum commitment", minimum, None, minimum)
    return PricedPeriod(currency, charge_lines, minimum_line, (), None, Totals(zero, zero, zero, zero, zero))


def adjustment_items(
    currency: Currency,
    period_start: datetime,
    period_end: datetime,
    billed: Mapping[str | None, Decimal],
    repriced: Sequence[LineItem],
) -> list[LineItem]:
    """Adjustment lines naming [period_start, period_end): re-priced minus billed, per charge."""
    period = TimeRange(to_micros(period_start), to_micros(period_end))
    items = []
    for adjustment in adjustment_lines(period, billed, _as_priced_period(currency, repriced)):
        service, _, usage_type = (adjustment.charge_key or "").partition("/")
        label = f"{period_start:%Y-%m-%d %H:%M} to {period_end:%Y-%m-%d %H:%M} UTC"
        items.append(
            LineItem(
                service=service if usage_type else "",
                usage_type=usage_type,
                quantity=Decimal(1),
                unit_price=None,
                amount=adjustment.amount,
                event_count=0,
                kind=LineKind.ADJUSTMENT,
                description=f"Adjustment for {label}: {adjustment.description}",
                charge_key=adjustment.charge_key or "",
                period_start=period_start,
                period_end=period_end,
            )
        )
    return items


def finish(currency: Currency, lines: Sequence[LineItem], tax: Tax | None) -> InvoiceAmounts:
    """Add the tax line (if any) and total the invoice: the sum of its rounded lines."""
    digits = currency.minor_units
    taxable = round_money(ZERO, digits)
    for line in lines:
        taxable = EXACT.add(taxable, line.amount)
    all_lines = list(lines)
    total = taxable
    if tax is not None:
        rate = tax.percentage.scaleb(-2, context=EXACT)
        amount = round_money(EXACT.multiply(taxable, rate), digits)
        all_lines.append(
            LineItem(
                service="",
                usage_type="",
                quantity=taxable,
                unit_price=rate,
                amount=amount,
                event_count=0,
                kind=LineKind.TAX,
                description=tax.description or f"Tax {tax.percentage.normalize():f}%",
            )
        )
        total = EXACT.add(taxable, amount)
    return InvoiceAmounts(tuple(all_lines), total)
