"""Closing periods: ClosePeriod, the scheduler on two servers with a fake clock, and late usage.

A late event (one whose time falls in a period already finalized) never changes that
invoice; the next invoice carries an adjustment naming the period: the period priced
again with every event known now, minus what it was billed, per charge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from server.app import TallyServer
from server.config import Config
from tally.v1 import billing_service_pb2, resources_pb2
from tests.billing_helpers import (
    anchor_bounds,
    create_plan,
    far_anchor_day,
    flat_fee,
    graduated_api_charge,
    per_unit,
    set_profile,
    uploads,
)
from tests.conftest import new_tenant
from tests.helpers import error_info, hour_start, ts

Code = grpc.StatusCode
R = resources_pb2


def close(billing: Any, tenant: str, request_id: str = "") -> Any:
    return billing.ClosePeriod(
        billing_service_pb2.ClosePeriodRequest(parent=f"tenants/{tenant}", request_id=request_id)
    )


async def test_close_period_finalizes_a_numbered_invoice_and_opens_the_next(
    usage: Any, billing: Any, tenant: str
) -> None:
    anchor, start = far_anchor_day(), hour_start(-5)
    plan = await create_plan(billing, [graduated_api_charge()])
    await set_profile(
        billing, tenant, plan=plan.name, billing_anchor_day=anchor, billing_start_time=ts(start)
    )
    await uploads(usage, tenant, "120", hour_start(-3))
    first = (await close(billing, tenant)).invoice
    _, end = anchor_bounds(anchor, start)
    assert first.status == R.INVOICE_STATUS_FINALIZED and first.number.startswith("TALLY-")
    assert (first.period_start_time.ToDatetime(tzinfo=UTC), first.period_end_time.ToDatetime(tzinfo=UTC)) == (
        start,
        end,
    )
    assert first.total == "11.00"  # 100 x 0.10 + 20 x 0.05
    assert first.customer.name == f"Customer {tenant}"
    profile = await billing.GetBillingProfile(
        billing_service_pb2.GetBillingProfileRequest(name=f"tenants/{tenant}/billingProfile")
    )
    assert profile.billing_profile.closed_until_time.ToDatetime(tzinfo=UTC) == end
    second = (await close(billing, tenant)).invoice  # the next (future) period, now
    assert second.period_start_time == first.period_end_time and second.number != first.number
    assert second.total == "0.00"


async def test_late_event_goes_on_the_next_invoice_as_an_adjustment(
    usage: Any, billing: Any, tenant: str
) -> None:
    anchor, start = far_anchor_day(), hour_start(-5)
    plan = await create_plan(billing, [graduated_api_charge(), flat_fee("10")])
    await set_profile(
        billing, tenant, plan=plan.name, billing_anchor_day=anchor, billing_start_time=ts(start)
    )
    await uploads(usage, tenant, "90", hour_start(-3))
    first = (await close(billing, tenant)).invoice
    uploads_line = first.line_items[0]
    assert (uploads_line.charge_key, uploads_line.amount) == ("uploads", "9.00")
    await uploads(usage, tenant, "20", hour_start(-2))  # late: its period is finalized
    got = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=first.name))).invoice
    assert got == first  # never changes
    preview = (
        await billing.PreviewInvoice(billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}"))
    ).invoice
    adjustments = [li for li in preview.line_items if li.kind == R.INVOICE_LINE_KIND_ADJUSTMENT]
    # 110 uploads now: 100 x 0.10 + 10 x 0.05 = 10.50; billed 9.00 -> +1.50 (not 20 x 0.10).
    assert [(a.charge_key, a.amount) for a in adjustments] == [("uploads", "1.50")]
    assert adjustments[0].period_start_time == first.period_start_time
    assert adjustments[0].period_end_time == first.period_end_time
    second = (await close(billing, tenant)).invoice
    assert [(li.kind, li.charge_key, li.amount) for li in second.line_items] == [
        (R.INVOICE_LINE_KIND_USAGE, "uploads", "0.00"),
        (R.INVOICE_LINE_KIND_FLAT_FEE, "platform", "10.00"),
        (R.INVOICE_LINE_KIND_ADJUSTMENT, "uploads", "1.50"),
    ]
    assert second.total == "11.50"
    # Billed once: the third invoice has no adjustment for the first period.
    third = (await close(billing, tenant)).invoice
    assert [li.kind for li in third.line_items] == [R.INVOICE_LINE_KIND_USAGE, R.INVOICE_LINE_KIND_FLAT_FEE]


async def test_late_event_on_the_rate_card_adjusts_per_usage_type(
    usage: Any, billing: Any, tenant: str
) -> None:
    await set_profile(
        billing, tenant, billing_anchor_day=far_anchor_day(), billing_start_time=ts(hour_start(-5))
    )
    await uploads(usage, tenant, "3", hour_start(-3))
    first = (await close(billing, tenant)).invoice
    assert first.total == "0.30" and first.line_items[0].charge_key == "marketplace/wpk_upload"
    await uploads(usage, tenant, "2", hour_start(-3))
    second = (await close(billing, tenant)).invoice
    assert [(li.kind, li.amount) for li in second.line_items] == [(R.INVOICE_LINE_KIND_ADJUSTMENT, "0.20")]


async def test_close_without_profile_is_not_found(billing: Any, tenant: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await close(billing, tenant)
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.NOT_FOUND,
        "BILLING_PROFILE_NOT_FOUND",
    )


async def test_retried_close_closes_once(billing: Any, db: asyncpg.Pool, tenant: str) -> None:
    await set_profile(
        billing, tenant, billing_anchor_day=far_anchor_day(), billing_start_time=ts(hour_start(-5))
    )
    first, again = await close(billing, tenant, "close-1"), await close(billing, tenant, "close-1")
    assert first == again
    assert await db.fetchval("SELECT count(*) FROM invoices WHERE tenant_id = $1", tenant) == 1


async def test_no_plan_change_or_version_inside_a_closed_period(
    usage: Any, billing: Any, tenant: str
) -> None:
    start = hour_start(-5)
    plan = await create_plan(billing, [per_unit("uploads", "wpk_upload", "1")])
    other = await create_plan(billing, [per_unit("uploads", "wpk_upload", "2")])
    await set_profile(
        billing, tenant, plan=plan.name, billing_anchor_day=far_anchor_day(), billing_start_time=ts(start)
    )
    await uploads(usage, tenant, "1", hour_start(-3))
    invoice = (await close(billing, tenant)).invoice
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_profile(billing, tenant, plan=other.name, plan_effective_time=ts(hour_start(-1)))
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.FAILED_PRECONDITION,
        "PERIOD_FINALIZED",
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.CreatePlanVersion(
            billing_service_pb2.CreatePlanVersionRequest(
                parent=plan.name,
                charges=[per_unit("uploads", "wpk_upload", "5")],
                effective_time=ts(hour_start(1)),
            )
        )
    info = error_info(raised.value)
    assert info is not None and (info.reason, info.metadata["invoice"]) == ("PERIOD_FINALIZED", invoice.name)


def fake_clock(at: datetime) -> tuple[list[int], Any]:
    now = [int(at.timestamp() * 1_000_000)]
    return now, lambda: now[0]


async def test_scheduler_on_two_servers_closes_each_period_once(
    server_config: Config, usage: Any, billing: Any, db: asyncpg.Pool
) -> None:
    start = hour_start(-30)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    anchor = tomorrow.day if tomorrow.day <= 28 else 1
    tenants = [new_tenant() for _ in range(12)]
    for i, tenant in enumerate(tenants):
        await set_profile(billing, tenant, billing_anchor_day=anchor, billing_start_time=ts(start))
        await uploads(usage, tenant, str(i + 1), hour_start(-2))
    ends = {
        (await db.fetchval("SELECT next_close_time FROM billing_profiles WHERE tenant_id = $1", t))
        for t in tenants
    }
    [due] = ends  # period end + 1 h of grace
    now, clock = fake_clock(due - timedelta(minutes=1))
    config = dataclasses.replace(server_config, period_close_interval_seconds=0)
    servers = [TallyServer(config, wall_clock=clock), TallyServer(config, wall_clock=clock)]
    for server in servers:
        await server.start()
    try:
        assert servers[0].periods is not None and servers[1].periods is not None
        await asyncio.gather(servers[0].periods.close_due(), servers[1].periods.close_due())
        assert (
            await db.fetchval("SELECT count(*) FROM invoices WHERE tenant_id = ANY($1)", tenants) == 0
        )  # not yet
        now[0] += 2 * 60 * 1_000_000
        closed = await asyncio.gather(*(s.periods.close_due() for s in servers for _ in range(2)))  # type: ignore[union-attr]
    finally:
        for server in servers:
            await server.stop()
    rows = await db.fetch(
        "SELECT tenant_id, status, total, number FROM invoices WHERE tenant_id = ANY($1) ORDER BY tenant_id",
        tenants,
    )
    assert sorted(r["tenant_id"] for r in rows) == sorted(tenants)  # one invoice each
    assert {r["status"] for r in rows} == {"finalized"}
    assert sum(closed) >= len(tenants) and len({r["number"] for r in rows}) == len(tenants)
    totals = {r["tenant_id"]: r["total"] for r in rows}
    assert [str(totals[t]) for t in tenants] == [f"{(i + 1) * 0.1:.2f}" for i in range(len(tenants))]


async def test_scheduler_task_stops_promptly_on_shutdown(server_config: Config) -> None:
    config = dataclasses.replace(server_config, period_close_interval_seconds=3600)
    server = TallyServer(config)
    await server.start()
    began = time.monotonic()
    await server.stop()
    # It was waiting for its next round; stop() must not wait the hour out.
    assert time.monotonic() - began < config.grace_seconds + 30


async def test_spend_threshold_bills_an_interim_invoice_and_the_final_one_bills_the_rest(
    tally: TallyServer, usage: Any, billing: Any, db: asyncpg.Pool, tenant: str
) -> None:
    assert tally.periods is not None
    plan = await create_plan(billing, [graduated_api_charge()])
    await set_profile(
        billing,
        tenant,
        plan=plan.name,
        billing_anchor_day=far_anchor_day(),
        billing_start_time=ts(hour_start(-5)),
        spend_threshold="8",
    )
    await uploads(usage, tenant, "50", hour_start(-4))  # 5.00: under the threshold
    await tally.periods.bill_thresholds()
    assert await db.fetchval("SELECT count(*) FROM invoices WHERE tenant_id = $1", tenant) == 0
    await uploads(usage, tenant, "40", hour_start(-3))  # 90 uploads: 9.00 due, over 8
    await tally.periods.bill_thresholds()
    await tally.periods.bill_thresholds()  # nothing new is due: no second interim invoice
    [interim] = (
        await billing.ListInvoices(billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}"))
    ).invoices
    assert (interim.kind, interim.status, interim.total) == (
        R.INVOICE_KIND_INTERIM,
        R.INVOICE_STATUS_FINALIZED,
        "9.00",
    )
    assert interim.number.startswith("TALLY-")
    await uploads(usage, tenant, "30", hour_start(-2))  # 120 uploads: 100 x 0.10 + 20 x 0.05 = 11.00
    final = (await close(billing, tenant)).invoice
    assert final.kind == R.INVOICE_KIND_FINAL
    assert [(li.kind, li.amount) for li in final.line_items] == [
        (R.INVOICE_LINE_KIND_USAGE, "11.00"),
        (R.INVOICE_LINE_KIND_ADJUSTMENT, "-9.00"),  # billed on the interim invoice
    ]
    assert final.total == "2.00"  # the rest: 9.00 + 2.00 = the period's 11.00
    # A late event after both: the adjustment counts what both invoices billed.
    await uploads(usage, tenant, "10", hour_start(-2))
    preview = (
        await billing.PreviewInvoice(billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}"))
    ).invoice
    assert [
        (li.kind, li.amount) for li in preview.line_items if li.kind == R.INVOICE_LINE_KIND_ADJUSTMENT
    ] == [(R.INVOICE_LINE_KIND_ADJUSTMENT, "0.50")]
