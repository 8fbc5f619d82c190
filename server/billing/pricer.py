"""Pricing a tenant's invoice for a period from what is stored now, inside the caller's transaction.

It gathers the inputs of server.domain.invoice_pricing: the tenant's profile (plan history,
overrides, tax, currency), the versions of its plans, its usage over every segment of the
period and, for late usage, of every earlier period it was billed for, with what those
periods were billed. One query reads the usage of all of them, and the aggregate of each
meter that a charge prices is read per segment window (PricingBasis.meter_windows). The pricing itself
(`pricing_basis`, `InvoicePricer.price_basis`) does no I/O, so a period close prices a
block of tenants from a few set-based reads exactly as `price` prices one.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from server.domain.currencies import currency_of
from server.domain.invoice_pricing import (
    SegmentUsage,
    adjustment_items,
    billed_by_charge,
    finish,
    price_segments,
)
from server.domain.models import Invoice, InvoiceKind, InvoiceStatus
from server.domain.period_pricing import Tax
from server.domain.plans import (
    DEFAULT_PLAN,
    BillingPeriod,
    BillingProfile,
    PlanAssignment,
    PlanVersion,
    Segment,
    anchor_period,
    meter_ids_of,
    segments,
    with_overrides,
)
from server.domain.pricing import InvoiceAmounts, LineItem, LineKind, PricedUsage
from server.domain.stores import PricingReads, UsageRow


@dataclass(frozen=True, slots=True)
class PricedInvoice:
    """An invoice's content as of now; `unpriced` when rate card usage has no rate (not billable)."""

    currency: str
    amounts: InvoiceAmounts
    plan_ids: tuple[str, ...]
    unpriced: bool
    profile: BillingProfile | None

    def draft(
        self, tenant_id: str, start: datetime, end: datetime, kind: InvoiceKind, at: datetime
    ) -> Invoice:
        """This content as a new draft invoice of the tenant for [start, end), with a fresh id."""
        return Invoice(
            id=f"inv_{uuid.uuid4().hex}",
            tenant_id=tenant_id,
            period_start=start,
            period_end=end,
            currency=self.currency,
            lines=self.amounts.lines,
            total=self.amounts.total,
            status=InvoiceStatus.DRAFT,
            created_at=at,
            updated_at=at,
            computed_at=at,
            kind=kind,
            plan_ids=self.plan_ids,
        )


def full_hours(profile: BillingProfile | None, start: datetime, end: datetime) -> int:
    """The hours flat fees are prorated against: the anchor period's, if [start, end) lies in one."""
    hours = int((end - start) / timedelta(hours=1))
    if profile is None:
        return hours
    anchor_start, anchor_end = anchor_period(profile.anchor_day, start)
    if start >= anchor_start and end <= anchor_end:
        return int((anchor_end - anchor_start) / timedelta(hours=1))
    return hours


@dataclass(frozen=True, slots=True)
class PricingBasis:
    """What an invoice for [start, end) is priced from, apart from the usage itself.

    `periods` is [start, end) then each earlier billed period (for late usage), `pieces`
    their plan segments; `labels()` names each segment's usage to read, so that the usage
    of one tenant (InvoicePricer.price) or of a block of tenants (a period close) is read
    in one query, and priced the same way either way.
    """

    start: datetime
    end: datetime
    profile: BillingProfile | None
    versions: dict[str, list[PlanVersion]]
    periods: list[tuple[datetime, datetime]]
    pieces: list[list[Segment]]
    billed: dict[tuple[datetime, datetime], list[LineItem]]
    adjusted: dict[tuple[datetime, datetime], list[LineItem]]
    interim: list[LineItem]

    def labels(self) -> list[tuple[str, datetime, datetime]]:
        """(label, start, end) of every segment whose usage the invoice needs."""
        return [
            (f"{p}.{i}", seg.start, seg.end)
            for p, segs in enumerate(self.pieces)
            for i, seg in enumerate(segs)
        ]

    def meter_windows(self) -> list[tuple[str, str, datetime, datetime]]:
        """(label, meter id, start, end) of every meter that a segment's charges price.

        Each segment's window on its own: a meter's aggregate over a period split by a plan
        change is read per part, never derived from the parts' values.
        """
        return [
            (f"{p}.{i}", meter_id, seg.start, seg.end)
            for p, segs in enumerate(self.pieces)
            for i, seg in enumerate(segs)
            if seg.version is not None
            for meter_id in meter_ids_of(seg.version.charges)
        ]


# Per label, each meter's aggregate by meter id (see PricingBasis.meter_windows).
MeterValues = dict[str, dict[str, Decimal]]


async def meter_values_of(tx: PricingReads, bases: Mapping[str, PricingBasis]) -> dict[str, MeterValues]:
    """The meter aggregates that the tenants' invoices price, per tenant, read in one pass."""
    windows = [
        (tenant, label, meter_id, start, end)
        for tenant, basis in bases.items()
        for label, meter_id, start, end in basis.meter_windows()
    ]
    found: dict[str, MeterValues] = {tenant: {} for tenant in bases}
    for (tenant, label, meter_id), value in (await tx.meter_totals(windows)).items():
        found[tenant].setdefault(label, {})[meter_id] = value
    return found


def plan_ids_of(history: Sequence[PlanAssignment]) -> list[str]:
    """The plans (not the rate card) whose versions price a tenant with this plan history."""
    return sorted({a.plan_id for a in history} - {DEFAULT_PLAN})


def pricing_basis(
    start: datetime,
    end: datetime,
    found: tuple[BillingProfile, list[PlanAssignment]] | None,
    versions: Mapping[str, list[PlanVersion]],
    billed_lines: Sequence[tuple[datetime, datetime, LineItem]],
) -> PricingBasis:
    """Sort what was billed (see PricingReads.billed_lines) into the periods to price."""
    profile, history = found if found is not None else (None, list[PlanAssignment]())
    own_versions = {plan_id: list(versions[plan_id]) for plan_id in plan_ids_of(history)}
    billed: dict[tuple[datetime, datetime], list[LineItem]] = defaultdict(list)
    adjusted: dict[tuple[datetime, datetime], list[LineItem]] = defaultdict(list)
    # What interim invoices of this very period billed (spend thresholds): billed again
    # below with a minus, so that this invoice bills only the rest.
    interim: list[LineItem] = []
    for invoice_start, invoice_end, line in billed_lines:
        if (invoice_start, invoice_end) == (start, end) and (
            line.kind is not LineKind.ADJUSTMENT or (line.period_start, line.period_end) == (start, end)
        ):
            interim.append(line)
        elif line.kind is LineKind.ADJUSTMENT:
            assert line.period_start is not None and line.period_end is not None
            adjusted[(line.period_start, line.period_end)].append(line)
        else:
            billed[(invoice_start, invoice_end)].append(line)
    periods = [(start, end), *sorted(billed)]
    pieces = [segments(s, e, history, own_versions) for s, e in periods]
    return PricingBasis(start, end, profile, own_versions, periods, pieces, billed, adjusted, interim)


class InvoicePricer:
    """Prices a tenant's period from the stored profile, plans and usage (see the module docstring).

    Tenants without a profile are billed in `default_currency` from the rate card.
    """

    def __init__(self, default_currency: str) -> None:
        self._default_currency = default_currency

    async def price(
        self,
        tx: PricingReads,
        tenant_id: str,
        start: datetime,
        end: datetime,
        found: tuple[BillingProfile, list[PlanAssignment]] | Literal["unread"] | None = "unread",
    ) -> PricedInvoice:
        """The tenant's invoice for [start, end) priced now, with adjustments for earlier billed periods.

        `found` is the tenant's profile and plan history if the caller has read them already.
        """
        if found == "unread":
            found = await tx.profile(tenant_id)
        versions = await tx.plan_versions(plan_ids_of(found[1] if found is not None else []))
        basis = pricing_basis(start, end, found, versions, await tx.billed_lines(tenant_id, start, end))
        meters = (await meter_values_of(tx, {tenant_id: basis}))[tenant_id]
        return self.price_basis(basis, await tx.usage_rows(tenant_id, basis.labels()), meters)

    def price_basis(
        self,
        basis: PricingBasis,
        usage: Mapping[str, Sequence[UsageRow]],
        meters: MeterValues,
    ) -> PricedInvoice:
        """The invoice priced from its basis, the usage and the meter values of its labels (pure)."""
        profile = basis.profile
        start, end = basis.start, basis.end
        currency = currency_of(profile.currency if profile else self._default_currency)
        overrides = profile.overrides if profile else ()
        unpriced = False
        priced_periods: list[list[LineItem]] = []
        used_plans: set[str] = set()
        for p, ((s, e), segs) in enumerate(zip(basis.periods, basis.pieces, strict=True)):
            parts: list[SegmentUsage] = []
            for i, seg in enumerate(segs):
                rows = usage.get(f"{p}.{i}", ())
                if seg.version is None:
                    # The rate card prices each hour at the rate then in effect.
                    unpriced = unpriced or (p == 0 and any(price is None for _, _, price, _, _ in rows))
                    rated = tuple(
                        PricedUsage(service, usage_type, price, quantity, count)
                        for service, usage_type, price, quantity, count in rows
                        if price is not None
                    )
                    parts.append(SegmentUsage(seg, None, rated))
                else:
                    # A plan prices the segment's total per usage type; rate card prices play no part.
                    summed = tuple(
                        PricedUsage(service, usage_type, Decimal(0), quantity, count)
                        for service, usage_type, _, quantity, count in rows
                    )
                    charges = with_overrides(seg.version, overrides)
                    parts.append(SegmentUsage(seg, charges, summed, meters.get(f"{p}.{i}", {})))
                if p == 0:
                    used_plans.add(seg.plan_id)
            period = BillingPeriod(s, e, full_hours(profile, s, e))
            priced_periods.append(price_segments(currency, period, parts))

        lines = list(priced_periods[0])
        lines.extend(already_billed(start, end, basis.interim))
        for (s, e), repriced in zip(basis.periods[1:], priced_periods[1:], strict=True):
            was = billed_by_charge([*basis.billed[(s, e)], *basis.adjusted[(s, e)]])
            lines.extend(adjustment_items(currency, s, e, was, repriced))
        tax = None
        if profile is not None and profile.tax_percentage is not None:
            tax = Tax("", profile.tax_percentage)
        return PricedInvoice(
            currency.code, finish(currency, lines, tax), tuple(sorted(used_plans)), unpriced, profile
        )


def already_billed(start: datetime, end: datetime, interim: list[LineItem]) -> list[LineItem]:
    """One negative line per charge for what interim invoices of [start, end) billed already."""
    descriptions = {line.charge_key: line.description or line.charge_key for line in interim}
    lines = []
    for key, amount in billed_by_charge(interim).items():
        if amount == 0:
            continue
        label = descriptions.get(key or "", "") if key else "Minimum commitment"
        lines.append(
            LineItem(
                service="",
                usage_type="",
                quantity=Decimal(1),
                unit_price=None,
                amount=-amount,
                event_count=0,
                kind=LineKind.ADJUSTMENT,
                description=f"Billed on interim invoices: {label}",
                charge_key=key or "",
                period_start=start,
                period_end=end,
            )
        )
    return lines
