"""Every aggregation against a reference computed here from the raw events.

For random events (a tenant per example), delivered in random batches and order with
duplicates, some of them cancelled afterwards (and sent again: still duplicates), with the
background fold run in between, each meter's summary over a random window, bucket and
grouping must equal what the reference below computes from the surviving events alone.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal

import asyncpg
import grpc
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.storage.folding import Folder
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    meter_service_pb2,
    meter_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.conftest import new_tenant
from tests.helpers import (
    distinct_counts,
    distinct_rows,
    event,
    hour_start,
    months_off_their_hours,
    ts,
    unique_carriers,
)

SERVICE = "metertest"
A = resources_pb2
AGGREGATIONS = {
    "sum": A.METER_AGGREGATION_SUM,
    "count": A.METER_AGGREGATION_COUNT,
    "max": A.METER_AGGREGATION_MAX,
    "min": A.METER_AGGREGATION_MIN,
    "latest": A.METER_AGGREGATION_LATEST,
    "users": A.METER_AGGREGATION_UNIQUE_COUNT,
    "quantities": A.METER_AGGREGATION_UNIQUE_COUNT,
    "gauge": A.METER_AGGREGATION_TIME_WEIGHTED,
    "gold": A.METER_AGGREGATION_SUM,  # a filtered meter: only tier=gold events
    # Without a group-by: UNIQUE_COUNT then counts rows where a label is one piece (the fast path).
    "users-flat": A.METER_AGGREGATION_UNIQUE_COUNT,
    "quantities-flat": A.METER_AGGREGATION_UNIQUE_COUNT,
}
FLAT = {"users-flat", "quantities-flat"}  # no group-by: summaries grouped by region leave them out
HOUR = 3_600_000_000


@dataclass(frozen=True)
class Meters:
    usage_type: str
    names: dict[str, str]  # our key -> "meters/..."


@pytest_asyncio.fixture(scope="module")
async def meters(channel: grpc.aio.Channel) -> AsyncIterator[Meters]:
    """A priced usage type of its own, read by one meter of each aggregation."""
    usage_type = f"u{uuid.uuid4().hex[:10]}"
    await billing_service_pb2_grpc.BillingServiceStub(channel).SetRate(
        billing_service_pb2.SetRateRequest(service=SERVICE, usage_type=usage_type, unit_price="1")
    )
    stub = meter_service_pb2_grpc.MeterServiceStub(channel)
    names = {}
    for key, aggregation in AGGREGATIONS.items():
        created = await stub.CreateMeter(
            meter_service_pb2.CreateMeterRequest(
                meter=A.Meter(
                    meter_id=f"p{uuid.uuid4().hex[:10]}-{key}",
                    service=SERVICE,
                    usage_type=usage_type,
                    aggregation=aggregation,
                    value_dimension="user" if key in ("users", "users-flat") else "",
                    filter={"tier": "gold"} if key == "gold" else {},
                    group_by_dimensions=[] if key in FLAT else ["region"],
                )
            )
        )
        names[key] = created.meter.name
    yield Meters(usage_type, names)


# --- the reference -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # identity: events are drawn into sets
class Ev:
    event_id: str
    micros: int
    quantity: Decimal
    dims: dict[str, str]


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _bucket_label(micros: int, bucket: str) -> int | None:
    moment = datetime.fromtimestamp(micros / 1e6, UTC).replace(minute=0, second=0, microsecond=0)
    if bucket == "":
        return None
    if bucket == "day":
        moment = moment.replace(hour=0)
    if bucket == "month":
        moment = _month_start(moment)
    return int(moment.timestamp())


def _spans(start: int, end: int, bucket: str) -> list[tuple[int | None, int, int]]:
    """(label seconds, start, end) of each bucket of [start, end), by walking hour by hour."""
    found: dict[int | None, list[int]] = {}
    for hour in range(start, end, HOUR):
        found.setdefault(_bucket_label(hour, bucket), []).append(hour)
    return [(label, hours[0], hours[-1] + HOUR) for label, hours in found.items()]


def _tw_hours(total_micros: Decimal) -> Decimal:
    exact = Context(prec=100)
    return exact.divide(total_micros, Decimal(HOUR)).quantize(Decimal("1e-12"), rounding=ROUND_HALF_EVEN)


def _integral(readings: list[Ev], start: int, end: int) -> Decimal:
    """A gauge's integral over [start, end) in unit-microseconds, straight from its definition."""
    ordered = sorted(readings, key=lambda e: (e.micros, e.event_id))
    total = Decimal(0)
    for index, reading in enumerate(ordered):
        following = ordered[index + 1].micros if index + 1 < len(ordered) else end
        low, high = max(reading.micros, start), min(following, end)
        if high > low:
            total += reading.quantity * (high - low)
    return total


def reference(
    key: str, events: list[Ev], seen: list[Ev], start: int, end: int, bucket: str, grouped: bool
) -> dict[tuple[int | None, str], Decimal]:
    """What the meter `key` must report: (bucket label, dimension value) -> value.

    `events` survive; `seen` are every event ever recorded (a cancelled one leaves its
    time-weighted series behind, with zero value).
    """

    def label(e: Ev) -> str:
        return e.dims.get("region", "") if grouped else ""

    key = key.removesuffix("-flat")
    result: dict[tuple[int | None, str], Decimal] = {}
    if key == "gauge":
        # One series per value of the group-by dimension (events without it form their own).
        series: dict[str | None, list[Ev]] = {}
        for e in seen:
            series.setdefault(e.dims.get("region"), [])
        for e in events:
            series[e.dims.get("region")].append(e)
        for region, readings in series.items():
            dimension = (region or "") if grouped else ""
            for span_label, low, high in _spans(start, end, bucket):
                value = _integral(readings, low, high)
                result[(span_label, dimension)] = result.get((span_label, dimension), Decimal(0)) + value
        return {k: _tw_hours(v) for k, v in result.items()}
    chosen = [e for e in events if key != "gold" or e.dims.get("tier") == "gold"]
    for span_label, low, high in _spans(start, end, bucket):
        groups: dict[str, list[Ev]] = defaultdict(list)
        for e in chosen:
            if low <= e.micros < high:
                groups[label(e)].append(e)
        for dimension, members in groups.items():
            value: Decimal | None
            if key in ("sum", "gold"):
                value = sum((e.quantity for e in members), Decimal(0))
            elif key == "count":
                value = Decimal(len(members))
            elif key == "max":
                value = max(e.quantity for e in members)
            elif key == "min":
                value = min(e.quantity for e in members)
            elif key == "latest":
                value = max(members, key=lambda e: (e.micros, e.event_id)).quantity
            elif key == "users":
                users = {e.dims["user"] for e in members if "user" in e.dims}
                value = Decimal(len(users)) if users else None
            else:  # distinct quantities
                value = Decimal(len({e.quantity for e in members}))
            if value is not None:
                result[(span_label, dimension)] = value
    return result


# --- the property ----------------------------------------------------------------------------

NOW = hour_start(0)
# Events from 33 days back (inside the 35-day window) to the current hour.
event_strategy = st.tuples(
    st.integers(0, 5),  # which of the example's instants
    st.integers(0, 3_000),  # thousandths
    # "" and no region share the label "": their UNIQUE_COUNT groups may hold the same value.
    st.sampled_from(["eu", "us", "", None]),
    st.sampled_from(["u1", "u2", "u3", None]),
    st.booleans(),  # tier gold
)
BUCKETS = {"": A.TIME_BUCKET_UNSPECIFIED, "hour": A.TIME_BUCKET_HOUR, "day": A.TIME_BUCKET_DAY}
BUCKETS["month"] = A.TIME_BUCKET_MONTH


def _to_message(tenant: str, e: Ev) -> resources_pb2.UsageEvent:
    text = format(e.quantity, "f")
    return event(
        tenant,
        e.event_id,
        service=SERVICE,
        usage_type=_USAGE_TYPE[0],
        quantity=text,
        time=datetime.fromtimestamp(e.micros / 1e6, UTC),
        dimensions=e.dims,
    )


_USAGE_TYPE: list[str] = [""]  # set by the test from the module fixture (hypothesis cannot take it)


@settings(
    max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(specs=st.lists(event_strategy, min_size=1, max_size=10), data=st.data())
async def test_every_aggregation_matches_the_raw_events(
    channel: grpc.aio.Channel, db: asyncpg.Pool, meters: Meters, specs: list[tuple], data: st.DataObject
) -> None:
    _USAGE_TYPE[0] = meters.usage_type
    usage = usage_service_pb2_grpc.UsageServiceStub(channel)
    tenant = new_tenant()
    origin = NOW - timedelta(days=33)
    origin_micros = int(origin.timestamp()) * 1_000_000
    events = []
    # A few instants per example, shared by several events: equal times are common, so
    # LATEST's tie-break on event_id and readings at the same time are exercised.
    instants = data.draw(st.lists(st.integers(0, 33 * 24 * 60), min_size=1, max_size=6), label="instants")
    for index, (which, thousandths, region, user, gold) in enumerate(specs):
        minutes = instants[which % len(instants)]
        dims = {k: v for k, v in (("region", region), ("user", user)) if v is not None}
        if gold:
            dims["tier"] = "gold"
        micros = origin_micros + (minutes - minutes % 7) * 60_000_000
        if micros > int(datetime.now(UTC).timestamp()) * 1_000_000:
            micros = origin_micros
        events.append(Ev(f"e{index:02d}-{uuid.uuid4().hex[:4]}", micros, Decimal(thousandths) / 1000, dims))
    # Delivery: every event at least once, some twice, in random order and batches.
    deliveries = events + data.draw(st.lists(st.sampled_from(events), max_size=4), label="resent")
    deliveries = data.draw(st.permutations(deliveries), label="order")
    cut = data.draw(st.integers(0, len(deliveries)), label="fold after")
    first, second = deliveries[:cut], deliveries[cut:]

    async def ingest(part: list[Ev]) -> None:
        size = data.draw(st.integers(1, 4), label="batch size")
        requests = [
            usage_service_pb2.IngestUsageRequest(events=[_to_message(tenant, e) for e in part[i : i + size]])
            for i in range(0, len(part), size)
        ]

        async def stream() -> AsyncIterator[usage_service_pb2.IngestUsageRequest]:
            for request in requests:
                yield request

        if requests:
            response = await usage.IngestUsage(stream())
            assert response.rejected_count == 0, response.rejections

    await ingest(first)
    await Folder(db).fold_once()  # stripes of closed hours folded, time-weighted hours cached
    await ingest(second)  # late events land in stripes and mark cached hours dirty
    cancelled = data.draw(st.sets(st.sampled_from(events), max_size=3), label="cancelled")
    for e in cancelled:
        await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id=e.event_id))
    if cancelled:
        resend = usage_service_pb2.IngestUsageRequest(events=[_to_message(tenant, e) for e in cancelled])

        async def once() -> AsyncIterator[usage_service_pb2.IngestUsageRequest]:
            yield resend

        again = await usage.IngestUsage(once())
        assert (again.accepted_count, again.duplicate_count) == (0, len(cancelled))
    if data.draw(st.booleans(), label="fold at the end"):
        await Folder(db).fold_once()

    surviving = [e for e in events if e not in cancelled]
    start_hour = data.draw(st.integers(-24, 34 * 24), label="window start (hours after origin - 1 day)")
    length = data.draw(st.integers(1, 40 * 24), label="window length (hours)")
    start = origin_micros - 24 * HOUR + start_hour * HOUR
    end = start + length * HOUR
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
                meters=sorted(n for k, n in meters.names.items() if not (grouped and k in FLAT)),
            )
        )
    ).summary
    for key, name in meters.names.items():
        if grouped and key in FLAT:
            continue
        got = {
            (
                a.bucket_start_time.seconds if a.HasField("bucket_start_time") else None,
                a.dimension_value,
            ): Decimal(a.value)
            for a in summary.meter_aggregates
            if a.meter == name
        }
        for a in summary.meter_aggregates:
            assert "e" not in a.value.lower() and a.value == a.value.strip()
        expected = reference(key, surviving, events, start, end, bucket, grouped)
        assert got == expected, key
    # UNIQUE_COUNT's bucket counts stay in step with the distinct rows they count, through
    # resends, folds and cancellations (summed over writers' stripes).
    assert await distinct_counts(db, tenant) == await distinct_rows(db, tenant)
    assert await months_off_their_hours(db, tenant) == []
    # Each surviving event is carried once (by its hour row or as another carrier); a
    # cancelled one not at all, its hour row handed over or gone.
    carriers = await unique_carriers(db, tenant)
    for key in ("users", "users-flat", "quantities", "quantities-flat"):
        counted = [e.event_id for e in surviving if not key.startswith("users") or "user" in e.dims]
        assert carriers.get(meters.names[key].removeprefix("meters/"), []) == sorted(counted), key


async def test_unique_count_by_region_counts_a_user_once_with_and_without_an_empty_region(
    channel: grpc.aio.Channel, db: asyncpg.Pool, meters: Meters
) -> None:
    """Events without `region` and with `region` "" are both reported under "": a user in
    both groups of one bucket is one user there, not one per group (the bucket counts are
    kept per group, so this summary must count values)."""
    usage = usage_service_pb2_grpc.UsageServiceStub(channel)
    tenant = new_tenant()
    _USAGE_TYPE[0] = meters.usage_type
    day = (NOW - timedelta(days=2)).replace(hour=0)
    micros = int(day.timestamp()) * 1_000_000 + 3 * HOUR
    events = [
        Ev("a", micros, Decimal(1), {"region": "", "user": "u1"}),
        Ev("b", micros, Decimal(1), {"user": "u1"}),
        Ev("c", micros, Decimal(1), {"user": "u2"}),
        Ev("d", micros, Decimal(1), {"region": "eu", "user": "u1"}),
    ]

    async def requests() -> AsyncIterator[usage_service_pb2.IngestUsageRequest]:
        yield usage_service_pb2.IngestUsageRequest(events=[_to_message(tenant, e) for e in events])

    assert (await usage.IngestUsage(requests())).accepted_count == 4
    for bucket in (A.TIME_BUCKET_HOUR, A.TIME_BUCKET_DAY):
        summary = (
            await usage.GetUsageSummary(
                usage_service_pb2.GetUsageSummaryRequest(
                    name=f"tenants/{tenant}/usageSummary",
                    start_time=ts(day),
                    end_time=ts(day + timedelta(days=1)),
                    bucket=bucket,
                    group_by_dimension="region",
                    meters=[meters.names["users"]],
                )
            )
        ).summary
        assert sorted((a.dimension_value, a.value) for a in summary.meter_aggregates) == [
            ("", "2"),
            ("eu", "1"),
        ]
