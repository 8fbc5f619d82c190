"""The charge engine: models, the once-per-line rounding rule, minimums, proration, tax, adjustments.

Pure domain tests. Hand-computed numbers pin the documented cases (docs/billing.md);
hypothesis checks the invariants against an independent exact computation written here.
"""

from __future__ import annotations

import dataclasses
import random
from decimal import ROUND_HALF_UP, Context, Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain.adjustments import adjustment_lines, billed_amounts
from server.domain.charges import (
    Charge,
    ChargeModel,
    FeeTiming,
    FlatFee,
    Graduated,
    Package,
    PerUnit,
    Tier,
    Volume,
    violations_under,
)
from server.domain.currencies import CURRENCIES, Currency, currency_of
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.period_pricing import (
    PlanTerms,
    PricedPeriod,
    Proration,
    Tax,
    price_charge,
    price_period,
)
from server.domain.ranges import TimeRange

USD = currency_of("USD")
JPY = currency_of("JPY")
KWD = currency_of("KWD")
D = Decimal
ZERO = Decimal(0)
WIDE = Context(prec=200)  # the tests' own exact arithmetic, independent of decimals.EXACT
PROPERTY = settings(max_examples=150, deadline=None)
PERIOD = TimeRange(0, 720 * 3_600_000_000)

# The documented example: 0-1,000 at 0.10, 1,000-5,000 at 0.08, above 5,000 at 0.05.
DOC_TIERS = (Tier(D(1000), D("0.10")), Tier(D(5000), D("0.08")), Tier(None, D("0.05")))


def half_up(value: Decimal | Fraction, digits: int) -> Decimal:
    """Round half away from zero, computed independently of the engine."""
    if isinstance(value, Decimal):
        return value.quantize(D(1).scaleb(-digits), rounding=ROUND_HALF_UP, context=WIDE)
    scaled = value * 10**digits
    units = int(abs(scaled) + Fraction(1, 2))  # floor(|x| + 1/2): half away from zero
    return D(units if scaled >= 0 else -units).scaleb(-digits, context=WIDE)


def graduated_by_hand(tiers: tuple[Tier, ...], quantity: Decimal) -> Decimal:
    total, below = D(0), D(0)
    for tier in tiers:
        top = quantity if tier.up_to is None else min(quantity, tier.up_to)
        units = max(D(0), WIDE.subtract(top, below))
        if units > 0:
            total = WIDE.add(total, WIDE.add(WIDE.multiply(units, tier.unit_price), tier.flat_fee))
        if tier.up_to is not None:
            below = tier.up_to
    return total


def line_amount(
    model: ChargeModel, quantity: Decimal, included: Decimal = ZERO, currency: Currency = USD
) -> Decimal:
    charge = Charge("c", "", model, included)
    return price_charge(charge, quantity, None, currency).amount


def plan(*charges: Charge, minimum: Decimal = ZERO, currency: Currency = USD) -> PlanTerms:
    return PlanTerms(currency, charges, minimum)


# --- strategies -------------------------------------------------------------------

quantities = st.integers(0, 10**10).map(lambda n: D(n).scaleb(-3))  # up to 10 million, 3 decimals
prices = st.integers(0, 10**6).map(lambda n: D(n).scaleb(-4))  # up to 100, 4 decimals
fees = st.one_of(st.just(D(0)), st.integers(0, 10**5).map(lambda n: D(n).scaleb(-2)))


@st.composite
def tier_lists(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds = sorted(draw(st.sets(st.integers(1, 10**7), max_size=5)))
    tops: list[Decimal | None] = [D(b) for b in bounds]
    tops.append(None)
    return tuple(Tier(top, draw(prices), draw(fees)) for top in tops)


usage_models = st.one_of(
    prices.map(PerUnit),
    tier_lists().map(Graduated),
    tier_lists().map(Volume),
    st.builds(Package, st.integers(1, 10**4).map(D), prices),
)


# --- the documented examples, by hand ------------------------------------------------


def test_graduated_example_is_one_line_rounded_once_from_the_exact_tier_sum() -> None:
    line = price_charge(Charge("api", "API calls", Graduated(DOC_TIERS)), D("7250.5"), None, USD)
    # 1,000 x 0.10 = 100.00; 4,000 x 0.08 = 320.00; 2,250.5 x 0.05 = 112.525; sum 532.525 -> 532.53
    assert [(p.tier, p.quantity, p.amount) for p in line.tiers] == [
        (1, D(1000), D("100.00")),
        (2, D(4000), D("320.00")),
        (3, D("2250.5"), D("112.525")),
    ]
    assert line.amount == D("532.53")
    assert line.unit_price is None


def test_rounding_each_tier_first_would_give_another_amount_and_is_not_done() -> None:
    tiers = (Tier(D(1), D("0.004")), Tier(None, D("0.004")))
    # Tier by tier: 0.004 -> 0.00 and 0.004 -> 0.00; the rule: 0.008 -> 0.01.
    assert line_amount(Graduated(tiers), D(2)) == D("0.01")


def test_volume_example_prices_every_unit_at_the_reached_tier() -> None:
    line = price_charge(Charge("api", "", Volume(DOC_TIERS)), D("7250.5"), None, USD)
    assert line.unit_price == D("0.05")
    assert line.amount == D("362.53")  # 7,250.5 x 0.05 = 362.525
    assert line_amount(Volume(DOC_TIERS), D(1000)) == D("100.00")  # up_to is inclusive: still tier 1
    assert line_amount(Volume(DOC_TIERS), D("1000.001")) == D("80.00")  # 80.00008


def test_tier_flat_fees_are_charged_once_the_quantity_reaches_into_the_tier() -> None:
    tiers = (Tier(D(10), D(1), D(5)), Tier(None, D("0.5"), D(20)))
    assert line_amount(Graduated(tiers), D(0)) == D("0.00")
    assert line_amount(Graduated(tiers), D(10)) == D("15.00")  # 10 x 1 + 5; tier 2 not reached
    assert line_amount(Graduated(tiers), D("10.5")) == D("35.25")  # 15 + 0.5 x 0.5 + 20
    assert line_amount(Volume(tiers), D("10.5")) == D("25.25")  # 10.5 x 0.5 + 20


def test_package_counts_started_blocks_after_the_included_quantity() -> None:
    model = Package(D(1000), D(5))
    assert line_amount(model, D(1000)) == D("5.00")
    assert line_amount(model, D(1001)) == D("10.00")
    assert line_amount(model, D(2100), included=D(100)) == D("10.00")  # 2,000 billable: 2 blocks
    line = price_charge(Charge("c", "", model, D(100)), D("2100.5"), None, USD)
    assert (line.billable_quantity, line.packages, line.amount) == (D("2000.5"), D(3), D("15.00"))


def test_flat_fee_is_prorated_by_the_hour_exactly_and_rounded_once() -> None:
    fee = Charge("base", "Platform fee", FlatFee(D(100), FeeTiming.IN_ADVANCE))
    assert price_charge(fee, D(0), None, USD).amount == D("100.00")
    line = price_charge(fee, D(0), Proration(covered_hours=120, period_hours=720), USD)
    assert line.amount == D("16.67")  # 100 x 120/720 = 16.666...
    assert line.timing is FeeTiming.IN_ADVANCE
    assert price_charge(fee, D(0), Proration(5, 720), USD).amount == D("0.69")  # 0.6944...
    assert price_charge(fee, D(0), Proration(9, 720), USD).amount == D("1.25")  # exactly 1.25
    yen = Charge("base", "", FlatFee(D(1000)))
    assert price_charge(yen, D(0), Proration(1, 48), JPY).amount == D(21)  # 20.83...


def test_minor_units_of_jpy_and_kwd_decide_where_lines_round() -> None:
    assert line_amount(Graduated(DOC_TIERS), D("7250.5"), currency=JPY) == D(533)  # 532.525
    assert line_amount(Graduated(DOC_TIERS), D("7250.5"), currency=KWD) == D("532.525")
    assert line_amount(PerUnit(D("0.0005")), D(1), currency=KWD) == D("0.001")  # half away from zero
    priced = price_period(plan(Charge("c", "", PerUnit(D("1.5"))), currency=JPY), {"c": D(3)})
    assert priced.totals.total == D(5)  # 4.5 -> 5
    assert str(priced.totals.total) == "5"
    assert str(price_period(plan(currency=KWD), {}).totals.total) == "0.000"


def test_whole_invoice_with_minimum_and_tax_adds_up_as_printed() -> None:
    terms = plan(
        Charge("api", "API calls", Graduated(DOC_TIERS), included_quantity=D(250)),
        Charge("storage", "Storage GB-hours", PerUnit(D("0.002"))),
        Charge("base", "Platform fee", FlatFee(D(49))),
        minimum=D(600),
    )
    priced = price_period(terms, {"api": D("7500.5"), "storage": D("1234.5")}, tax=Tax("VAT 20%", D(20)))
    # api: 7,250.5 billable -> 532.53; storage: 2.469 -> 2.47; base 49.00
    assert [line.amount for line in priced.lines] == [D("532.53"), D("2.47"), D("49.00")]
    totals = priced.totals
    assert (totals.subtotal, totals.minimum_top_up) == (D("584.00"), D("16.00"))
    assert priced.tax is not None and priced.tax.taxable_amount == D("600.00")
    assert (totals.tax, totals.total) == (D("120.00"), D("720.00"))


def test_tax_is_its_own_line_rounded_once() -> None:
    terms = plan(Charge("c", "", PerUnit(D("0.01"))))
    priced = price_period(terms, {"c": D(5)}, tax=Tax("Sales tax", D("19")))
    assert (priced.totals.subtotal, priced.totals.tax, priced.totals.total) == (
        D("0.05"),
        D("0.01"),
        D("0.06"),
    )
    assert price_period(terms, {"c": D(5)}).tax is None
    # 0.45 x 1% = 0.0045 -> 0.00; rounding through 0.005 first would make it 0.01.
    assert price_period(terms, {"c": D(45)}, tax=Tax("", D(1))).totals.tax == D("0.00")


@PROPERTY
@given(
    st.integers(0, 10**9).map(lambda n: D(n).scaleb(-2)), st.integers(0, 10**8).map(lambda n: D(n).scaleb(-6))
)
def test_tax_is_the_exact_rate_of_the_pre_tax_amount_rounded_once(
    amount: Decimal, percentage: Decimal
) -> None:
    terms = plan(Charge("fee", "", FlatFee(amount)))
    priced = price_period(terms, {}, tax=Tax("", percentage))
    assert priced.totals.tax == half_up(WIDE.multiply(amount, percentage) / 100, 2)
    assert priced.totals.total == priced.totals.subtotal + priced.totals.tax


# --- properties -------------------------------------------------------------------


@PROPERTY
@given(tier_lists(), quantities, quantities)
def test_graduated_total_never_decreases_with_quantity(
    tiers: tuple[Tier, ...], a: Decimal, b: Decimal
) -> None:
    low, high = sorted((a, b))
    assert line_amount(Graduated(tiers), low) <= line_amount(Graduated(tiers), high)


@PROPERTY
@given(tier_lists(), quantities)
def test_graduated_line_is_the_independent_tier_sum_rounded_once(tiers: tuple[Tier, ...], q: Decimal) -> None:
    line = price_charge(Charge("c", "", Graduated(tiers)), q, None, USD)
    exact = graduated_by_hand(tiers, q)
    assert sum((p.amount for p in line.tiers), D(0)) == exact
    assert line.amount == half_up(exact, 2)


@PROPERTY
@given(tier_lists(), quantities.filter(lambda q: q > 0))
def test_volume_prices_all_units_at_exactly_one_tier(tiers: tuple[Tier, ...], q: Decimal) -> None:
    line = price_charge(Charge("c", "", Volume(tiers)), q, None, USD)
    assert len(line.tiers) == 1
    (picked,) = line.tiers
    bounds = [tier.up_to for tier in tiers]
    reached = [i for i, up_to in enumerate(bounds) if up_to is None or q <= up_to]
    tier = tiers[reached[0]]
    assert picked.tier == reached[0] + 1
    assert picked.quantity == q
    assert line.amount == half_up(q * tier.unit_price + tier.flat_fee, 2)


@PROPERTY
@given(st.integers(1, 10**4).map(D), prices, quantities)
def test_package_rounds_blocks_up(size: Decimal, price: Decimal, q: Decimal) -> None:
    line = price_charge(Charge("c", "", Package(size, price)), q, None, USD)
    assert line.packages is not None and line.packages == line.packages.to_integral_value()
    assert line.packages * size >= q > (line.packages - 1) * size
    assert line.amount == half_up(line.packages * price, 2)


@PROPERTY
@given(usage_models, quantities, quantities)
def test_included_quantity_never_bills(model: ChargeModel, q: Decimal, extra: Decimal) -> None:
    assert line_amount(model, q, included=q + extra) == D("0.00")
    # ...and past it, only what exceeds it is billed.
    assert line_amount(model, q + extra, included=q) == line_amount(model, extra)


@PROPERTY
@given(usage_models, st.lists(quantities, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_totals_do_not_depend_on_how_usage_is_split_or_ordered(
    model: ChargeModel, parts: list[Decimal], rng: random.Random
) -> None:
    terms = plan(Charge("c", "", model))
    whole = price_period(terms, {"c": sum(parts, D(0))})
    shuffled = parts[:]
    rng.shuffle(shuffled)
    cut = rng.randrange(len(shuffled) + 1)
    batched = sum(shuffled[:cut], D(0)) + sum(shuffled[cut:], D(0))  # two batches, another order
    assert price_period(terms, {"c": batched}) == whole


@PROPERTY
@given(prices, quantities)
def test_per_unit_line_rounds_once_from_the_exact_product(price: Decimal, q: Decimal) -> None:
    assert line_amount(PerUnit(price), q) == half_up(WIDE.multiply(q, price), 2)


@PROPERTY
@given(
    st.lists(st.tuples(usage_models, quantities), max_size=5),
    st.integers(0, 10**8).map(lambda n: D(n).scaleb(-2)),
)
def test_minimum_top_up_never_lowers_the_total_and_reaches_the_minimum(
    charged: list[tuple[ChargeModel, Decimal]], minimum: Decimal
) -> None:
    charges = [Charge(f"c{i}", "", model) for i, (model, _) in enumerate(charged)]
    used = {f"c{i}": q for i, (_, q) in enumerate(charged)}
    without = price_period(plan(*charges), used)
    priced = price_period(plan(*charges, minimum=minimum), used)
    assert priced.totals.subtotal == without.totals.subtotal
    assert priced.totals.total >= without.totals.total
    assert priced.totals.total >= minimum
    assert priced.totals.minimum_top_up == max(D(0), minimum - without.totals.subtotal)
    assert priced.totals.total == priced.totals.subtotal + priced.totals.minimum_top_up


def _leaves(value: object, name: str = "") -> list[tuple[str, object]]:
    """Every (field name, value) leaf of a priced period, through dataclasses and tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [leaf for f in dataclasses.fields(value) for leaf in _leaves(getattr(value, f.name), f.name)]
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _leaves(item, name)]
    return [(name, value)]


COUNTS = {"tier", "covered_hours", "period_hours", "minor_units"}  # the only whole-number fields


@PROPERTY
@given(
    st.lists(st.tuples(usage_models, quantities), max_size=4),
    st.sampled_from(sorted(CURRENCIES)),
    st.integers(0, 720),
    st.integers(0, 100),
)
def test_every_number_is_a_decimal_and_every_amount_is_in_minor_units(
    charged: list[tuple[ChargeModel, Decimal]], code: str, hours: int, percent: int
) -> None:
    currency = CURRENCIES[code]
    charges = [Charge(f"c{i}", "", model) for i, (model, _) in enumerate(charged)]
    charges.append(Charge("fee", "", FlatFee(D("99.999"))))
    priced = price_period(
        PlanTerms(currency, tuple(charges), D("123.4567")),
        {f"c{i}": q for i, (_, q) in enumerate(charged)},
        proration=Proration(hours, 720),
        tax=Tax("", D(percent)),
    )
    numbers = [(name, v) for name, v in _leaves(priced) if isinstance(v, (int, float, Fraction, Decimal))]
    assert numbers
    assert [(name, v) for name, v in numbers if type(v) is not Decimal and name not in COUNTS] == []
    assert [(name, v) for name, v in numbers if name in COUNTS and type(v) is not int] == []
    minor = D(1).scaleb(-currency.minor_units)
    amounts = [line.amount for line in priced.lines] + list(dataclasses.astuple(priced.totals))
    assert all(type(a) is Decimal and a.as_tuple().exponent == -currency.minor_units for a in amounts)
    assert all(a == a.quantize(minor) for a in amounts)
    assert priced.totals.total == sum(amounts[: len(priced.lines)], D(0)) + priced.totals.minimum_top_up + (
        priced.totals.tax
    )


# --- adjustments for late usage ---------------------------------------------------------


def test_late_usage_on_graduated_tiers_is_billed_at_the_tier_the_period_reaches() -> None:
    terms = plan(Charge("api", "API calls", Graduated(DOC_TIERS)))
    invoiced = price_period(terms, {"api": D(4000)})  # 100.00 + 3,000 x 0.08 = 340.00
    repriced = price_period(terms, {"api": D(6000)})  # 100.00 + 320.00 + 1,000 x 0.05 = 470.00
    (line,) = adjustment_lines(PERIOD, billed_amounts(invoiced), repriced)
    assert (line.charge_key, line.invoiced, line.repriced, line.amount) == (
        "api",
        D("340.00"),
        D("470.00"),
        D("130.00"),
    )
    assert line.period == PERIOD


def test_late_usage_that_a_minimum_already_covered_adjusts_to_nothing_in_total() -> None:
    terms = plan(Charge("api", "", PerUnit(D(1))), minimum=D(100))
    invoiced = price_period(terms, {"api": D(50)})  # 50.00 + top-up 50.00
    repriced = price_period(terms, {"api": D(80)})  # 80.00 + top-up 20.00
    lines = adjustment_lines(PERIOD, billed_amounts(invoiced), repriced)
    assert [(line.charge_key, line.amount) for line in lines] == [("api", D("30.00")), (None, D("-30.00"))]


def test_unique_counts_are_adjusted_by_their_new_aggregate_not_by_the_late_events() -> None:
    terms = plan(Charge("users", "Active users", PerUnit(D(2))))
    invoiced = price_period(terms, {"users": D(100)})
    # 30 late events, all from users already counted: the unique count stays 100.
    assert adjustment_lines(PERIOD, billed_amounts(invoiced), price_period(terms, {"users": D(100)})) == ()
    (line,) = adjustment_lines(PERIOD, billed_amounts(invoiced), price_period(terms, {"users": D(104)}))
    assert line.amount == D("8.00")


def test_adjustments_already_billed_count_as_billed_and_a_cancelled_event_credits() -> None:
    terms = plan(Charge("api", "", Volume(DOC_TIERS)))
    invoiced = price_period(terms, {"api": D(900)})  # 90.00
    first = adjustment_lines(PERIOD, billed_amounts(invoiced), price_period(terms, {"api": D(1100)}))
    assert [line.amount for line in first] == [D("-2.00")]  # 1,100 x 0.08 = 88.00: volume tiers can credit
    billed = billed_amounts(invoiced, first)
    assert adjustment_lines(PERIOD, billed, price_period(terms, {"api": D(1100)})) == ()
    second = adjustment_lines(PERIOD, billed, price_period(terms, {"api": D(1000)}))
    assert [line.amount for line in second] == [D("12.00")]  # back to 100.00


@PROPERTY
@given(
    st.lists(usage_models, min_size=1, max_size=4),
    st.data(),
    st.integers(0, 10**6).map(lambda n: D(n).scaleb(-2)),
)
def test_adjustments_add_up_to_the_change_of_the_period_and_settle_it(
    models: list[ChargeModel], data: st.DataObject, minimum: Decimal
) -> None:
    terms = plan(*(Charge(f"c{i}", "", model) for i, model in enumerate(models)), minimum=minimum)
    before = {f"c{i}": data.draw(quantities) for i in range(len(models))}
    after = {key: q + data.draw(quantities) for key, q in before.items()}
    invoiced, repriced = price_period(terms, before), price_period(terms, after)
    lines = adjustment_lines(PERIOD, billed_amounts(invoiced), repriced)
    assert sum((line.amount for line in lines), D(0)) == pre_tax(repriced) - pre_tax(invoiced)
    assert adjustment_lines(PERIOD, billed_amounts(invoiced, lines), repriced) == ()


def pre_tax(priced: PricedPeriod) -> Decimal:
    return priced.totals.subtotal + priced.totals.minimum_top_up


def test_adjustments_on_the_next_invoice_are_taxed_but_not_counted_toward_its_minimum() -> None:
    terms = plan(Charge("api", "", PerUnit(D(1))), minimum=D(100))
    late = adjustment_lines(
        PERIOD, billed_amounts(price_period(terms, {"api": D(150)})), price_period(terms, {"api": D(170)})
    )
    priced = price_period(terms, {"api": D(40)}, tax=Tax("VAT", D(10)), adjustments=late)
    totals = priced.totals
    assert (totals.subtotal, totals.minimum_top_up, totals.adjustments) == (
        D("40.00"),
        D("60.00"),
        D("20.00"),
    )
    assert (totals.tax, totals.total) == (D("12.00"), D("132.00"))


# --- validation ---------------------------------------------------------------------


def test_tier_errors_are_named_by_their_path_in_the_request() -> None:
    specs = [
        [("10", "1"), (None, "0.5")],
        [("10", "1"), ("10", "0.5"), ("5", "0.2"), (None, "0.1")],  # bounds not increasing
        [("10", "1"), ("-3", "0.5"), (None, "x")],  # a negative bound and a bad price
    ]
    violations: list[FieldViolation] = []
    for c, spec in enumerate(specs):
        tiers: list[Tier] = []
        bad_tiers = False
        for t, (up_to, price) in enumerate(spec):
            try:
                tiers.append(
                    Tier(None if up_to is None else D(up_to), D(price) if price != "x" else D("NaN"))
                )
            except InvalidArgument as error:
                bad_tiers = True
                violations += violations_under(f"charges[{c}].tiers[{t}]", error)
        if bad_tiers:
            continue  # as an API builder would: the list's own checks need valid tiers
        try:
            Graduated(tuple(tiers))
        except InvalidArgument as error:
            violations += violations_under(f"charges[{c}]", error)
    assert [(v.field, v.description) for v in violations] == [
        ("charges[1].tiers[1].up_to", "must be greater than tiers[0].up_to (10)"),
        ("charges[1].tiers[2].up_to", "must be greater than tiers[1].up_to (10)"),
        ("charges[2].tiers[1].up_to", "must be greater than 0"),
        ("charges[2].tiers[2].unit_price", "must be a finite number"),
    ]


def test_each_model_reports_every_bad_field_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        Tier(D(0), D("-1"), D("0.0000000000001"))
    assert [v.field for v in caught.value.violations] == ["up_to", "unit_price", "flat_fee"]
    with pytest.raises(InvalidArgument) as caught:
        Graduated((Tier(None, D(1)), Tier(D(5), D(1))))
    assert [v.field for v in caught.value.violations] == ["tiers[0].up_to", "tiers[1].up_to"]
    with pytest.raises(InvalidArgument) as caught:
        Volume(())
    assert [v.field for v in caught.value.violations] == ["tiers"]
    with pytest.raises(InvalidArgument) as caught:
        Package(D(0), 1.5)  # type: ignore[arg-type]  # a float is refused at run time too
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("size", "must be greater than 0"),
        ("price", "must be an exact Decimal, not float"),
    ]
    with pytest.raises(InvalidArgument) as caught:
        Charge("bad key", "", FlatFee(D(1)), included_quantity=D(5))
    assert [v.field for v in caught.value.violations] == ["key", "included_quantity"]


def test_plan_terms_period_inputs_and_currencies_are_checked() -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan(Charge("a", "", PerUnit(D(1))), Charge("b", "", PerUnit(D(1))), Charge("a", "", PerUnit(D(2))))
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("charges[2].key", "repeats charges[0].key 'a'")
    ]
    terms = plan(Charge("a", "", PerUnit(D(1))), Charge("fee", "", FlatFee(D(1))))
    with pytest.raises(InvalidArgument) as caught:
        price_period(terms, {"a": D(-1), "fee": D(1), "zzz": D(1)})
    assert [v.field for v in caught.value.violations] == [
        "quantities['a']",
        "quantities['fee']",
        "quantities['zzz']",
    ]
    with pytest.raises(InvalidArgument) as caught:
        Proration(covered_hours=721, period_hours=720)
    assert [v.field for v in caught.value.violations] == ["covered_hours"]
    with pytest.raises(InvalidArgument) as caught:
        Tax("VAT", D(101))
    assert [v.field for v in caught.value.violations] == ["percentage"]
    with pytest.raises(InvalidArgument) as caught:
        currency_of("XYZ", field="plan.currency_code")
    assert [v.field for v in caught.value.violations] == ["plan.currency_code"]
    assert (JPY.minor_units, USD.minor_units, KWD.minor_units) == (0, 2, 3)
    assert [CURRENCIES[c].minor_units for c in ("EUR", "GBP", "CHF", "BHD")] == [2, 2, 2, 3]


def test_priced_period_is_immutable() -> None:
    priced: PricedPeriod = price_period(plan(Charge("a", "", PerUnit(D(1)))), {"a": D(1)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        priced.lines[0].amount = D(0)  # type: ignore[misc]
