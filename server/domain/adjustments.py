"""Adjustments for late usage: what a closed period owes now, minus what it was billed.

A finalized invoice never changes. When events arrive for a period already invoiced,
the period is priced again with every event known now, and the difference per charge
goes on the next invoice as adjustment lines naming that period:

    adjustment(charge) = repriced amount(charge) - amount already billed for it

It works on priced amounts, never on quantities, because quantities do not add up to
prices: 200 late units on graduated tiers cost the price of the tier the period has
reached by then, a minimum top-up shrinks as usage grows, and a unique count of 100 plus
30 late events may still be 100. The same rule bills the rest of a period after interim
invoices (progressive billing). An adjustment can be negative (a cancelled event, or a
minimum top-up that usage has replaced); the per-charge differences add up to exactly
the change in the period's pre-tax amount.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

from server.domain.decimals import EXACT, round_money
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.period_pricing import AdjustmentLine, PricedPeriod
from server.domain.ranges import TimeRange

# A billed amount per charge key; None is the period's minimum top-up.
Billed = Mapping[str | None, Decimal]


def billed_amounts(priced: PricedPeriod, earlier: Iterable[AdjustmentLine] = ()) -> dict[str | None, Decimal]:
    """What a period was billed per charge: its invoice's lines plus adjustments already billed for it."""
    billed: dict[str | None, Decimal] = {line.charge_key: line.amount for line in priced.lines}
    if priced.minimum is not None:
        billed[None] = priced.minimum.amount
    for adjustment in earlier:
        billed[adjustment.charge_key] = EXACT.add(
            billed.get(adjustment.charge_key, Decimal(0)), adjustment.amount
        )
    return billed


def adjustment_lines(period: TimeRange, billed: Billed, repriced: PricedPeriod) -> tuple[AdjustmentLine, ...]:
    """The non-zero adjustments of `period`, in the plan's charge order, then the minimum.

    A charge billed before but absent from the re-priced plan is adjusted to zero.
    Amounts billed must be in whole minor units of the re-priced period's currency.
    """
    digits = repriced.currency.minor_units
    violations = [
        FieldViolation(f"billed[{key!r}]", f"must be in whole minor units of {repriced.currency.code}")
        for key, amount in billed.items()
        if round_money(amount, digits) != amount
    ]
    if violations:
        raise InvalidArgument(violations)
    zero = round_money(Decimal(0), digits)
    now: dict[str | None, tuple[str, Decimal]] = {
        line.charge_key: (line.description, line.amount) for line in repriced.lines
    }
    if repriced.minimum is not None:
        now[None] = (repriced.minimum.description, repriced.minimum.amount)
    gone = sorted(key for key in billed if key is not None and key not in now)
    order: list[str | None] = [key for key in now if key is not None]
    order += gone
    order.append(None)
    lines: list[AdjustmentLine] = []
    for key in order:
        description, amount = now.get(key, (key or "Minimum commitment", zero))
        before = billed.get(key, zero)
        difference = EXACT.subtract(amount, before)
        if difference != 0:
            lines.append(AdjustmentLine(period, key, description, before, amount, difference))
    return tuple(lines)
