"""MeterService and corrections: defining meters, what they count, and cancelling events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import grpc
import pytest
import pytest_asyncio

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
    error_info,
    event,
    field_violations,
    finish_backfills,
    hour_start,
    ingest,
    meter_per_bucket,
    ts,
)

Code = grpc.StatusCode
A = resources_pb2


@pytest.fixture(scope="module")
def meters(channel: grpc.aio.Channel) -> meter_service_pb2_grpc.MeterServiceStub:
    return meter_service_pb2_grpc.MeterServiceStub(channel)


@pytest_asyncio.fixture
async def usage_type(channel: grpc.aio.Channel) -> AsyncIterator[str]:
    """A priced usage type of this test's own (service "metered")."""
    kind = f"u{uuid.uuid4().hex[:10]}"
    await billing_service_pb2_grpc.BillingServiceStub(channel).SetRate(
        billing_service_pb2.SetRateRequest(service="metered", usage_type=kind, unit_price="1")
    )
    yield kind


def _meter(usage_type: str, aggregation: int, **fields: object) -> A.Meter:
    return A.Meter(
        meter_id=f"m-{uuid.uuid4().hex[:10]}",
        service="metered",
        usage_type=usage_type,
        aggregation=aggregation,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


async def _users_meter(meters: meter_service_pb2_grpc.MeterServiceStub, usage_type: str) -> A.Meter:
    """A UNIQUE_COUNT meter of the usage type's `user_id` values."""
    definition = _meter(usage_type, A.METER_AGGREGATION_UNIQUE_COUNT, value_dimension="user_id")
    return (await meters.CreateMeter(meter_service_pb2.CreateMeterRequest(meter=definition))).meter


async def _report_user(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    tenant: str,
    usage_type: str,
    event_id: str,
    when: datetime,
    user: str,
    quantity: str = "1",
) -> None:
    """Report one event of the usage type by `user` (its `user_id` dimension)."""
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(
            event=event(
                tenant,
                event_id,
                service="metered",
                usage_type=usage_type,
                quantity=quantity,
                time=when,
                dimensions={"user_id": user},
            )
        )
    )


async def _values(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str, names: list[str], **request: object
) -> dict[str, str]:
    summary = (
        await usage.GetUsageSummary(
            usage_service_pb2.GetUsageSummaryRequest(
                name=f"tenants/{tenant}/usageSummary",
                start_time=ts(hour_start(-3)),
                end_time=ts(hour_start(1)),
                meters=names,
                **request,  # type: ignore[arg-type]
            )
        )
    ).summary
    return {a.meter: a.value for a in summary.meter_aggregates}


async def test_the_seven_usage_types_are_sum_meters_from_the_start(
    meters: meter_service_pb2_grpc.MeterServiceStub,
) -> None:
    listed = []
    token = ""
    while True:
        page = await meters.ListMeters(meter_service_pb2.ListMetersRequest(page_size=3, page_token=token))
        listed.extend(page.meters)
        token = page.next_page_token
        if not token:
            break
    defaults = {m.name: (m.service, m.usage_type) for m in listed if m.aggregation == A.METER_AGGREGATION_SUM}
    assert defaults["meters/marketplace-wpk-upload"] == ("marketplace", "wpk_upload")
    assert defaults["meters/compute-memory-gb-hour"] == ("compute", "memory_gb_hour")
    assert [m.name for m in listed] == sorted(m.name for m in listed)


async def test_default_sum_meter_reports_the_same_total_as_the_usage_type(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    for quantity in ("1.5", "2.25"):
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity=quantity)))
    values = await _values(usage, tenant, ["meters/marketplace-wpk-upload"])
    assert values == {"meters/marketplace-wpk-upload": "3.75"}


async def test_a_meter_is_created_read_archived_and_its_id_never_reused(
    meters: meter_service_pb2_grpc.MeterServiceStub, db: asyncpg.Pool, usage_type: str
) -> None:
    definition = _meter(usage_type, A.METER_AGGREGATION_UNIQUE_COUNT, value_dimension="user_id")
    request_id = uuid.uuid4().hex
    created = (
        await meters.CreateMeter(
            meter_service_pb2.CreateMeterRequest(meter=definition, request_id=request_id)
        )
    ).meter
    # A UNIQUE_COUNT meter is rebuilt from the events recorded before it (see test_meter_backfill).
    assert (created.name, created.state) == (f"meters/{definition.meter_id}", A.METER_STATE_BACKFILLING)
    # A retry with the request id gets the same answer; without it, the id is taken.
    again = await meters.CreateMeter(
        meter_service_pb2.CreateMeterRequest(meter=definition, request_id=request_id)
    )
    assert again.meter == created
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await meters.CreateMeter(meter_service_pb2.CreateMeterRequest(meter=definition))
    assert raised.value.code() == Code.ALREADY_EXISTS
    assert error_info(raised.value).reason == "METER_EXISTS"  # type: ignore[union-attr]
    assert (await meters.GetMeter(meter_service_pb2.GetMeterRequest(name=created.name))).meter == created

    archived = (await meters.ArchiveMeter(meter_service_pb2.ArchiveMeterRequest(name=created.name))).meter
    assert archived.state == A.METER_STATE_ARCHIVED and archived.HasField("archive_time")
    assert not archived.backfill.HasField("end_time")  # archived before its backfill finished
    twice = (await meters.ArchiveMeter(meter_service_pb2.ArchiveMeterRequest(name=created.name))).meter
    assert twice == archived
    actions = await db.fetch("SELECT action FROM audit_events WHERE resource = $1 ORDER BY id", created.name)
    assert [r["action"] for r in actions] == ["meter_created", "meter_archived"]


async def test_a_meter_must_read_a_priced_usage_type_and_be_well_formed(
    meters: meter_service_pb2_grpc.MeterServiceStub, usage_type: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await meters.CreateMeter(
            meter_service_pb2.CreateMeterRequest(meter=_meter("not-priced", A.METER_AGGREGATION_MAX))
        )
    assert raised.value.code() == Code.INVALID_ARGUMENT
    assert "rate card" in field_violations(raised.value)["meter.usage_type"]
    bad = _meter(usage_type, A.METER_AGGREGATION_MAX, value_dimension="user", group_by_dimensions=["a", "a"])
    bad.meter_id = "Not_A_Name"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await meters.CreateMeter(meter_service_pb2.CreateMeterRequest(meter=bad))
    assert set(field_violations(raised.value)) == {
        "meter.meter_id",
        "meter.value_dimension",
        "meter.group_by_dimensions",
    }
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await meters.GetMeter(meter_service_pb2.GetMeterRequest(name="meters/no-such-meter"))
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.NOT_FOUND,
        "METER_NOT_FOUND",
    )


async def test_a_meter_created_after_its_events_counts_them_once_backfilled(
    meters: meter_service_pb2_grpc.MeterServiceStub,
    usage: usage_service_pb2_grpc.UsageServiceStub,
    db: asyncpg.Pool,
    tenant: str,
    usage_type: str,
) -> None:
    def sent(event_id: str, quantity: str) -> usage_service_pb2.ReportUsageRequest:
        return usage_service_pb2.ReportUsageRequest(
            event=event(tenant, event_id, service="metered", usage_type=usage_type, quantity=quantity)
        )

    await usage.ReportUsage(sent("before", "9"))
    await usage.ReportUsage(sent("cancelled", "50"))
    await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id="cancelled"))
    peak = (await meters.CreateMeter(meter_service_pb2.CreateMeterRequest(meter=_meter(usage_type, 3)))).meter
    total = (
        await meters.CreateMeter(meter_service_pb2.CreateMeterRequest(meter=_meter(usage_type, 1)))
    ).meter
    # SUM reads the hourly rollups, which hold every event: complete at once. MAX counts new
    # events at once, and the earlier ones once its backfill has read them.
    assert (peak.state, total.state) == (A.METER_STATE_BACKFILLING, A.METER_STATE_ACTIVE)
    await usage.ReportUsage(sent("after", "4"))
    assert await _values(usage, tenant, [peak.name, total.name]) == {peak.name: "4", total.name: "13"}
    # From the first key on, in the server's default batches (a real pass over every key).
    await finish_backfills(MeterBackfiller(db, settle_seconds=0), db, [peak.name])
    done = (await meters.GetMeter(meter_service_pb2.GetMeterRequest(name=peak.name))).meter
    assert done.state == A.METER_STATE_ACTIVE and done.backfill.HasField("end_time")
    assert done.backfill.scanned_event_count >= 3
    # "before" and "after" (which a live batch had counted already: counted once); not "cancelled".
    assert done.backfill.counted_event_count == 2
    assert await _values(usage, tenant, [peak.name, total.name]) == {peak.name: "9", total.name: "13"}
    await meters.ArchiveMeter(meter_service_pb2.ArchiveMeterRequest(name=peak.name))
    await usage.ReportUsage(sent("archived", "70"))
    assert (await _values(usage, tenant, [peak.name]))[peak.name] == "9"


async def test_a_meter_groups_only_by_its_dimensions_and_unknown_meters_are_not_found(
    meters: meter_service_pb2_grpc.MeterServiceStub,
    usage: usage_service_pb2_grpc.UsageServiceStub,
    tenant: str,
    usage_type: str,
) -> None:
    peak = (
        await meters.CreateMeter(
            meter_service_pb2.CreateMeterRequest(meter=_meter(usage_type, 3, group_by_dimensions=["region"]))
        )
    ).meter
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _values(usage, tenant, [peak.name], group_by_dimension="zone")
    assert "group_by_dimension" in field_violations(raised.value)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _values(usage, tenant, ["meters/no-such-meter"])
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.NOT_FOUND,
        "METER_NOT_FOUND",
    )


async def test_a_cancelled_event_stops_counting_everywhere_and_stays_a_duplicate(
    meters: meter_service_pb2_grpc.MeterServiceStub,
    usage: usage_service_pb2_grpc.UsageServiceStub,
    db: asyncpg.Pool,
    tenant: str,
    usage_type: str,
) -> None:
    users = await _users_meter(meters, usage_type)
    when = hour_start(-1) + timedelta(minutes=5)
    for event_id, user, quantity in (("a", "ann", "2"), ("b", "bob", "3")):
        await _report_user(usage, tenant, usage_type, event_id, when, user, quantity)
    assert await _values(usage, tenant, [users.name]) == {users.name: "2"}
    request_id = uuid.uuid4().hex
    cancel = usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id="b", request_id=request_id)
    first = await usage.CancelEvent(cancel)
    assert (first.tenant_id, first.event_id) == (tenant, "b")
    assert await _values(usage, tenant, [users.name]) == {users.name: "1"}
    summary = (
        await usage.GetUsageSummary(
            usage_service_pb2.GetUsageSummaryRequest(
                name=f"tenants/{tenant}/usageSummary",
                start_time=ts(hour_start(-3)),
                end_time=ts(hour_start(1)),
            )
        )
    ).summary
    assert [(a.quantity, a.event_count) for a in summary.aggregates] == [("2", 1)]
    # Sent again: still a duplicate. Cancelled again: the same answer, nothing changes.
    resent = await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(
            event=event(tenant, "b", service="metered", usage_type=usage_type, quantity="3", time=when)
        )
    )
    assert resent.outcome == usage_service_pb2.REPORT_OUTCOME_DUPLICATE
    assert await usage.CancelEvent(cancel) == first
    assert (
        await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id="b")) == first
    )
    audit = await db.fetch(
        "SELECT before ->> 'quantity' AS quantity FROM audit_events WHERE action = 'usage_event_cancelled'"
        " AND tenant_id = $1",
        tenant,
    )
    assert [r["quantity"] for r in audit] == ["3"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id="never-sent"))
    assert (raised.value.code(), error_info(raised.value).reason) == (  # type: ignore[union-attr]
        Code.NOT_FOUND,
        "EVENT_NOT_FOUND",
    )


async def test_streamed_summaries_report_the_named_meters_per_tenant(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    tenants = sorted(f"t-{uuid.uuid4().hex[:12]}" for _ in range(2))
    for i, tenant in enumerate(tenants):
        for quantity in ("1", str(5 + i)):
            await usage.ReportUsage(
                usage_service_pb2.ReportUsageRequest(
                    event=event(tenant, usage_type="wpk_review", quantity=quantity)
                )
            )
    name = "meters/marketplace-wpk-review"
    streamed = usage.StreamUsageSummaries(
        usage_service_pb2.StreamUsageSummariesRequest(
            tenant_ids=tenants, start_time=ts(hour_start(-1)), end_time=ts(hour_start(1)), meters=[name]
        )
    )
    got = {
        r.summary.tenant_id: [(a.meter, a.value) for a in r.summary.meter_aggregates] async for r in streamed
    }
    assert got == {tenants[0]: [(name, "6")], tenants[1]: [(name, "7")]}


async def test_unique_count_without_group_by_is_exact_per_hour_day_and_window(
    meters: meter_service_pb2_grpc.MeterServiceStub,
    usage: usage_service_pb2_grpc.UsageServiceStub,
    tenant: str,
    usage_type: str,
) -> None:
    """Whole-hour and whole-day buckets are counted as rows (one piece each, no group-by); a
    window over several pieces counts distinct values across them. Both must be exact."""
    users = await _users_meter(meters, usage_type)
    day = hour_start(0).replace(hour=0) - timedelta(days=3)  # three whole days, all in the past
    # (hour after `day`, user): ann every day, bob twice on day 0, cy on day 1 and 2 (cancelled on 2).
    seen = [(1, "ann"), (2, "bob"), (2, "bob"), (5, "bob"), (25, "ann"), (26, "cy"), (49, "ann"), (50, "cy")]
    for index, (hour, user) in enumerate(seen):
        await _report_user(
            usage, tenant, usage_type, f"e{index}", day + timedelta(hours=hour, minutes=10), user
        )
    await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id="e7"))

    async def counts(bucket: int, start: timedelta, end: timedelta) -> dict[int | None, str]:
        return await meter_per_bucket(usage, tenant, users.name, bucket, day, day + start, day + end)

    days = timedelta(days=3)
    assert await counts(A.TIME_BUCKET_DAY, timedelta(0), days) == {0: "2", 24: "2", 48: "1"}
    assert await counts(A.TIME_BUCKET_HOUR, timedelta(0), timedelta(hours=6)) == {1: "1", 2: "1", 5: "1"}
    # One window over three days (three day pieces): ann, bob and cy once each.
    assert await counts(A.TIME_BUCKET_UNSPECIFIED, timedelta(0), days) == {None: "3"}
    # A window that starts mid-day (hour pieces and day pieces): bob's two hours count once.
    assert await counts(A.TIME_BUCKET_UNSPECIFIED, timedelta(hours=2), days) == {None: "3"}


async def test_cancelling_the_event_that_brought_a_value_to_its_hour_hands_the_hour_on(
    meters: meter_service_pb2_grpc.MeterServiceStub,
    usage: usage_service_pb2_grpc.UsageServiceStub,
    db: asyncpg.Pool,
    tenant: str,
    usage_type: str,
) -> None:
    """The hour row names the event that brought the value (migration 0056); the hour's other
    carriers have rows of their own. Cancelling the named one passes the hour row to another;
    the value leaves its hour, day and month only with its last carrier there."""
    users = await _users_meter(meters, usage_type)
    day = hour_start(0).replace(hour=0) - timedelta(days=2)
    # ann: "a" then "b" in hour 1 (reported one after the other), "c" in hour 3 of the same day.
    for event_id, hour in (("a", 1), ("b", 1), ("c", 3)):
        await _report_user(
            usage, tenant, usage_type, event_id, day + timedelta(hours=hour, minutes=10), "ann"
        )

    async def state() -> tuple[
        dict[int | None, str], dict[int | None, str], list[tuple[int, str]], list[str]
    ]:
        end = day + timedelta(days=1)
        hours = await meter_per_bucket(usage, tenant, users.name, A.TIME_BUCKET_HOUR, day, day, end)
        days = await meter_per_bucket(usage, tenant, users.name, A.TIME_BUCKET_DAY, day, day, end)
        hour_rows = await db.fetch(
            "SELECT extract(epoch FROM hour - $2)::int / 3600, event_id FROM meter_distinct_hours"
            " WHERE tenant_id = $1 ORDER BY 1",
            tenant,
            day,
        )
        others = await db.fetch(
            "SELECT event_id FROM meter_unique_values WHERE tenant_id = $1 ORDER BY 1", tenant
        )
        return hours, days, [tuple(r) for r in hour_rows], [r[0] for r in others]

    assert await state() == ({1: "1", 3: "1"}, {0: "1"}, [(1, "a"), (3, "c")], ["b"])

    async def cancel(event_id: str) -> None:
        await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id=event_id))

    await cancel("a")  # "b" still carries ann in hour 1: it takes the hour row over
    assert await state() == ({1: "1", 3: "1"}, {0: "1"}, [(1, "b"), (3, "c")], [])
    await cancel("b")  # hour 1 loses ann; hour 3 still has her that day
    assert await state() == ({3: "1"}, {0: "1"}, [(3, "c")], [])
    await cancel("c")  # her last carrier of the day and the month
    assert await state() == ({}, {}, [], [])
    assert await db.fetchval("SELECT count(*) FROM meter_distinct_months WHERE tenant_id = $1", tenant) == 0


async def test_a_batch_of_any_mix_of_meter_kinds_is_stored_whole(
    channel: grpc.aio.Channel,
    meters: meter_service_pb2_grpc.MeterServiceStub,
    usage: usage_service_pb2_grpc.UsageServiceStub,
    tenant: str,
) -> None:
    """The batch statement holds only the write CTEs of the kinds its batch has (values,
    distinct values, readings): every one of the seven mixes must store all of its events."""
    billing = billing_service_pb2_grpc.BillingServiceStub(channel)
    aggregations = {
        "max": A.METER_AGGREGATION_MAX,
        "users": A.METER_AGGREGATION_UNIQUE_COUNT,
        "gauge": A.METER_AGGREGATION_TIME_WEIGHTED,
    }
    types, names = {}, {}
    for key, aggregation in aggregations.items():
        types[key] = f"u{uuid.uuid4().hex[:10]}"
        await billing.SetRate(
            billing_service_pb2.SetRateRequest(service="metered", usage_type=types[key], unit_price="1")
        )
        fields = {"value_dimension": "user_id"} if key == "users" else {}
        definition = _meter(types[key], aggregation, **fields)
        created = await meters.CreateMeter(meter_service_pb2.CreateMeterRequest(meter=definition))
        names[key] = created.meter.name
    hour = hour_start(-2)
    peaks, users, gigabytes = ["7", "3", "9.5", "2"], ["ann", "bob", "ann", "cy"], ["4", "8", "12", "16"]
    sent: dict[str, list[str]] = {key: [] for key in aggregations}
    mixes = [("max",), ("users",), ("gauge",), ("max", "users"), ("max", "gauge"), ("users", "gauge")]
    for number, mix in enumerate([*mixes, ("max", "users", "gauge")]):
        batch = []
        for key in mix:
            index = len(sent[key])
            quantity, dimensions, when = "1", {}, hour + timedelta(minutes=5)
            if key == "max":
                quantity = peaks[index]
            elif key == "users":
                dimensions = {"user_id": users[index]}
            else:  # a reading every 15 minutes from the hour's start
                quantity, when = gigabytes[index], hour + timedelta(minutes=15 * index)
            sent[key].append(users[index] if key == "users" else quantity)
            batch.append(
                event(
                    tenant,
                    f"mix{number}-{key}",
                    service="metered",
                    usage_type=types[key],
                    quantity=quantity,
                    time=when,
                    dimensions=dimensions,
                )
            )

        assert (await ingest(usage, [batch])).accepted_count == len(mix)
        # What each meter holds over the hour, computed by hand from what was sent so far.
        readings = [Decimal(q) for q in sent["gauge"]]
        expected = {
            "max": max((Decimal(q) for q in sent["max"]), default=None),
            "users": Decimal(len(set(sent["users"]))) if sent["users"] else None,
            # Each reading holds for 15 minutes until the next; the last one to the hour's end.
            "gauge": sum(readings[:-1], Decimal(0)) / 4 + readings[-1] * (5 - len(readings)) / 4
            if readings
            else None,
        }
        for key, name in names.items():
            found = await meter_per_bucket(
                usage, tenant, name, A.TIME_BUCKET_UNSPECIFIED, hour, hour, hour + timedelta(hours=1)
            )
            assert {k: Decimal(v) for k, v in found.items()} == (
                {} if expected[key] is None else {None: expected[key]}
            ), (mix, key)
    # After all seven: the peak 9.5, three users, and 4/4 + 8/4 + 12/4 + 16/4 = 10 GB-hours.
    assert expected == {"max": Decimal("9.5"), "users": Decimal(3), "gauge": Decimal(10)}
