"""A meter created after its events reports, once backfilled, what one that existed from the start does.

For random events (a tenant per example) delivered in random batches with duplicates, some
cancelled before the late meter exists, more events arriving and more cancellations while
its backfill is part way (in batches of a few keys), with the background fold in between,
each late meter's summary over a random window, bucket and grouping must equal that of its
twin created before any event (which test_meter_properties checks against a reference
computed from the raw events).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import grpc
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.storage.folding import Folder
from server.storage.meter_backfill import MeterBackfiller
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    meter_service_pb2,
    meter_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.helpers import (
    distinct_counts,
    distinct_rows,
    event,
    finish_backfills,
    hour_start,
    months_off_their_hours,
    ts,
    unique_carriers,
)

SERVICE = "backfilltest"
A = resources_pb2
HOUR = 3_600_000_000
# The aggregations that store per-event data (SUM and COUNT need no backfill), with a
# filtered and a value-dimension variant.
DEFINITIONS: dict[str, dict[str, object]] = {
    "max": {"aggregation": A.METER_AGGREGATION_MAX},
    "min": {"aggregation": A.METER_AGGREGATION_MIN},
    "latest": {"aggregation": A.METER_AGGREGATION_LATEST},
    "users": {"aggregation": A.METER_AGGREGATION_UNIQUE_COUNT, "value_dimension": "user"},
    "quantities": {"aggregation": A.METER_AGGREGATION_UNIQUE_COUNT},
    "gauge": {"aggregation": A.METER_AGGREGATION_TIME_WEIGHTED},
    "gold-max": {"aggregation": A.METER_AGGREGATION_MAX, "filter": {"tier": "gold"}},
}
BUCKETS = {
    "": A.TIME_BUCKET_UNSPECIFIED,
    "hour": A.TIME_BUCKET_HOUR,
    "day": A.TIME_BUCKET_DAY,
    "month": A.TIME_BUCKET_MONTH,
}


@dataclass(frozen=True)
class Twins:
    usage_type: str
    originals: dict[str, str]  # kind -> "meters/..." created before any event of the usage type


def _definition(kind: str, usage_type: str) -> A.Meter:
    return A.Meter(
        meter_id=f"b{uuid.uuid4().hex[:10]}-{kind}",
        service=SERVICE,
        usage_type=usage_type,
        group_by_dimensions=["region"],
        **DEFINITIONS[kind],  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture(scope="module")
async def twins(channel: grpc.aio.Channel, db: asyncpg.Pool) -> AsyncIterator[Twins]:
    usage_type = f"u{uuid.uuid4().hex[:10]}"
    await billing_service_pb2_grpc.BillingServiceStub(channel).SetRate(
        billing_service_pb2.SetRateRequest(service=SERVICE, usage_type=usage_type, unit_price="1")
    )
    stub = meter_service_pb2_grpc.MeterServiceStub(channel)
    originals = {}
    for kind in DEFINITIONS:
        created = await stub.CreateMeter(
            meter_service_pb2.CreateMeterRequest(meter=_definition(kind, usage_type))
        )
        originals[kind] = created.meter.name
    # No event of the usage type exists yet: their backfills add nothing (and are quick,
    # starting at the keys of this module's tenants, which sort last).
    await db.execute(
        "UPDATE meters SET backfill_tenant_id = 'zz', backfill_event_id = '' WHERE name = ANY($1)",
        [name.removeprefix("meters/") for name in originals.values()],
    )
    await finish_backfills(MeterBackfiller(db, settle_seconds=0), db, list(originals.values()))
    yield Twins(usage_type, originals)


@dataclass(frozen=True, eq=False)  # identity: events are drawn into sets
class Ev:
    event_id: str
    micros: int
    quantity: Decimal
    dims: dict[str, str]


NOW = hour_start(0)
event_strategy = st.tuples(
    st.integers(0, 5),  # which of the example's instants
    st.integers(0, 3_000),  # thousandths
    st.sampled_from(["eu", "us", None]),
    st.sampled_from(["u1", "u2", "u3", None]),
    st.booleans(),  # tier gold
    st.booleans(),  # recorded before the late meters exist
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(specs=st.lists(event_strategy, min_size=1, max_size=10), data=st.data())
async def test_a_backfilled_meter_reports_what_a_meter_from_the_start_reports(
    channel: grpc.aio.Channel, db: asyncpg.Pool, twins: Twins, specs: list[tuple], data: st.DataObject
) -> None:
    usage = usage_service_pb2_grpc.UsageServiceStub(channel)
    meters = meter_service_pb2_grpc.MeterServiceStub(channel)
    tenant = f"zz-{uuid.uuid4().hex[:16]}"
    origin_micros = int((NOW - timedelta(days=33)).timestamp()) * 1_000_000
    instants = data.draw(st.lists(st.integers(0, 33 * 24 * 60), min_size=1, max_size=6), label="instants")
    early: list[Ev] = []
    late: list[Ev] = []
    for index, (which, thousandths, region, user, gold, before) in enumerate(specs):
        minutes = instants[which % len(instants)]
        dims = {k: v for k, v in (("region", region), ("user", user)) if v is not None}
        if gold:
            dims["tier"] = "gold"
        micros = origin_micros + (minutes - minutes % 7) * 60_000_000
        if micros > int(datetime.now(UTC).timestamp()) * 1_000_000:
            micros = origin_micros
        e = Ev(f"e{index:02d}-{uuid.uuid4().hex[:4]}", micros, Decimal(thousandths) / 1000, dims)
        (early if before else late).append(e)

    def message(e: Ev) -> A.UsageEvent:
        return event(
            tenant,
            e.event_id,
            service=SERVICE,
            usage_type=twins.usage_type,
            quantity=format(e.quantity, "f"),
            time=datetime.fromtimestamp(e.micros / 1e6, UTC),
            dimensions=e.dims,
        )

    async def ingest(part: list[Ev], label: str) -> None:
        deliveries = part + data.draw(st.lists(st.sampled_from(part), max_size=3), label=f"{label} resent")
        deliveries = data.draw(st.permutations(deliveries), label=f"{label} order")
        size = data.draw(st.integers(1, 4), label=f"{label} batch size")
        requests = [
            usage_service_pb2.IngestUsageRequest(events=[message(e) for e in deliveries[i : i + size]])
            for i in range(0, len(deliveries), size)
        ]

        async def stream() -> AsyncIterator[usage_service_pb2.IngestUsageRequest]:
            for request in requests:
                yield request

        response = await usage.IngestUsage(stream())
        assert response.rejected_count == 0, response.rejections

    async def cancel(candidates: list[Ev], label: str) -> None:
        for e in (
            data.draw(st.sets(st.sampled_from(candidates), max_size=2), label=label) if candidates else ()
        ):
            await usage.CancelEvent(
                usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id=e.event_id)
            )

    if early:
        await ingest(early, "early")
        await cancel(early, "cancelled before the late meters")
    if data.draw(st.booleans(), label="fold before"):
        await Folder(db).fold_once()
    kinds = sorted(
        data.draw(st.sets(st.sampled_from(sorted(DEFINITIONS)), min_size=1, max_size=3), label="late")
    )
    copies = {}
    for kind in kinds:
        created = (
            await meters.CreateMeter(
                meter_service_pb2.CreateMeterRequest(meter=_definition(kind, twins.usage_type))
            )
        ).meter
        assert created.state == A.METER_STATE_BACKFILLING
        copies[kind] = created.name
    ids = [name.removeprefix("meters/") for name in copies.values()]
    # Every key before this example's tenant belongs to another test (none of this usage
    # type's): the scan starts at the tenant, as if resumed there, instead of reading the
    # whole session's keys a few at a time. test_meters covers a scan from the first key.
    await db.execute(
        "UPDATE meters SET backfill_tenant_id = $1, backfill_event_id = '' WHERE name = ANY($2)", tenant, ids
    )
    backfiller = MeterBackfiller(db, settle_seconds=0, batch_keys=data.draw(st.integers(1, 4), label="batch"))
    for _ in range(data.draw(st.integers(0, 6), label="steps before live traffic")):
        await backfiller.step(ids)
    if late:
        await ingest(late, "late")  # live batches count them in the late meters too
    await cancel(early + late, "cancelled during the backfill")
    if data.draw(st.booleans(), label="fold during"):
        await Folder(db).fold_once()
    await finish_backfills(backfiller, db, list(copies.values()))
    if data.draw(st.booleans(), label="fold after"):
        await Folder(db).fold_once()
    # UNIQUE_COUNT's bucket counts agree with the distinct rows the backfill and the live
    # batches wrote side by side (each counts only the rows it inserted).
    assert await distinct_counts(db, tenant) == await distinct_rows(db, tenant)
    assert await months_off_their_hours(db, tenant) == []
    # Each surviving event is carried once by the copy, as by its twin: an event that a live
    # batch made an hour row's carrier is not written again as another carrier.
    carriers = await unique_carriers(db, tenant)
    for kind in set(kinds) & {"users", "quantities"}:
        copy, original = (name.removeprefix("meters/") for name in (copies[kind], twins.originals[kind]))
        assert carriers.get(copy, []) == carriers.get(original, []), kind

    start = origin_micros - 24 * HOUR + data.draw(st.integers(-24, 34 * 24), label="window start") * HOUR
    end = start + data.draw(st.integers(1, 40 * 24), label="window length") * HOUR
    bucket = data.draw(st.sampled_from(sorted(BUCKETS)), label="bucket")
    if bucket == "hour":
        end = min(end, start + 100 * HOUR)
    grouped = data.draw(st.booleans(), label="grouped by region")
    summary = (
        await usage.GetUsageSummary(
            usage_service_pb2.GetUsageSummaryRequest(
                name=f"tenants/{tenant}/usageSummary",
                start_time=ts(datetime.fromtimestamp(start / 1e6, UTC)),
                end_time=ts(datetime.fromtimestamp(end / 1e6, UTC)),
                bucket=BUCKETS[bucket],
                group_by_dimension="region" if grouped else "",
                meters=sorted([*copies.values(), *(twins.originals[k] for k in kinds)]),
            )
        )
    ).summary

    def values(name: str) -> dict[tuple[int | None, str], str]:
        return {
            (
                a.bucket_start_time.seconds if a.HasField("bucket_start_time") else None,
                a.dimension_value,
            ): a.value
            for a in summary.meter_aggregates
            if a.meter == name
        }

    for kind in kinds:
        assert values(copies[kind]) == values(twins.originals[kind]), kind
        done = (await meters.GetMeter(meter_service_pb2.GetMeterRequest(name=copies[kind]))).meter
        assert done.state == A.METER_STATE_ACTIVE and done.backfill.HasField("end_time")
