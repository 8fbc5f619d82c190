"""Pricing one billing period: a plan's charges and the period's quantities in, invoice lines and totals out.

Pure and exact: the meters are aggregated elsewhere; this module sees one Decimal per
charge. Each line follows the rule of server.domain.charges (computed exactly, rounded
once to the currency's minor unit, half away from zero), and every total is a sum or
difference of rounded amounts, so the invoice adds up as printed:

    subtotal       = sum of the charge lines (usage and flat fees)
    minimum top-up = max(0, minimum - subtotal), the minimum rounded once (and prorated)
    adjustments    = sum of the adjustment lines for earlier periods (see adjustments.py)
    tax            = (subtotal + top-up + adjustments) x percentage / 100, rounded once
    total          = subtotal + top-up + adjustments + tax

Adjustments belong to the periods they correct, whose minimums they already account
for, so they never count toward this period's minimum; they are taxed on this invoice.

Proration is by the hour: a flat fee (and the minimum) for a period of 720 hours of which
120 are covered is fee x 120/720, computed as an exact fraction and rounded once
(100.00 USD -> 16.67). Usage is never prorated: it is what was used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from server.domain.aggregation import TIME_WEIGHTED_DIGITS
from server.domain.charges import (
    MAX_DESCRIPTION_CHARS,
    ZERO,
    Charge,
    FeeTiming,
    FlatFee,
    TierPortion,
    billable_quantity,
    price_usage_model,
)
from server.domain.currencies import Currency
from server.domain.decimals import (
    EXACT,
    PERCENT_FRACTION_DIGITS,
    PERCENT_INTEGER_DIGITS,
    PRICE_FRACTION_DIGITS,
    PRICE_INTEGER_DIGITS,
    check_exact,
    round_fraction,
    round_money,
)
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.ranges import TimeRange

MAX_CHARGES = 1_000
# Aggregated quantities are sums of events of at most 18 + 9 digits each; 36 integer
# digits leave room for 10^18 such events and keep products exact in EXACT. A
# TIME_WEIGHTED meter's unit-hours have 12 decimal places (TIME_WEIGHTED_DIGITS), hence
# 12: 48-digit quantities times 30-digit prices stay well inside EXACT's 120 digits.
AGGREGATE_INTEGER_DIGITS = 36
AGGREGATE_FRACTION_DIGITS = TIME_WEIGHTED_DIGITS


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


@dataclass(frozen=True, slots=True)
class PlanTerms:
    """What prices a period: the currency, the charges (keys unique) and a minimum commitment."""

    currency: Currency
    charges: tuple[Charge, ...]
    minimum: Decimal = ZERO

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        if len(self.charges) > MAX_CHARGES:
            violations.append(FieldViolation("charges", f"must have at most {MAX_CHARGES} charges"))
        first: dict[str, int] = {}
        for index, charge in enumerate(self.charges):
            if charge.key in first:
                violations.append(
                    FieldViolation(
                        f"charges[{index}].key", f"repeats charges[{first[charge.key]}].key {charge.key!r}"
                    )
                )
            first.setdefault(charge.key, index)
        if problem := check_exact(
            self.minimum, max_integer_digits=PRICE_INTEGER_DIGITS, max_fraction_digits=PRICE_FRACTION_DIGITS
        ):
            violations.append(FieldViolation("minimum", problem))
        _raise_if(violations)


@dataclass(frozen=True, slots=True)
class Proration:
    """The part of the period a plan covers, in whole hours (usage is kept per hour)."""

    covered_hours: int
    period_hours: int

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        if self.period_hours <= 0:
            violations.append(FieldViolation("period_hours", "must be greater than 0"))
        if not 0 <= self.covered_hours <= max(self.period_hours, 0):
            violations.append(FieldViolation("covered_hours", "must be between 0 and period_hours"))
        _raise_if(violations)

    @property
    def share(self) -> Fraction:
        """The covered fraction of the period, exact."""
        return Fraction(self.covered_hours, self.period_hours)


@dataclass(frozen=True, slots=True)
class Tax:
    """A tenant's tax, printed as its own line: `percentage` of the amount before tax (20 for 20%)."""

    description: str
    percentage: Decimal

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        if len(self.description) > MAX_DESCRIPTION_CHARS:
            violations.append(
                FieldViolation("description", f"must be at most {MAX_DESCRIPTION_CHARS} characters")
            )
        problem = check_exact(
            self.percentage,
            max_integer_digits=PERCENT_INTEGER_DIGITS,
            max_fraction_digits=PERCENT_FRACTION_DIGITS,
        )
        if problem is None and self.percentage > 100:
            problem = "must be at most 100"
        if problem:
            violations.append(FieldViolation("percentage", problem))
        _raise_if(violations)


@dataclass(frozen=True, slots=True)
class ChargeLine:
    """One charge's line. `amount` is rounded once; `tiers` are its exact, unrounded parts.

    Usage lines: `quantity` is the period's aggregated quantity, `billable_quantity` what
    remains after the included quantity. Flat fee lines: quantity 1, `unit_price` the full
    fee, `proration` the share billed and `timing` when it is billed.
    """

    charge_key: str
    description: str
    quantity: Decimal
    billable_quantity: Decimal
    unit_price: Decimal | None  # None for graduated tiers: see `tiers`
    amount: Decimal
    tiers: tuple[TierPortion, ...] = ()
    packages: Decimal | None = None
    proration: Proration | None = None
    timing: FeeTiming | None = None


@dataclass(frozen=True, slots=True)
class MinimumLine:
    """The plan's minimum commitment (prorated, rounded once) and the top-up it adds (may be 0)."""

    description: str
    minimum: Decimal
    proration: Proration | None
    amount: Decimal


@dataclass(frozen=True, slots=True)
class AdjustmentLine:
    """A correction of an earlier period: re-priced minus already invoiced, for one charge.

    `charge_key` None is the period's minimum top-up. `amount` may be negative.
    """

    period: TimeRange
    charge_key: str | None
    description: str
    invoiced: Decimal
    repriced: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class TaxLine:
    """The tax line: `percentage` of `taxable_amount` (after the minimum and adjustments), rounded."""

    description: str
    percentage: Decimal
    taxable_amount: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Totals:
    """A period's totals, each rounded to the currency's minor units.

    `total` is `subtotal` + `minimum_top_up` + `adjustments` + `tax`.
    """

    subtotal: Decimal
    minimum_top_up: Decimal
    adjustments: Decimal
    tax: Decimal
    total: Decimal


@dataclass(frozen=True, slots=True)
class PricedPeriod:
    """A period's invoice content, in print order: charge lines, minimum, adjustments, tax, totals."""

    currency: Currency
    lines: tuple[ChargeLine, ...]
    minimum: MinimumLine | None
    adjustments: tuple[AdjustmentLine, ...]
    tax: TaxLine | None
    totals: Totals


def _check_quantities(terms: PlanTerms, quantities: Mapping[str, Decimal]) -> None:
    usage_keys = {charge.key for charge in terms.charges if charge.is_usage}
    fee_keys = {charge.key for charge in terms.charges if not charge.is_usage}
    violations: list[FieldViolation] = []
    for key, quantity in sorted(quantities.items()):
        field = f"quantities[{key!r}]"
        if key in fee_keys:
            violations.append(FieldViolation(field, "is a flat fee, which takes no quantity"))
        elif key not in usage_keys:
            violations.append(FieldViolation(field, "names no charge of the plan"))
        elif problem := check_exact(
            quantity,
            max_integer_digits=AGGREGATE_INTEGER_DIGITS,
            max_fraction_digits=AGGREGATE_FRACTION_DIGITS,
        ):
            violations.append(FieldViolation(field, problem))
    _raise_if(violations)


def _check_adjustments(adjustments: Sequence[AdjustmentLine], currency: Currency) -> None:
    violations = [
        FieldViolation(
            f"adjustments[{index}].amount",
            f"must be an amount in whole minor units of {currency.code} ({currency.minor_units} digits)",
        )
        for index, adjustment in enumerate(adjustments)
        if round_money(adjustment.amount, currency.minor_units) != adjustment.amount
    ]
    _raise_if(violations)


def _prorated(amount: Decimal, proration: Proration | None, minor_units: int) -> Decimal:
    if proration is None:
        return round_money(amount, minor_units)
    return round_fraction(Fraction(amount) * proration.share, minor_units)


def price_charge(
    charge: Charge, quantity: Decimal, proration: Proration | None, currency: Currency
) -> ChargeLine:
    """One charge's line: priced exactly, rounded once."""
    description = charge.description or charge.key
    if isinstance(charge.model, FlatFee):
        fee = charge.model
        amount = _prorated(fee.amount, proration, currency.minor_units)
        one = Decimal(1)
        return ChargeLine(
            charge.key, description, one, one, fee.amount, amount, proration=proration, timing=fee.timing
        )
    billable = billable_quantity(quantity, charge.included_quantity)
    price = price_usage_model(charge.model, billable)
    return ChargeLine(
        charge.key,
        description,
        quantity,
        billable,
        price.unit_price,
        round_money(price.amount, currency.minor_units),
        price.tiers,
        price.packages,
    )


def _sum(amounts: Sequence[Decimal], minor_units: int) -> Decimal:
    total = round_money(ZERO, minor_units)
    for amount in amounts:
        total = EXACT.add(total, amount)
    return total


def price_period(
    terms: PlanTerms,
    quantities: Mapping[str, Decimal],
    *,
    proration: Proration | None = None,
    tax: Tax | None = None,
    adjustments: Sequence[AdjustmentLine] = (),
) -> PricedPeriod:
    """Price one period of one plan. A usage charge missing from `quantities` used nothing.

    `proration` None bills the whole period. Raises InvalidArgument naming each bad
    quantity (`quantities['api/requests']`) or adjustment.
    """
    _check_quantities(terms, quantities)
    currency = terms.currency
    _check_adjustments(adjustments, currency)
    digits = currency.minor_units
    lines = tuple(
        price_charge(charge, quantities.get(charge.key, ZERO), proration, currency)
        for charge in terms.charges
    )
    subtotal = _sum([line.amount for line in lines], digits)
    minimum_line: MinimumLine | None = None
    top_up = round_money(ZERO, digits)
    if terms.minimum > 0:
        minimum = _prorated(terms.minimum, proration, digits)
        top_up = max(top_up, EXACT.subtract(minimum, subtotal))
        minimum_line = MinimumLine("Minimum commitment", minimum, proration, top_up)
    adjusted = _sum([adjustment.amount for adjustment in adjustments], digits)
    taxable = EXACT.add(EXACT.add(subtotal, top_up), adjusted)
    tax_line: TaxLine | None = None
    tax_amount = round_money(ZERO, digits)
    if tax is not None:
        exact_tax = EXACT.multiply(taxable, tax.percentage).scaleb(-2, context=EXACT)
        tax_amount = round_money(exact_tax, digits)
        tax_line = TaxLine(tax.description or "Tax", tax.percentage, taxable, tax_amount)
    totals = Totals(subtotal, top_up, adjusted, tax_amount, EXACT.add(taxable, tax_amount))
    return PricedPeriod(currency, lines, minimum_line, tuple(adjustments), tax_line, totals)
