"""Conversions of plans, charges and billing profiles between protobuf and Tally's plain values.

Charges are built through the engine's own validating dataclasses; their violations are
renamed to the request's paths (`charges[2].graduated.tiers[1].up_to`).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from server.api.convert import to_timestamp
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
)
from server.domain.decimals import (
    MINOR_UNITS,
    PRICE_FRACTION_DIGITS,
    PRICE_INTEGER_DIGITS,
    QUANTITY_FRACTION_DIGITS,
    QUANTITY_INTEGER_DIGITS,
    check_decimal,
    format_price,
    format_quantity,
)
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.meters import meter_name, parse_meter_name
from server.domain.names import billing_profile_name, plan_name
from server.domain.plans import (
    BillingProfile,
    Measures,
    MeterRef,
    Plan,
    PlanCharge,
    PriceOverride,
    UsageTypeRef,
)
from tally.v1 import resources_pb2

_TIMINGS = {
    resources_pb2.FEE_TIMING_UNSPECIFIED: FeeTiming.IN_ARREARS,
    resources_pb2.FEE_TIMING_IN_ARREARS: FeeTiming.IN_ARREARS,
    resources_pb2.FEE_TIMING_IN_ADVANCE: FeeTiming.IN_ADVANCE,
}
_TIMING_ENUMS = {
    FeeTiming.IN_ARREARS: resources_pb2.FEE_TIMING_IN_ARREARS,
    FeeTiming.IN_ADVANCE: resources_pb2.FEE_TIMING_IN_ADVANCE,
}


class _Violations:
    def __init__(self) -> None:
        self.found: list[FieldViolation] = []

    def number(self, text: str, field: str, *, default: str | None = None, price: bool = True) -> Decimal:
        if not text and default is not None:
            return Decimal(default)
        digits = (
            (PRICE_INTEGER_DIGITS, PRICE_FRACTION_DIGITS)
            if price
            else (QUANTITY_INTEGER_DIGITS, QUANTITY_FRACTION_DIGITS)
        )
        if problem := check_decimal(text, max_integer_digits=digits[0], max_fraction_digits=digits[1]):
            self.found.append(FieldViolation(field, problem))
            return Decimal(0)
        return Decimal(text)


def _tiers(message: resources_pb2.TieredPrice, path: str, v: _Violations) -> tuple[Tier, ...]:
    tiers = []
    for index, tier in enumerate(message.tiers):
        here = f"{path}.tiers[{index}]"
        up_to = None if not tier.up_to else v.number(tier.up_to, f"{here}.up_to", price=False)
        unit_price = v.number(tier.unit_price, f"{here}.unit_price")
        flat_fee = v.number(tier.flat_fee, f"{here}.flat_fee", default="0")
        try:
            tiers.append(Tier(up_to, unit_price, flat_fee))
        except InvalidArgument as exc:
            v.found += [FieldViolation(f"{here}.{x.field}", x.description) for x in exc.violations]
    return tuple(tiers)


def _model(
    message: resources_pb2.Charge | resources_pb2.PriceOverride, path: str, v: _Violations
) -> ChargeModel | None:
    kind = message.WhichOneof("model")
    try:
        if kind == "per_unit":
            return PerUnit(v.number(message.per_unit.unit_price, f"{path}.per_unit.unit_price"))
        if kind in ("graduated", "volume"):
            tiers = _tiers(getattr(message, kind), f"{path}.{kind}", v)
            return (Graduated if kind == "graduated" else Volume)(tiers)
        if kind == "package":
            return Package(
                v.number(message.package.size, f"{path}.package.size", price=False),
                v.number(message.package.price, f"{path}.package.price"),
            )
        if kind == "flat_fee":
            timing = _TIMINGS.get(message.flat_fee.timing, FeeTiming.IN_ARREARS)
            return FlatFee(v.number(message.flat_fee.amount, f"{path}.flat_fee.amount"), timing)
    except InvalidArgument as exc:
        v.found += [FieldViolation(f"{path}.{kind}.{x.field}", x.description) for x in exc.violations]
        return None
    v.found.append(FieldViolation(f"{path}.model", "one charge model is required"))
    return None


def charges_in(messages: Sequence[resources_pb2.Charge], field: str = "charges") -> tuple[PlanCharge, ...]:
    """The request's charges as the engine's values; InvalidArgument naming every bad field."""
    v = _Violations()
    charges: list[PlanCharge] = []
    for index, message in enumerate(messages):
        path = f"{field}[{index}]"
        model = _model(message, path, v)
        included = v.number(message.included_quantity, f"{path}.included_quantity", default="0", price=False)
        measures: Measures | None = None
        if message.HasField("usage_type"):
            measures = UsageTypeRef(message.usage_type.service, message.usage_type.usage_type)
            if not measures.service or not measures.usage_type:
                v.found.append(FieldViolation(f"{path}.usage_type", "needs service and usage_type"))
        elif message.HasField("meter"):
            try:
                measures = MeterRef(parse_meter_name(message.meter, f"{path}.meter"))
            except InvalidArgument as exc:
                v.found += exc.violations
                continue
        if model is None:
            continue
        try:
            charges.append(PlanCharge(Charge(message.key, message.description, model, included), measures))
        except InvalidArgument as exc:
            v.found += [FieldViolation(f"{path}.{x.field}", x.description) for x in exc.violations]
    if v.found:
        raise InvalidArgument(v.found)
    return tuple(charges)


def overrides_in(messages: Sequence[resources_pb2.PriceOverride]) -> tuple[PriceOverride, ...]:
    """A profile's price overrides as the engine's values; InvalidArgument naming every bad field."""
    v = _Violations()
    overrides = []
    for index, message in enumerate(messages):
        path = f"billing_profile.price_overrides[{index}]"
        model = _model(message, path, v)
        included = v.number(message.included_quantity, f"{path}.included_quantity", default="0", price=False)
        if model is not None:
            overrides.append(PriceOverride(message.charge_key, model, included))
    if v.found:
        raise InvalidArgument(v.found)
    return tuple(overrides)


def _tiers_message(tiers: Sequence[Tier], minor: int) -> resources_pb2.TieredPrice:
    return resources_pb2.TieredPrice(
        tiers=[
            resources_pb2.PriceTier(
                up_to="" if t.up_to is None else format_quantity(t.up_to),
                unit_price=format_price(t.unit_price, minor),
                flat_fee=format_price(t.flat_fee, minor),
            )
            for t in tiers
        ]
    )


def _set_model(
    message: resources_pb2.Charge | resources_pb2.PriceOverride, model: ChargeModel, minor: int
) -> None:
    match model:
        case PerUnit(unit_price=price):
            message.per_unit.unit_price = format_price(price, minor)
        case Graduated(tiers=tiers):
            message.graduated.CopyFrom(_tiers_message(tiers, minor))
        case Volume(tiers=tiers):
            message.volume.CopyFrom(_tiers_message(tiers, minor))
        case Package(size=size, price=price):
            message.package.size = format_quantity(size)
            message.package.price = format_price(price, minor)
        case FlatFee(amount=amount, timing=timing):
            message.flat_fee.amount = format_price(amount, minor)
            message.flat_fee.timing = _TIMING_ENUMS[timing]


def plan_message(plan: Plan) -> resources_pb2.Plan:
    """A Plan as its proto, every version with its charges, prices in the currency's precision."""
    minor = MINOR_UNITS.get(plan.currency, 2)
    message = resources_pb2.Plan(
        name=plan_name(plan.plan_id),
        display_name=plan.display_name,
        currency_code=plan.currency,
        create_time=to_timestamp(plan.create_time),
    )
    for version in plan.versions:
        item = message.versions.add(
            version=version.version,
            effective_time=to_timestamp(version.effective_from),
            minimum_amount=format_price(version.minimum, minor),
            create_time=to_timestamp(version.create_time),
        )
        for plan_charge in version.charges:
            charge = item.charges.add(
                key=plan_charge.charge.key,
                description=plan_charge.charge.description,
                included_quantity=format_quantity(plan_charge.charge.included_quantity),
            )
            match plan_charge.measures:
                case UsageTypeRef(service=service, usage_type=usage_type):
                    charge.usage_type.service = service
                    charge.usage_type.usage_type = usage_type
                case MeterRef(meter_id=meter_id):
                    charge.meter = meter_name(meter_id)
            _set_model(charge, plan_charge.charge.model, minor)
    return message


def profile_message(profile: BillingProfile) -> resources_pb2.BillingProfile:
    """A BillingProfile as its proto; a plan id as its resource name ("plans/{plan}")."""
    minor = MINOR_UNITS.get(profile.currency, 2)
    message = resources_pb2.BillingProfile(
        name=billing_profile_name(profile.tenant_id),
        tenant_id=profile.tenant_id,
        display_name=profile.display_name,
        email=profile.email,
        currency_code=profile.currency,
        plan=plan_name(profile.plan_id),
        billing_anchor_day=profile.anchor_day,
        billing_start_time=to_timestamp(profile.billing_start),
        tax_percentage="" if profile.tax_percentage is None else format_quantity(profile.tax_percentage),
        spend_threshold="" if profile.spend_threshold is None else format_quantity(profile.spend_threshold),
        closed_until_time=to_timestamp(profile.closed_until),
        create_time=to_timestamp(profile.create_time),
        update_time=to_timestamp(profile.update_time),
    )
    for override in profile.overrides:
        item = message.price_overrides.add(
            charge_key=override.charge_key, included_quantity=format_quantity(override.included_quantity)
        )
        _set_model(item, override.model, minor)
    return message
