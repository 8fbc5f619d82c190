"""Builders for plan, profile and period tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tally.v1 import billing_service_pb2, resources_pb2, usage_service_pb2
from tests.helpers import event, hour_start, ts

R = resources_pb2


def plan_id() -> str:
    return f"plan-{uuid.uuid4().hex[:12]}"


def graduated_api_charge(key: str = "uploads") -> resources_pb2.Charge:
    """Uploads: the first 100 at 0.10, the rest at 0.05."""
    return R.Charge(
        key=key,
        description="Uploads",
        usage_type=R.UsageTypeRef(service="marketplace", usage_type="wpk_upload"),
        graduated=R.TieredPrice(
            tiers=[R.PriceTier(up_to="100", unit_price="0.10"), R.PriceTier(unit_price="0.05")]
        ),
    )


def flat_fee(amount: str, key: str = "platform") -> resources_pb2.Charge:
    return R.Charge(key=key, description="Platform fee", flat_fee=R.FlatFeePrice(amount=amount))


def per_unit(key: str, usage_type: str, price: str, service: str = "marketplace") -> resources_pb2.Charge:
    return R.Charge(
        key=key,
        usage_type=R.UsageTypeRef(service=service, usage_type=usage_type),
        per_unit=R.PerUnitPrice(unit_price=price),
    )


def far_anchor_day(now: datetime | None = None) -> int:
    """An anchor day (1-28) whose period boundaries lie about two weeks either side of now."""
    day = (now or datetime.now(UTC)).day
    return (day + 14) % 28 + 1


def anchor_bounds(anchor_day: int, at: datetime) -> tuple[datetime, datetime]:
    """The anchor period around `at`, computed independently (days 1-28 only)."""
    start = at.replace(day=anchor_day, hour=0, minute=0, second=0, microsecond=0)
    if start > at:
        start = (start.replace(day=1) - timedelta(days=1)).replace(day=anchor_day)
    end = (start.replace(day=1) + timedelta(days=32)).replace(day=anchor_day)
    return start, end


async def create_plan(billing: Any, charges: list[resources_pb2.Charge], **fields: Any) -> resources_pb2.Plan:
    request = billing_service_pb2.CreatePlanRequest(
        plan_id=fields.pop("plan_id", None) or plan_id(),
        display_name=fields.pop("display_name", "Test plan"),
        currency_code=fields.pop("currency_code", "USD"),
        charges=charges,
        effective_time=ts(fields.pop("effective_time", hour_start(-48))),
        **fields,
    )
    return (await billing.CreatePlan(request)).plan


async def set_profile(billing: Any, tenant: str, **fields: Any) -> resources_pb2.BillingProfile:
    profile = R.BillingProfile(
        name=f"tenants/{tenant}/billingProfile", display_name=f"Customer {tenant}", **fields
    )
    response = await billing.SetBillingProfile(
        billing_service_pb2.SetBillingProfileRequest(billing_profile=profile)
    )
    return response.billing_profile


async def uploads(usage: Any, tenant: str, quantity: str, at: datetime) -> None:
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity=quantity, time=at))
    )
