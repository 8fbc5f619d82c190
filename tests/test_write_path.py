"""The write path has no hot rows: concurrent writers never wait for each other's rollup rows.

A transaction that has written a batch and holds it open (as a slow writer of another
process would) must not delay another writer's batch for the same tenant, hour, usage
type and dimensions. The deadlines are generous: the open transaction is only committed
after the second write returns, so a second writer that waited would run into them.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import grpc
import pytest

from server.domain.meters import MeterMap
from server.domain.timeutil import to_micros
from server.storage.folding import Folder
from server.storage.meters import MeterStore
from server.storage.usage import _RECORD_BATCH, _RECORD_BATCH_WITH_METERS
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    meter_service_pb2,
    meter_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.helpers import event, hour_start, ts

DEADLINE = 30  # seconds: far beyond a write on a loaded machine, far below "waits forever"


async def _partition(db: asyncpg.Pool, hour: datetime) -> None:
    """The month's raw-event partition, which the server creates before its own writes."""
    await db.execute("SELECT tally_event_partition($1)", hour)


def _columns(tenant: str, event_id: str, service: str, usage_type: str, micros: int) -> tuple[list, ...]:
    return (
        [tenant],
        [event_id],
        [service],
        [usage_type],
        ["5"],
        [micros],
        [json.dumps({"region": "eu"})],
    )


async def _summary_total(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str, hour: datetime
) -> Decimal:
    summary = (
        await usage.GetUsageSummary(
            usage_service_pb2.GetUsageSummaryRequest(
                name=f"tenants/{tenant}/usageSummary",
                start_time=ts(hour),
                end_time=ts(hour + timedelta(hours=1)),
            )
        )
    ).summary
    return sum((Decimal(a.quantity) for a in summary.aggregates), Decimal(0))


async def test_an_open_batch_does_not_delay_another_writer_on_the_same_rollup_row(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    hour = hour_start(0)
    await _partition(db, hour)
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            written = await conn.fetch(
                _RECORD_BATCH, *_columns(tenant, "held", "marketplace", "wpk_upload", to_micros(hour))
            )
            assert len(written) == 1
            # The same tenant, hour, usage type and dimensions, through the server, while
            # the first batch still holds its rows.
            response = await usage.ReportUsage(
                usage_service_pb2.ReportUsageRequest(
                    event=event(tenant, "second", quantity="7", time=hour, dimensions={"region": "eu"})
                ),
                timeout=DEADLINE,
            )
            assert response.outcome == usage_service_pb2.REPORT_OUTCOME_RECORDED
        finally:
            await transaction.commit()
    assert await _summary_total(usage, tenant, hour) == Decimal("12")


async def test_an_open_batch_does_not_delay_another_writer_of_the_same_max_meter_hour(
    channel: grpc.aio.Channel, usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    usage_type = f"u{uuid.uuid4().hex[:10]}"
    await billing_service_pb2_grpc.BillingServiceStub(channel).SetRate(
        billing_service_pb2.SetRateRequest(service="locks", usage_type=usage_type, unit_price="1")
    )
    await meter_service_pb2_grpc.MeterServiceStub(channel).CreateMeter(
        meter_service_pb2.CreateMeterRequest(
            meter=resources_pb2.Meter(
                meter_id=f"peak-{uuid.uuid4().hex[:8]}",
                service="locks",
                usage_type=usage_type,
                aggregation=resources_pb2.METER_AGGREGATION_MAX,
                group_by_dimensions=["region"],
            )
        )
    )
    hour = hour_start(0)
    await _partition(db, hour)
    meters = MeterMap(await MeterStore(db).all())
    columns = _columns(tenant, "held", "locks", usage_type, to_micros(hour))
    contributions = meters.contributions([tuple(c[0] for c in columns)])  # type: ignore[misc]
    assert len(contributions) == 1
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.fetch(
                _RECORD_BATCH_WITH_METERS[frozenset(contributions.kinds)],
                *columns,
                *contributions.columns(),
            )
            response = await usage.ReportUsage(
                usage_service_pb2.ReportUsageRequest(
                    event=event(
                        tenant,
                        "second",
                        service="locks",
                        usage_type=usage_type,
                        quantity="7",
                        time=hour,
                        dimensions={"region": "eu"},
                    )
                ),
                timeout=DEADLINE,
            )
            assert response.outcome == usage_service_pb2.REPORT_OUTCOME_RECORDED
        finally:
            await transaction.commit()
    stripes = await db.fetchval(
        "SELECT count(*) FROM meter_hourly WHERE tenant_id = $1 AND hour = $2", tenant, hour
    )
    assert stripes == 2  # one row per writer, summed on read


async def test_folding_moves_every_stripe_of_past_hours_into_one_row_without_changing_totals(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    hour = hour_start(-5)
    await _partition(db, hour)
    # Two connections, so two stripes of the same rollup key.
    async with db.acquire() as first, db.acquire() as second:
        for conn, event_id in ((first, "a"), (second, "b")):
            await conn.fetch(
                _RECORD_BATCH, *_columns(tenant, event_id, "marketplace", "wpk_upload", to_micros(hour))
            )
    count = "SELECT count(*) FROM usage_rollups WHERE tenant_id = $1"
    assert await db.fetchval(count, tenant) == 2
    before = await _summary_total(usage, tenant, hour)
    await Folder(db, closed_before=lambda: hour_start(-1)).fold_once()
    rows = await db.fetch(
        "SELECT stripe, quantity, event_count FROM usage_rollups WHERE tenant_id = $1", tenant
    )
    assert [(r["stripe"], r["quantity"], r["event_count"]) for r in rows] == [(0, Decimal("10"), 2)]
    assert await _summary_total(usage, tenant, hour) == before == Decimal("10")


@pytest.mark.parametrize("resent", [False, True])
async def test_an_event_is_counted_once_whichever_stripe_sees_it_first(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str, resent: bool
) -> None:
    hour = hour_start(-2)
    await _partition(db, hour)
    async with db.acquire() as conn:
        await conn.fetch(
            _RECORD_BATCH, *_columns(tenant, "once", "marketplace", "wpk_upload", to_micros(hour))
        )
    response = await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, "once", quantity="5", time=hour))
    )
    assert response.outcome == usage_service_pb2.REPORT_OUTCOME_DUPLICATE
    if resent:
        await Folder(db, closed_before=lambda: hour_start(0)).fold_once()
    assert await _summary_total(usage, tenant, hour) == Decimal("5")
