"""Between plans, charges and billing profiles (tally_client.pricing) and their tally.v1 messages.

As in tally_client.convert, exact numbers travel as decimal strings without exponent and
nothing passes through a float. The server fills every number it answers; an empty
string reads as the proto's documented default (0, or None where "empty" means "not set").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from tally.v1 import billing_service_pb2, resources_pb2
from tally_client.convert import decimal_text, from_timestamp, timestamp
from tally_client.models import Quantity
from tally_client.names import billing_profile_name, parse_tenant_name, plan_name
from tally_client.pricing import (
    BillingProfile,
    Charge,
    FeeTiming,
    FlatFee,
    Graduated,
    Package,
    PerUnit,
    Plan,
    PlanVersion,
    PriceModel,
    PriceOverride,
    PriceTier,
    Volume,
)

_TIMINGS = {
    FeeTiming.IN_ARREARS: resources_pb2.FEE_TIMING_IN_ARREARS,
    FeeTiming.IN_ADVANCE: resources_pb2.FEE_TIMING_IN_ADVANCE,
}
# FEE_TIMING_UNSPECIFIED means in arrears (the proto's default).
_TIMINGS_BACK = {value: key for key, value in _TIMINGS.items()} | {
    resources_pb2.FEE_TIMING_UNSPECIFIED: FeeTiming.IN_ARREARS
}


def _number(text: str) -> Decimal:
    return Decimal(text) if text else Decimal(0)


# -- to the server -----------------------------------------------------------------------


def _tiers_message(tiers: Sequence[PriceTier]) -> resources_pb2.TieredPrice:
    return resources_pb2.TieredPrice(
        tiers=[
            resources_pb2.PriceTier(
                up_to="" if tier.up_to is None else decimal_text(tier.up_to, "up_to"),
                unit_price=decimal_text(tier.unit_price, "unit_price"),
                flat_fee=decimal_text(tier.flat_fee, "flat_fee"),
            )
            for tier in tiers
        ]
    )


def _set_model(message: resources_pb2.Charge | resources_pb2.PriceOverride, model: PriceModel) -> None:
    match model:
        case PerUnit(unit_price=price):
            message.per_unit.unit_price = decimal_text(price, "unit_price")
        case Graduated(tiers=tiers):
            message.graduated.CopyFrom(_tiers_message(tiers))
        case Volume(tiers=tiers):
            message.volume.CopyFrom(_tiers_message(tiers))
        case Package(size=size, price=price):
            message.package.size = decimal_text(size, "size")
            message.package.price = decimal_text(price, "price")
        case FlatFee(amount=amount, timing=timing):
            message.flat_fee.amount = decimal_text(amount, "amount")
            message.flat_fee.timing = _TIMINGS[timing]
        case _:
            raise TypeError(f"a price model is PerUnit, Graduated, Volume, Package or FlatFee, not {model!r}")


def charge_message(charge: Charge) -> resources_pb2.Charge:
    """A Charge as its proto; a charge without service and usage type measures nothing (a flat fee)."""
    message = resources_pb2.Charge(
        key=charge.key,
        description=charge.description,
        included_quantity=decimal_text(charge.included_quantity, "included_quantity"),
    )
    if charge.service or charge.usage_type:
        message.usage_type.service = charge.service
        message.usage_type.usage_type = charge.usage_type
    _set_model(message, charge.model)
    return message


def price_override_message(override: PriceOverride) -> resources_pb2.PriceOverride:
    """A PriceOverride as its proto."""
    message = resources_pb2.PriceOverride(
        charge_key=override.charge_key,
        included_quantity=decimal_text(override.included_quantity, "included_quantity"),
    )
    _set_model(message, override.model)
    return message


def create_plan_request(
    plan_id: str,
    display_name: str,
    currency_code: str,
    *,
    charges: Sequence[Charge],
    minimum_amount: Quantity | None,
    effective_time: datetime | None,
    request_id: str,
) -> billing_service_pb2.CreatePlanRequest:
    """The CreatePlan request; None leaves the server's default (minimum 0, the current hour)."""
    request = billing_service_pb2.CreatePlanRequest(
        plan_id=plan_id.removeprefix("plans/"),
        display_name=display_name,
        currency_code=currency_code,
        charges=[charge_message(charge) for charge in charges],
        minimum_amount="" if minimum_amount is None else decimal_text(minimum_amount, "minimum_amount"),
        request_id=request_id,
    )
    if effective_time is not None:
        request.effective_time.CopyFrom(timestamp(effective_time, "effective_time"))
    return request


def create_plan_version_request(
    plan: str,
    *,
    charges: Sequence[Charge],
    minimum_amount: Quantity | None,
    effective_time: datetime | None,
    request_id: str,
) -> billing_service_pb2.CreatePlanVersionRequest:
    """The CreatePlanVersion request; None leaves the server's default (minimum 0, the next hour)."""
    request = billing_service_pb2.CreatePlanVersionRequest(
        parent=plan_name(plan),
        charges=[charge_message(charge) for charge in charges],
        minimum_amount="" if minimum_amount is None else decimal_text(minimum_amount, "minimum_amount"),
        request_id=request_id,
    )
    if effective_time is not None:
        request.effective_time.CopyFrom(timestamp(effective_time, "effective_time"))
    return request


def set_billing_profile_request(
    tenant_id: str,
    display_name: str,
    *,
    email: str,
    currency_code: str,
    plan: str,
    plan_effective_time: datetime | None,
    billing_anchor_day: int,
    billing_start_time: datetime | None,
    tax_percentage: Quantity | None,
    spend_threshold: Quantity | None,
    price_overrides: Sequence[PriceOverride],
    request_id: str,
) -> billing_service_pb2.SetBillingProfileRequest:
    """The SetBillingProfile request: the whole profile, a plan given by id or by name."""
    profile = resources_pb2.BillingProfile(
        name=billing_profile_name(tenant_id),
        display_name=display_name,
        email=email,
        currency_code=currency_code,
        plan=plan_name(plan) if plan else "",
        billing_anchor_day=billing_anchor_day,
        tax_percentage="" if tax_percentage is None else decimal_text(tax_percentage, "tax_percentage"),
        spend_threshold="" if spend_threshold is None else decimal_text(spend_threshold, "spend_threshold"),
        price_overrides=[price_override_message(override) for override in price_overrides],
    )
    if plan_effective_time is not None:
        profile.plan_effective_time.CopyFrom(timestamp(plan_effective_time, "plan_effective_time"))
    if billing_start_time is not None:
        profile.billing_start_time.CopyFrom(timestamp(billing_start_time, "billing_start_time"))
    return billing_service_pb2.SetBillingProfileRequest(billing_profile=profile, request_id=request_id)


# -- from the server ---------------------------------------------------------------------


def _tiers(message: resources_pb2.TieredPrice) -> tuple[PriceTier, ...]:
    return tuple(
        PriceTier(
            unit_price=Decimal(tier.unit_price),
            up_to=Decimal(tier.up_to) if tier.up_to else None,
            flat_fee=_number(tier.flat_fee),
        )
        for tier in message.tiers
    )


def _model(message: resources_pb2.Charge | resources_pb2.PriceOverride) -> PriceModel:
    kind = message.WhichOneof("model")
    if kind == "per_unit":
        return PerUnit(Decimal(message.per_unit.unit_price))
    if kind == "graduated":
        return Graduated(_tiers(message.graduated))
    if kind == "volume":
        return Volume(_tiers(message.volume))
    if kind == "package":
        return Package(Decimal(message.package.size), Decimal(message.package.price))
    if kind == "flat_fee":
        return FlatFee(Decimal(message.flat_fee.amount), _TIMINGS_BACK[message.flat_fee.timing])
    # The server answers one model per charge: none means a model newer than this client.
    raise ValueError(f"a price model this client does not know (upgrade tally-client): {kind!r}")


def charge(message: resources_pb2.Charge) -> Charge:
    """A Charge proto with exact prices."""
    return Charge(
        key=message.key,
        model=_model(message),
        service=message.usage_type.service,
        usage_type=message.usage_type.usage_type,
        description=message.description,
        included_quantity=_number(message.included_quantity),
    )


def plan(message: resources_pb2.Plan) -> Plan:
    """A Plan proto with its versions, oldest first, and their charges."""
    return Plan(
        name=message.name,
        plan_id=message.name.removeprefix("plans/"),
        display_name=message.display_name,
        currency_code=message.currency_code,
        versions=tuple(
            PlanVersion(
                version=version.version,
                effective_time=from_timestamp(version.effective_time),
                charges=tuple(charge(c) for c in version.charges),
                minimum_amount=_number(version.minimum_amount),
                create_time=from_timestamp(version.create_time),
            )
            for version in message.versions
        ),
        create_time=from_timestamp(message.create_time),
    )


def billing_profile(message: resources_pb2.BillingProfile) -> BillingProfile:
    """A BillingProfile proto; tax and threshold None where not set, the plan as its id."""
    return BillingProfile(
        name=message.name,
        tenant_id=message.tenant_id or parse_tenant_name(message.name.removesuffix("/billingProfile")),
        display_name=message.display_name,
        email=message.email,
        currency_code=message.currency_code,
        plan_id=message.plan.removeprefix("plans/") or "default",
        billing_anchor_day=message.billing_anchor_day,
        billing_start_time=from_timestamp(message.billing_start_time),
        tax_percentage=Decimal(message.tax_percentage) if message.tax_percentage else None,
        spend_threshold=Decimal(message.spend_threshold) if message.spend_threshold else None,
        price_overrides=tuple(
            PriceOverride(o.charge_key, _model(o), _number(o.included_quantity))
            for o in message.price_overrides
        ),
        closed_until_time=(
            from_timestamp(message.closed_until_time) if message.HasField("closed_until_time") else None
        ),
        create_time=from_timestamp(message.create_time),
        update_time=from_timestamp(message.update_time),
    )
