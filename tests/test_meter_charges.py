"""Plan charges that price a meter: the meter's aggregate over exactly the period, checked by hand.

A meter charge prices the value the meter's own aggregation gives over the whole window
(the period, or each part of it that a plan change splits off): a UNIQUE_COUNT over the
month, not the sum of daily counts; a MAX over the window; a TIME_WEIGHTED integral in
unit-hours with the last reading before the window carried in. Cancelled events never
count. Included quantity and tiers apply to that value like to a usage type's sum.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import TallyServer
from server.config import Config
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    meter_service_pb2,
    meter_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
)
from tests.billing_helpers import anchor_bounds, create_plan, far_anchor_day, set_profile
from tests.conftest import new_tenant
from tests.helpers import error_info, event, field_violations, hour_start, ingest, meter_per_bucket, ts
from tests.test_period_close import close, fake_clock
from tests.test_period_close_blocks import invoices_of, next_anchor_day, next_close

Code = grpc.StatusCode
R = resources_pb2
SERVICE = "metercharge"
HOUR = timedelta(hours=1)
HOUR_MICROS = 3_600_000_000
CENT = Decimal("0.01")


def cents(value: Decimal) -> str:
    return str(value.quantize(CENT, ROUND_HALF_UP))


@dataclass(frozen=True)
class Kit:
    """Usage types of this module's own, and the meters on them ("meters/...")."""

    logins: str
    seats: str
    storage: str
    users: str  # UNIQUE_COUNT of the user_id dimension of logins
    peak: str  # MAX of seats, grouped by region
    gauge: str  # TIME_WEIGHTED of storage, grouped by region


async def _usage_type(channel: grpc.aio.Channel) -> str:
    kind = f"u{uuid.uuid4().hex[:10]}"
    await billing_service_pb2_grpc.BillingServiceStub(channel).SetRate(
        billing_service_pb2.SetRateRequest(service=SERVICE, usage_type=kind, unit_price="1")
    )
    return kind


async def _meter(channel: grpc.aio.Channel, usage_type: str, aggregation: int, **fields: Any) -> str:
    stub = meter_service_pb2_grpc.MeterServiceStub(channel)
    created = await stub.CreateMeter(
        meter_service_pb2.CreateMeterRequest(
            meter=R.Meter(
                meter_id=f"mc-{uuid.uuid4().hex[:10]}",
                service=SERVICE,
                usage_type=usage_type,
                aggregation=aggregation,  # type: ignore[arg-type]
                **fields,
            )
        )
    )
    return str(created.meter.name)


@pytest_asyncio.fixture(scope="module")
async def kit(channel: grpc.aio.Channel) -> AsyncIterator[Kit]:
    logins, seats, storage = [await _usage_type(channel) for _ in range(3)]
    yield Kit(
        logins,
        seats,
        storage,
        users=await _meter(channel, logins, R.METER_AGGREGATION_UNIQUE_COUNT, value_dimension="user_id"),
        peak=await _meter(channel, seats, R.METER_AGGREGATION_MAX, group_by_dimensions=["region"]),
        gauge=await _meter(
            channel, storage, R.METER_AGGREGATION_TIME_WEIGHTED, group_by_dimensions=["region"]
        ),
    )


async def report(
    usage: Any, tenant: str, usage_type: str, quantity: str, at: datetime, event_id: str = "", **dims: str
) -> None:
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(
            event=event(
                tenant,
                event_id or None,
                service=SERVICE,
                usage_type=usage_type,
                quantity=quantity,
                time=at,
                dimensions=dims,
            )
        )
    )


def kit_charges(kit: Kit) -> list[resources_pb2.Charge]:
    """Users at 2.50 after 1 free; peak seats on graduated tiers; GB-hours at 0.001 after 100 free."""
    return [
        R.Charge(
            key="active-users",
            description="Active users",
            meter=kit.users,
            per_unit=R.PerUnitPrice(unit_price="2.50"),
            included_quantity="1",
        ),
        R.Charge(
            key="peak-seats",
            description="Peak seats",
            meter=kit.peak,
            graduated=R.TieredPrice(
                tiers=[
                    R.PriceTier(up_to="10", unit_price="1.00"),
                    R.PriceTier(unit_price="0.50", flat_fee="1.25"),
                ]
            ),
        ),
        R.Charge(
            key="storage",
            description="Storage (GB-hours)",
            meter=kit.gauge,
            per_unit=R.PerUnitPrice(unit_price="0.001"),
            included_quantity="100",
        ),
    ]


async def four_days_of_usage(usage: Any, tenant: str, kit: Kit, start: datetime) -> None:
    """Logins, seats and storage readings on four UTC days from `start`, two events cancelled."""
    days = [start + 2 * HOUR, start + 26 * HOUR, start + 50 * HOUR, start + 74 * HOUR]
    for day, users in zip(days, [["ann", "bob"], ["ann", "cat"], ["bob", "ann"], ["dan"]], strict=True):
        for user in users:
            await report(usage, tenant, kit.logins, "1", day, user_id=user)
    await report(usage, tenant, kit.logins, "1", days[3], "eve-login", user_id="eve")
    for day, region, seats in [
        (days[0], "eu", "4"),
        (days[0], "us", "7"),
        (days[1], "eu", "12"),
        (days[1], "us", "3"),
        (days[2], "us", "9.5"),
        (days[3], "eu", "11"),
    ]:
        await report(usage, tenant, kit.seats, seats, day, region=region)
    await report(usage, tenant, kit.seats, "30", days[3], "seats-typo", region="eu")
    # Storage: eu holds 2 GB from before the period (carried in), 5 GB from day 2; us 1.5 GB
    # from day 4 at :30.
    await report(usage, tenant, kit.storage, "2", start - 10 * HOUR, region="eu")
    await report(usage, tenant, kit.storage, "5", days[1], region="eu")
    await report(usage, tenant, kit.storage, "1.5", days[3] + timedelta(minutes=30), region="us")
    for event_id in ("eve-login", "seats-typo"):
        await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id=event_id))


def by_hand(start: datetime, end: datetime) -> dict[str, tuple[Decimal, str]]:
    """charge key -> (quantity, amount) of four_days_of_usage over [start, end), worked out here."""
    hours = Decimal((end - start) // HOUR)
    # eu: 2 GB for 26 h, then 5 GB to the end; us: 1.5 GB from 74.5 h on.
    gb_hours = 2 * 26 + 5 * (hours - 26) + Decimal("1.5") * (hours - Decimal("74.5"))
    return {
        "active-users": (Decimal(4), "7.50"),  # ann, bob, cat, dan (not eve): (4 - 1) x 2.50
        "peak-seats": (Decimal(12), "12.25"),  # 10 x 1.00 + 2 x 0.50 + 1.25 (not the cancelled 30)
        "storage": (gb_hours, cents((gb_hours - 100) * Decimal("0.001"))),
    }


def lines_of(invoice: Any) -> dict[str, tuple[Decimal, str]]:
    return {li.charge_key: (Decimal(li.quantity), li.amount) for li in invoice.line_items}


async def test_meter_charges_price_each_aggregate_over_the_whole_period(
    usage: Any, billing: Any, kit: Kit, tenant: str
) -> None:
    anchor, start = far_anchor_day(), hour_start(-5 * 24)
    _, end = anchor_bounds(anchor, start)
    plan = await create_plan(billing, kit_charges(kit), effective_time=hour_start(-6 * 24))
    assert [c.meter for c in plan.versions[0].charges] == [kit.users, kit.peak, kit.gauge]
    await set_profile(
        billing, tenant, plan=plan.name, billing_anchor_day=anchor, billing_start_time=ts(start)
    )
    await four_days_of_usage(usage, tenant, kit, start)
    expected = by_hand(start, end)
    total = cents(sum((Decimal(amount) for _, amount in expected.values()), Decimal(0)))

    preview = (
        await billing.PreviewInvoice(billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}"))
    ).invoice
    assert lines_of(preview) == expected
    assert preview.total == total
    assert {(li.service, li.usage_type, li.event_count) for li in preview.line_items} == {("", "", 0)}
    [peak] = [li for li in preview.line_items if li.charge_key == "peak-seats"]
    assert [(t.tier, t.quantity, t.amount) for t in peak.tiers] == [(1, "10", "10"), (2, "2", "2.25")]

    # The month's distinct users (4) are not the sum of the daily counts (2 + 2 + 2 + 1).
    daily = await meter_per_bucket(usage, tenant, kit.users, R.TIME_BUCKET_DAY, start, start, end)
    assert sorted(daily.values()) == ["1", "2", "2", "2"]

    closed = (await close(billing, tenant)).invoice
    assert closed.status == R.INVOICE_STATUS_FINALIZED
    assert lines_of(closed) == expected and closed.total == total


async def test_plan_change_mid_period_prices_a_meter_on_each_part(
    usage: Any, billing: Any, kit: Kit, tenant: str
) -> None:
    anchor, start, change = far_anchor_day(), hour_start(-4 * 24), hour_start(-2 * 24)

    def users_at(price: str) -> resources_pb2.Charge:
        return R.Charge(key="users", meter=kit.users, per_unit=R.PerUnitPrice(unit_price=price))

    small = await create_plan(billing, [users_at("1")], effective_time=hour_start(-5 * 24))
    large = await create_plan(billing, [users_at("2")], effective_time=hour_start(-5 * 24))
    await set_profile(
        billing, tenant, plan=small.name, billing_anchor_day=anchor, billing_start_time=ts(start)
    )
    for user, at in [("ann", start + HOUR), ("bob", start + 3 * HOUR), ("ann", change + HOUR)]:
        await report(usage, tenant, kit.logins, "1", at, user_id=user)
    for user in ("cat", "dan"):
        await report(usage, tenant, kit.logins, "1", change + 5 * HOUR, user_id=user)
    await set_profile(billing, tenant, plan=large.name, plan_effective_time=ts(change))
    invoice = (
        await billing.PreviewInvoice(billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}"))
    ).invoice
    _, end = anchor_bounds(anchor, start)
    got = [
        (
            li.charge_key,
            li.quantity,
            li.amount,
            li.period_start_time.ToDatetime(tzinfo=UTC),
            li.period_end_time.ToDatetime(tzinfo=UTC),
        )
        for li in invoice.line_items
    ]
    # Before the change: ann and bob (2 x 1); after: ann, cat and dan (3 x 2), ann counted
    # again because each part is its own window. The whole period would have 4.
    assert got == [("users", "2", "2.00", start, change), ("users", "3", "6.00", change, end)]
    assert invoice.total == "8.00"


async def test_charge_on_an_unknown_or_archived_meter_is_invalid_argument(
    billing: Any, channel: grpc.aio.Channel, kit: Kit
) -> None:
    archived = await _meter(channel, kit.logins, R.METER_AGGREGATION_MAX)
    await meter_service_pb2_grpc.MeterServiceStub(channel).ArchiveMeter(
        meter_service_pb2.ArchiveMeterRequest(name=archived)
    )

    def on(meter: str, key: str) -> resources_pb2.Charge:
        return R.Charge(key=key, meter=meter, per_unit=R.PerUnitPrice(unit_price="1"))

    plan = f"plan-{uuid.uuid4().hex[:12]}"
    charges = [on(kit.users, "fine"), on("meters/no-such-meter", "unknown"), on(archived, "archived")]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create_plan(billing, charges, plan_id=plan)
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.INVALID_ARGUMENT,
        "FIELD_INVALID",
    )
    violations = field_violations(raised.value)
    assert set(violations) == {"charges[1].meter", "charges[2].meter"}
    assert "archived" in violations["charges[2].meter"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # nothing was written
        await billing.GetPlan(billing_service_pb2.GetPlanRequest(name=f"plans/{plan}"))
    assert raised.value.code() == Code.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create_plan(billing, [on("meters/Not_A_Name", "bad")])
    assert set(field_violations(raised.value)) == {"charges[0].meter"}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create_plan(
            billing, [R.Charge(key="fee", meter=kit.users, flat_fee=R.FlatFeePrice(amount="1"))]
        )
    assert set(field_violations(raised.value)) == {"charges[0].meter"}

    created = await create_plan(billing, [on(kit.users, "fine")])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.CreatePlanVersion(
            billing_service_pb2.CreatePlanVersionRequest(
                parent=created.name, charges=[on(kit.peak, "fine"), on(archived, "gone")]
            )
        )
    assert raised.value.code() == Code.INVALID_ARGUMENT
    assert set(field_violations(raised.value)) == {"charges[1].meter"}
    got = (await billing.GetPlan(billing_service_pb2.GetPlanRequest(name=created.name))).plan
    assert len(got.versions) == 1


async def test_period_close_in_blocks_prices_meter_charges_as_a_single_close(
    server_config: Config, usage: Any, billing: Any, db: asyncpg.Pool, kit: Kit
) -> None:
    anchor, start = next_anchor_day(), hour_start(-30)
    plan = await create_plan(billing, kit_charges(kit), effective_time=hour_start(-40))
    twins = (new_tenant(), new_tenant())
    for tenant in twins:
        await set_profile(
            billing, tenant, plan=plan.name, billing_anchor_day=anchor, billing_start_time=ts(start)
        )
        for user, at in [("ann", -20), ("bob", -20), ("ann", -3)]:
            await report(usage, tenant, kit.logins, "1", hour_start(at), user_id=user)
        await report(usage, tenant, kit.seats, "14", hour_start(-10), region="eu")
        await report(usage, tenant, kit.storage, "300", start - HOUR, region="eu")
    due = max([await next_close(db, t) for t in twins]) + timedelta(minutes=1)
    _, clock = fake_clock(due)
    server = TallyServer(
        dataclasses.replace(server_config, period_close_interval_seconds=0), wall_clock=clock
    )
    await server.start()
    try:
        periods = server.periods
        assert periods is not None
        one_by_one, in_block = twins
        await close(billing, one_by_one)
        await periods.close_due()
    finally:
        await server.stop()
    single, block = await invoices_of(db, one_by_one), await invoices_of(db, in_block)
    assert single == block
    [(_, _, period_start, period_end, _, total, *_)] = block
    hours = (period_end - period_start) // HOUR
    # 2 users: 2.50 after 1 free; 14 seats: 10 + 4 x 0.50 + 1.25; 300 GB all period.
    assert total == Decimal("2.50") + Decimal("13.25") + Decimal(cents((300 * Decimal(hours) - 100) / 1000))


# --- the property: a meter charge is its reference price ------------------------------------------


@dataclass(frozen=True)
class Mixed:
    """One usage type read by four meters, and a plan with a charge on each."""

    usage_type: str
    plan: str


MIXED_PRICES = {"users": "1.10", "peak": "0.70", "last": "0.30", "gauge": "0.0007"}
MIXED_INCLUDED = {"users": "0", "peak": "0.5", "last": "0", "gauge": "1"}


@pytest_asyncio.fixture(scope="module")
async def mixed(channel: grpc.aio.Channel, billing: Any) -> AsyncIterator[Mixed]:
    usage_type = await _usage_type(channel)
    grouped = {"group_by_dimensions": ["region"]}
    meters = {
        "users": await _meter(
            channel, usage_type, R.METER_AGGREGATION_UNIQUE_COUNT, value_dimension="user", **grouped
        ),
        "peak": await _meter(channel, usage_type, R.METER_AGGREGATION_MAX, **grouped),
        "last": await _meter(channel, usage_type, R.METER_AGGREGATION_LATEST, **grouped),
        "gauge": await _meter(channel, usage_type, R.METER_AGGREGATION_TIME_WEIGHTED, **grouped),
    }
    charges = [
        R.Charge(
            key=key,
            meter=meters[key],
            per_unit=R.PerUnitPrice(unit_price=MIXED_PRICES[key]),
            included_quantity=MIXED_INCLUDED[key],
        )
        for key in meters
    ]
    plan = await create_plan(billing, charges, effective_time=hour_start(-5 * 24))
    yield Mixed(usage_type, plan.name)


@dataclass(frozen=True, eq=False)
class Ev:
    event_id: str
    micros: int
    quantity: Decimal
    dims: dict[str, str]


def reference(key: str, events: list[Ev], start: int, end: int) -> Decimal:
    """The meter `key`'s value over [start, end), from the surviving raw events alone."""
    inside = [e for e in events if start <= e.micros < end]
    if key == "users":
        return Decimal(len({e.dims["user"] for e in inside if "user" in e.dims}))
    if key == "peak":
        return max((e.quantity for e in inside), default=Decimal(0))
    if key == "last":
        return max(inside, key=lambda e: (e.micros, e.event_id)).quantity if inside else Decimal(0)
    total = Decimal(0)  # the integral of each region's series, in unit-microseconds
    for region in {e.dims.get("region") for e in events}:
        series = sorted(
            (e for e in events if e.dims.get("region") == region), key=lambda e: (e.micros, e.event_id)
        )
        for index, reading in enumerate(series):
            following = series[index + 1].micros if index + 1 < len(series) else end
            low, high = max(reading.micros, start), min(following, end)
            if high > low:
                total += reading.quantity * (high - low)
    exact = Context(prec=100)
    return exact.divide(total, Decimal(HOUR_MICROS)).quantize(Decimal("1e-12"), rounding=ROUND_HALF_EVEN)


def reference_amount(key: str, value: Decimal) -> Decimal:
    billable = max(Decimal(0), value - Decimal(MIXED_INCLUDED[key]))
    return (billable * Decimal(MIXED_PRICES[key])).quantize(CENT, ROUND_HALF_UP)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    specs=st.lists(
        st.tuples(
            st.integers(0, 4),  # which of the example's instants
            st.integers(0, 3_000),  # thousandths
            st.sampled_from(["eu", "us", None]),
            st.sampled_from(["u1", "u2", "u3", None]),
        ),
        min_size=1,
        max_size=10,
    ),
    data=st.data(),
)
async def test_meter_charge_equals_its_price_computed_from_the_raw_events(
    usage: Any, billing: Any, mixed: Mixed, specs: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    tenant = new_tenant()
    start = hour_start(-72)
    anchor = far_anchor_day()
    _, end = anchor_bounds(anchor, start)
    start_micros = int(start.timestamp()) * 1_000_000
    now_micros = int(datetime.now(UTC).timestamp()) * 1_000_000
    # A few instants from a day before the period to now, shared by several events (ties).
    instants = data.draw(st.lists(st.integers(-24 * 60, 72 * 60), min_size=1, max_size=5), label="instants")
    events = []
    for index, (which, thousandths, region, user) in enumerate(specs):
        micros = min(start_micros + instants[which % len(instants)] * 60_000_000, now_micros - 60_000_000)
        dims = {k: v for k, v in (("region", region), ("user", user)) if v is not None}
        events.append(Ev(f"e{index:02d}-{uuid.uuid4().hex[:4]}", micros, Decimal(thousandths) / 1000, dims))
    await set_profile(
        billing, tenant, plan=mixed.plan, billing_anchor_day=anchor, billing_start_time=ts(start)
    )
    batch = [
        event(
            tenant,
            e.event_id,
            service=SERVICE,
            usage_type=mixed.usage_type,
            quantity=format(e.quantity, "f"),
            time=datetime.fromtimestamp(e.micros / 1e6, UTC),
            dimensions=e.dims,
        )
        for e in data.draw(st.permutations(events), label="order")
    ]

    assert (await ingest(usage, [batch])).accepted_count == len(events)
    cancelled = data.draw(st.sets(st.sampled_from(events), max_size=2), label="cancelled")
    for e in cancelled:
        await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id=e.event_id))
    surviving = [e for e in events if e not in cancelled]
    end_micros = int(end.timestamp()) * 1_000_000

    invoice = (
        await billing.PreviewInvoice(billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}"))
    ).invoice
    got = {li.charge_key: (Decimal(li.quantity), Decimal(li.amount)) for li in invoice.line_items}
    expected = {}
    for key in MIXED_PRICES:
        value = reference(key, surviving, start_micros, end_micros)
        expected[key] = (value, reference_amount(key, value))
    assert got == expected
    assert Decimal(invoice.total) == sum((amount for _, amount in expected.values()), Decimal(0))
