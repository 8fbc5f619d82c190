"""Plans, billing profiles and PreviewInvoice through the service, with money checked by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.domain.decimals import format_quantity
from tally.v1 import billing_service_pb2, resources_pb2, usage_service_pb2
from tests.billing_helpers import (
    anchor_bounds,
    create_plan,
    far_anchor_day,
    flat_fee,
    graduated_api_charge,
    per_unit,
    plan_id,
    set_profile,
    uploads,
)
from tests.conftest import make_token, new_tenant
from tests.helpers import error_info, event, field_violations, hour_start, ts

Code = grpc.StatusCode
R = resources_pb2


def preview(billing: Any, tenant: str) -> Any:
    return billing.PreviewInvoice(billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}"))


async def test_created_plan_reads_back_with_its_charges(billing: Any) -> None:
    plan = await create_plan(billing, [graduated_api_charge(), flat_fee("20")], minimum_amount="5")
    got = (await billing.GetPlan(billing_service_pb2.GetPlanRequest(name=plan.name))).plan
    assert got == plan
    [version] = got.versions
    assert (version.version, version.minimum_amount) == (1, "5.00")
    assert [c.key for c in version.charges] == ["uploads", "platform"]
    assert [t.up_to for t in version.charges[0].graduated.tiers] == ["100", ""]
    listed = (await billing.ListPlans(billing_service_pb2.ListPlansRequest(page_size=500))).plans
    assert listed[0].name == "plans/default" and plan.name in [p.name for p in listed]


async def test_default_plan_is_the_rate_card(billing: Any) -> None:
    plan = (await billing.GetPlan(billing_service_pb2.GetPlanRequest(name="plans/default"))).plan
    prices = {c.key: c.per_unit.unit_price for c in plan.versions[0].charges}
    assert prices["marketplace/wpk_upload"] == "0.10" and prices["compute/cpu_hour"] == "0.50"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.CreatePlanVersion(billing_service_pb2.CreatePlanVersionRequest(parent="plans/default"))
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.FAILED_PRECONDITION,
        "PLAN_READ_ONLY",
    )


async def test_bad_charges_are_named_field_by_field(billing: Any) -> None:
    bad = R.Charge(
        key="x",
        usage_type=R.UsageTypeRef(service="marketplace", usage_type="wpk_upload"),
        graduated=R.TieredPrice(
            tiers=[R.PriceTier(up_to="100", unit_price="0.1"), R.PriceTier(up_to="50", unit_price="1e3")]
        ),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create_plan(billing, [bad, R.Charge(key="x", flat_fee=R.FlatFeePrice(amount="1"))])
    assert raised.value.code() == Code.INVALID_ARGUMENT
    violations = field_violations(raised.value)
    assert "charges[0].graduated.tiers[1].unit_price" in violations
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create_plan(billing, [R.Charge(key="nothing")])
    assert "charges[0].model" in field_violations(raised.value)


async def test_existing_plan_id_is_already_exists(billing: Any) -> None:
    plan = await create_plan(billing, [])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create_plan(billing, [], plan_id=plan.name.split("/")[1])
    assert raised.value.code() == Code.ALREADY_EXISTS
    assert error_info(raised.value).metadata["plan"] == plan.name  # type: ignore[union-attr]


async def test_plans_need_a_token_for_all_tenants(bare_channel: Any, tenant: str) -> None:
    from tally.v1 import billing_service_pb2_grpc

    stub = billing_service_pb2_grpc.BillingServiceStub(bare_channel)
    metadata = (("authorization", f"Bearer {make_token([tenant])}"),)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreatePlan(
            billing_service_pb2.CreatePlanRequest(plan_id=plan_id(), display_name="x", currency_code="USD"),
            metadata=metadata,
        )
    assert error_info(raised.value).reason == "ALL_TENANTS_REQUIRED"  # type: ignore[union-attr]


async def test_profile_reads_back_and_needs_the_plans_currency(billing: Any, tenant: str) -> None:
    plan = await create_plan(billing, [graduated_api_charge()], currency_code="EUR")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_profile(billing, tenant, plan=plan.name, currency_code="USD")
    assert "billing_profile.currency_code" in field_violations(raised.value)
    profile = await set_profile(
        billing,
        tenant,
        plan=plan.name,
        email="billing@example.com",
        tax_percentage="20",
        billing_anchor_day=31,
    )
    assert (profile.currency_code, profile.plan, profile.billing_anchor_day, profile.tax_percentage) == (
        "EUR",
        plan.name,
        31,
        "20",
    )
    got = await billing.GetBillingProfile(
        billing_service_pb2.GetBillingProfileRequest(name=f"tenants/{tenant}/billingProfile")
    )
    assert got.billing_profile == profile
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_profile(billing, tenant, plan=plan.name, billing_anchor_day=5)
    assert "billing_profile.billing_anchor_day" in field_violations(raised.value)


async def test_missing_profile_is_not_found(billing: Any, tenant: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GetBillingProfile(
            billing_service_pb2.GetBillingProfileRequest(name=f"tenants/{tenant}/billingProfile")
        )
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.NOT_FOUND,
        "BILLING_PROFILE_NOT_FOUND",
    )


async def test_preview_prices_graduated_tiers_fee_and_tax_by_hand(
    usage: Any, billing: Any, tenant: str
) -> None:
    anchor = far_anchor_day()
    start = hour_start(-5)
    plan = await create_plan(billing, [graduated_api_charge(), flat_fee("30")])
    await set_profile(
        billing,
        tenant,
        plan=plan.name,
        billing_anchor_day=anchor,
        billing_start_time=ts(start),
        tax_percentage="20",
    )
    await uploads(usage, tenant, "90", hour_start(-3))
    await uploads(usage, tenant, "30.5", hour_start(-2))
    invoice = (await preview(billing, tenant)).invoice
    period_start, period_end = anchor_bounds(anchor, start)
    assert invoice.period_start_time.ToDatetime(tzinfo=UTC) == start  # clipped to the billing start
    assert invoice.period_end_time.ToDatetime(tzinfo=UTC) == period_end
    # Uploads 120.5: 100 x 0.10 + 20.5 x 0.05 = 10.00 + 1.025 = 11.025 -> 11.03 (rounded once)
    # Fee: 30 x covered hours / full period hours, rounded once.
    covered = int((period_end - start) / timedelta(hours=1))
    full = int((period_end - period_start) / timedelta(hours=1))
    fee = Decimal(Fraction(30 * covered, full).numerator) / Decimal(Fraction(30 * covered, full).denominator)
    fee = fee.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    taxable = Decimal("11.03") + fee
    tax = (taxable * Decimal("0.2")).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    lines = [(li.kind, li.charge_key, li.quantity, li.amount) for li in invoice.line_items]
    assert lines == [
        (R.INVOICE_LINE_KIND_USAGE, "uploads", "120.5", "11.03"),
        (R.INVOICE_LINE_KIND_FLAT_FEE, "platform", "1", str(fee)),
        # A line's quantity is canonical decimal text: a taxable 28.20 is "28.2".
        (R.INVOICE_LINE_KIND_TAX, "", format_quantity(taxable), str(tax)),
    ]
    assert [(t.tier, t.quantity, t.amount) for t in invoice.line_items[0].tiers] == [
        (1, "100", "10"),
        (2, "20.5", "1.025"),
    ]
    assert invoice.total == str(taxable + tax)
    assert invoice.status == R.INVOICE_STATUS_DRAFT and invoice.name == "" and invoice.number == ""


async def test_preview_without_profile_is_this_calendar_month_on_the_rate_card(
    usage: Any, billing: Any, tenant: str
) -> None:
    await uploads(usage, tenant, "3", hour_start(0))
    invoice = (await preview(billing, tenant)).invoice
    now = datetime.now(UTC)
    assert invoice.period_start_time.ToDatetime(tzinfo=UTC) == now.replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    assert [(li.charge_key, li.amount) for li in invoice.line_items] == [("marketplace/wpk_upload", "0.30")]


async def test_plan_change_mid_period_splits_usage_and_prorates_fees(
    usage: Any, billing: Any, tenant: str
) -> None:
    anchor = far_anchor_day()
    start, change = hour_start(-10), hour_start(-4)
    small = await create_plan(billing, [per_unit("uploads", "wpk_upload", "1"), flat_fee("72")])
    large = await create_plan(billing, [per_unit("uploads", "wpk_upload", "0.5"), flat_fee("144")])
    await set_profile(
        billing, tenant, plan=small.name, billing_anchor_day=anchor, billing_start_time=ts(start)
    )
    await uploads(usage, tenant, "4", hour_start(-6))  # small plan: 4 x 1
    await uploads(usage, tenant, "4", hour_start(-2))  # large plan: 4 x 0.5
    await set_profile(billing, tenant, plan=large.name, plan_effective_time=ts(change))
    invoice = (await preview(billing, tenant)).invoice
    period_start, period_end = anchor_bounds(anchor, start)
    full = int((period_end - period_start) / timedelta(hours=1))
    after = int((period_end - change) / timedelta(hours=1))

    def prorated(amount: int, hours: int) -> str:
        exact = Fraction(amount * hours, full)
        return str(
            (Decimal(exact.numerator) / Decimal(exact.denominator)).quantize(Decimal("0.01"), ROUND_HALF_UP)
        )

    got = [
        (
            li.charge_key,
            li.amount,
            li.period_start_time.ToDatetime(tzinfo=UTC),
            li.period_end_time.ToDatetime(tzinfo=UTC),
        )
        for li in invoice.line_items
    ]
    assert got == [
        ("uploads", "4.00", start, change),
        ("platform", prorated(72, 6), start, change),
        ("uploads", "2.00", change, period_end),
        ("platform", prorated(144, after), change, period_end),
    ]


async def test_price_override_replaces_the_plans_model_for_that_tenant(
    usage: Any, billing: Any, tenant: str
) -> None:
    plan = await create_plan(billing, [graduated_api_charge()])
    override = R.PriceOverride(
        charge_key="uploads", per_unit=R.PerUnitPrice(unit_price="0.01"), included_quantity="10"
    )
    await set_profile(
        billing,
        tenant,
        plan=plan.name,
        billing_anchor_day=far_anchor_day(),
        billing_start_time=ts(hour_start(-3)),
        price_overrides=[override],
    )
    await uploads(usage, tenant, "110", hour_start(-1))
    invoice = (await preview(billing, tenant)).invoice
    assert [(li.charge_key, li.amount) for li in invoice.line_items] == [
        ("uploads", "1.00")
    ]  # (110 - 10) x 0.01
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_profile(
            billing,
            tenant,
            plan=plan.name,
            price_overrides=[R.PriceOverride(charge_key="nope", per_unit=R.PerUnitPrice(unit_price="1"))],
        )
    assert "billing_profile.price_overrides[0].charge_key" in field_violations(raised.value)


@pytest_asyncio.fixture(scope="module")
async def order_plan(billing: Any) -> str:
    return (
        await create_plan(billing, [graduated_api_charge(), per_unit("reviews", "wpk_review", "0.07")])
    ).name


def by_hand(events: list[tuple[str, Decimal]]) -> Decimal:
    """Uploads on 100 at 0.10 then 0.05 (graduated), reviews at 0.07, each line rounded once."""
    uploads = sum((q for t, q in events if t == "wpk_upload"), Decimal(0))
    reviews = sum((q for t, q in events if t == "wpk_review"), Decimal(0))
    graduated = min(uploads, Decimal(100)) * Decimal("0.10") + max(uploads - 100, Decimal(0)) * Decimal(
        "0.05"
    )
    cent = Decimal("0.01")
    return graduated.quantize(cent, ROUND_HALF_UP) + (reviews * Decimal("0.07")).quantize(cent, ROUND_HALF_UP)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_totals_do_not_depend_on_event_order_or_batching(
    usage: Any, billing: Any, order_plan: str, data: st.DataObject
) -> None:
    events = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["wpk_upload", "wpk_review"]),
                st.decimals(min_value=0, max_value=80, places=3, allow_nan=False, allow_infinity=False),
            ),
            min_size=1,
            max_size=12,
        )
    )
    totals = []
    for arrangement in (events, data.draw(st.permutations(events))):
        tenant = new_tenant()
        await set_profile(
            billing,
            tenant,
            plan=order_plan,
            billing_anchor_day=far_anchor_day(),
            billing_start_time=ts(hour_start(-6)),
        )
        messages = [
            event(tenant, usage_type=kind, quantity=format(q, "f"), time=hour_start(-5 + i % 5))
            for i, (kind, q) in enumerate(arrangement)
        ]
        batches, at = [], 0
        while at < len(messages):
            size = data.draw(st.integers(1, len(messages) - at))
            batches.append(usage_service_pb2.IngestUsageRequest(events=messages[at : at + size]))
            at += size

        async def stream(batches: list[Any] = batches) -> AsyncIterator[Any]:
            for batch in batches:
                yield batch

        response = await usage.IngestUsage(stream())
        assert response.accepted_count == len(messages)
        totals.append((await preview(billing, tenant)).invoice.total)
    assert totals[0] == totals[1] == str(by_hand(events))
