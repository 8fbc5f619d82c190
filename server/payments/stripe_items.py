"""Tally's invoice lines as Stripe invoice items: amounts in minor units, at most 250 items.

Pure functions on the frozen invoice, no I/O: what the push sends is fixed by the invoice, so a
retried or resumed push sends exactly the same items (same parameters under the same idempotency
keys). Stripe prices nothing: each item carries its line's amount, already rounded by Tally
(server.domain.pricing), so Stripe's total is the sum of Tally's lines to the minor unit.

Stripe allows 250 invoice items per invoice. An invoice with more lines is sent grouped: lines of
one kind and service become one item (their amounts added exactly), and if that is still too many,
consecutive lines are put together in runs of equal size. The Tally invoice (its number is on every
item) keeps the full detail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from server.domain.currencies import currency_of
from server.domain.decimals import format_quantity
from server.domain.models import Invoice
from server.domain.pricing import LineItem

MAX_ITEMS = 250  # Stripe's limit of invoice items per invoice
MAX_DESCRIPTION_CHARS = 500


class NotInMinorUnits(ValueError):
    """An amount with more digits than its currency's minor unit (never the case for a priced line)."""


def minor_units(amount: Decimal, currency: str) -> int:
    """`amount` as an integer count of the currency's minor unit (cents for USD, yen for JPY), exactly."""
    scaled = amount.scaleb(currency_of(currency).minor_units)
    if scaled != scaled.to_integral_value():
        raise NotInMinorUnits(f"{amount} {currency} is not a whole number of minor units")
    return int(scaled)


@dataclass(frozen=True, slots=True)
class StripeItem:
    """One invoice item to create: its amount in minor units and the Tally lines it stands for."""

    amount: int
    description: str
    positions: tuple[int, ...]  # indexes of the invoice's lines
    period_start: datetime | None
    period_end: datetime | None


def describe(line: LineItem) -> str:
    """A line as a person reads it on Stripe's invoice."""
    if line.description:
        text = line.description
    else:
        text = f"{line.service} {line.usage_type}".strip() or line.kind.value
    if line.unit_price is not None and line.kind.value == "usage":
        text += f": {format_quantity(line.quantity)} x {format_quantity(line.unit_price)}"
    return text[:MAX_DESCRIPTION_CHARS]


def _item(invoice: Invoice, positions: Sequence[int], description: str) -> StripeItem:
    lines = [invoice.lines[p] for p in positions]
    starts = [line.period_start for line in lines if line.period_start is not None]
    ends = [line.period_end for line in lines if line.period_end is not None]
    return StripeItem(
        amount=sum(minor_units(line.amount, invoice.currency) for line in lines),
        description=description[:MAX_DESCRIPTION_CHARS],
        positions=tuple(positions),
        period_start=min(starts) if len(starts) == len(lines) and starts else None,
        period_end=max(ends) if len(ends) == len(lines) and ends else None,
    )


def stripe_items(invoice: Invoice, max_items: int = MAX_ITEMS) -> list[StripeItem]:
    """The items that make up the invoice at Stripe: their amounts add up to its total exactly."""
    count = len(invoice.lines)
    if count <= max_items:
        return [_item(invoice, [p], describe(line)) for p, line in enumerate(invoice.lines)]
    groups: dict[tuple[str, str], list[int]] = {}
    for position, line in enumerate(invoice.lines):
        groups.setdefault((line.kind.value, line.service), []).append(position)
    if len(groups) <= max_items:
        return [
            _item(invoice, positions, _group_description(invoice, positions)) for positions in groups.values()
        ]
    size = math.ceil(count / max_items)
    return [
        _item(invoice, range(start, min(start + size, count)), _run_description(invoice, start, size))
        for start in range(0, count, size)
    ]


def _group_description(invoice: Invoice, positions: Sequence[int]) -> str:
    first = invoice.lines[positions[0]]
    if len(positions) == 1:
        return describe(first)
    what = first.service or first.kind.value
    return f"{what} ({len(positions)} lines of Tally invoice {invoice.number})"


def _run_description(invoice: Invoice, start: int, size: int) -> str:
    end = min(start + size, len(invoice.lines))
    return f"Lines {start + 1}-{end} of Tally invoice {invoice.number}"
