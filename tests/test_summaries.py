"""GetUsageSummary and StreamUsageSummaries over the hourly rollups."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from tally.v1 import resources_pb2, usage_service_pb2, usage_service_pb2_grpc
from tests.conftest import new_tenant
from tests.helpers import event, field_violations, hour_start, ts


async def report_all(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    events: list[resources_pb2.UsageEvent],
    *,
    backfill: bool = False,
) -> None:
    """Record the events in one batch; a backfill for times older than the ingestion window."""

    async def requests():  # type: ignore[no-untyped-def]
        yield usage_service_pb2.IngestUsageRequest(events=events, backfill=backfill)

    response = await usage.IngestUsage(requests())
    assert response.rejected_count == 0, response.rejections


def aggregates(summary: resources_pb2.UsageSummary) -> list[tuple[str, str, str, str, str, int]]:
    return [
        (
            a.service,
            a.usage_type,
            a.bucket_start_time.ToDatetime().isoformat() if a.HasField("bucket_start_time") else "",
            a.dimension_value,
            a.quantity,
            a.event_count,
        )
        for a in summary.aggregates
    ]


async def test_summary_totals_per_usage_type_hour_and_dimension(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    h0 = hour_start(-30)
    await report_all(
        usage,
        [
            event(tenant, "a", quantity="1.5", time=h0 + timedelta(minutes=5), dimensions={"region": "eu"}),
            event(tenant, "b", quantity="2", time=h0 + timedelta(minutes=59), dimensions={"region": "us"}),
            event(
                tenant,
                "c",
                quantity="0.25",
                time=h0 + timedelta(hours=1, minutes=1),
                dimensions={"region": "eu"},
            ),
            event(
                tenant,
                "d",
                service="compute",
                usage_type="cpu_hour",
                quantity="3",
                time=h0 + timedelta(hours=2),
            ),
            event(tenant, "outside", quantity="100", time=h0 + timedelta(hours=3)),
        ],
    )
    base = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary", start_time=ts(h0), end_time=ts(h0 + timedelta(hours=3))
    )
    whole = (await usage.GetUsageSummary(base)).summary
    assert aggregates(whole) == [
        ("compute", "cpu_hour", "", "", "3", 1),
        ("marketplace", "wpk_upload", "", "", "3.75", 3),
    ]

    base.bucket = resources_pb2.TIME_BUCKET_HOUR
    hourly = (await usage.GetUsageSummary(base)).summary
    h = lambda n: (h0 + timedelta(hours=n)).replace(tzinfo=None).isoformat()  # noqa: E731
    assert aggregates(hourly) == [
        ("compute", "cpu_hour", h(2), "", "3", 1),
        ("marketplace", "wpk_upload", h(0), "", "3.5", 2),
        ("marketplace", "wpk_upload", h(1), "", "0.25", 1),
    ]

    base.bucket = resources_pb2.TIME_BUCKET_UNSPECIFIED
    base.group_by_dimension = "region"
    by_region = (await usage.GetUsageSummary(base)).summary
    assert by_region.group_by_dimension == "region"
    assert aggregates(by_region) == [
        ("compute", "cpu_hour", "", "", "3", 1),
        ("marketplace", "wpk_upload", "", "eu", "1.75", 2),
        ("marketplace", "wpk_upload", "", "us", "2", 1),
    ]


async def test_day_and_month_buckets_are_utc(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    day = hour_start(-24 * 40).replace(hour=0)
    await report_all(
        usage,
        [
            event(tenant, "d1", quantity="1", time=day + timedelta(hours=23, minutes=59)),
            event(tenant, "d2", quantity="2", time=day + timedelta(hours=24)),
        ],
        backfill=True,
    )
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary",
        start_time=ts(day),
        end_time=ts(day + timedelta(days=2)),
        bucket=resources_pb2.TIME_BUCKET_DAY,
    )
    daily = (await usage.GetUsageSummary(request)).summary
    assert [(a.bucket_start_time.ToDatetime(), a.quantity) for a in daily.aggregates] == [
        (day.replace(tzinfo=None), "1"),
        ((day + timedelta(days=1)).replace(tzinfo=None), "2"),
    ]
    request.bucket = resources_pb2.TIME_BUCKET_MONTH
    monthly = (await usage.GetUsageSummary(request)).summary
    months = {a.bucket_start_time.ToDatetime() for a in monthly.aggregates}
    assert months <= {day.replace(day=1, tzinfo=None), (day + timedelta(days=1)).replace(day=1, tzinfo=None)}
    assert sum(a.event_count for a in monthly.aggregates) == 2


async def test_summary_of_a_tenant_without_usage_is_empty(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{new_tenant()}/usageSummary", start_time=ts(hour_start(-5)), end_time=ts(hour_start(1))
    )
    assert list((await usage.GetUsageSummary(request)).summary.aggregates) == []


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        (None, 1, "start_time"),
        (0, None, "end_time"),
        (1, 0, "end_time"),
        (0, 0, "end_time"),
        ("half", 1, "start_time"),
        (0, 24 * 3700, "end_time"),
    ],
)
async def test_bad_summary_range_is_invalid_argument(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str, start: object, end: object, field: str
) -> None:
    request = usage_service_pb2.GetUsageSummaryRequest(name=f"tenants/{tenant}/usageSummary")
    base = hour_start(-24 * 4000)
    if start is not None:
        request.start_time.CopyFrom(
            ts(base + (timedelta(minutes=30) if start == "half" else timedelta(hours=start)))
        )  # type: ignore[arg-type]
    if end is not None:
        request.end_time.CopyFrom(ts(base + timedelta(hours=end)))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.GetUsageSummary(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)


async def test_hourly_buckets_over_more_than_a_year_are_refused(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary",
        start_time=ts(hour_start(-24 * 400)),
        end_time=ts(hour_start(0)),
        bucket=resources_pb2.TIME_BUCKET_HOUR,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.GetUsageSummary(request)
    assert "end_time" in field_violations(raised.value)
    request.bucket = resources_pb2.TIME_BUCKET_DAY
    await usage.GetUsageSummary(request)


async def test_summary_with_unknown_bucket_value_is_invalid(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary",
        start_time=ts(hour_start(-1)),
        end_time=ts(hour_start(0)),
        bucket=42,  # type: ignore[arg-type]
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.GetUsageSummary(request)
    assert "bucket" in field_violations(raised.value)


async def test_stream_summaries_for_listed_tenants_in_order_including_empty_ones(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    tenants = sorted(new_tenant() for _ in range(3))
    h0 = hour_start(-50)
    await report_all(
        usage,
        [event(tenants[0], "x", quantity="1", time=h0), event(tenants[2], "y", quantity="2", time=h0)],
    )
    request = usage_service_pb2.StreamUsageSummariesRequest(
        tenant_ids=[tenants[2], tenants[0], tenants[1], tenants[0]],
        start_time=ts(h0),
        end_time=ts(h0 + timedelta(hours=1)),
    )
    summaries = [r.summary async for r in usage.StreamUsageSummaries(request)]
    assert [s.tenant_id for s in summaries] == tenants
    assert [[a.quantity for a in s.aggregates] for s in summaries] == [["1"], [], ["2"]]


async def test_stream_summaries_for_all_tenants_with_usage(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    # An hour far in the past that only this test uses, with more tenants than one query chunk.
    h0 = hour_start(-24 * 3000)
    tenants = sorted(new_tenant() for _ in range(130))
    await report_all(
        usage,
        [event(t, "only", quantity="1", time=h0 + timedelta(minutes=1)) for t in tenants],
        backfill=True,
    )
    request = usage_service_pb2.StreamUsageSummariesRequest(
        start_time=ts(h0), end_time=ts(h0 + timedelta(hours=1))
    )
    summaries = [r.summary async for r in usage.StreamUsageSummaries(request)]
    assert [s.tenant_id for s in summaries] == tenants
    assert all(s.aggregates[0].event_count == 1 for s in summaries)


async def test_stream_summaries_rejects_bad_tenant_ids(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    request = usage_service_pb2.StreamUsageSummariesRequest(
        tenant_ids=["ok", ""], start_time=ts(hour_start(-1)), end_time=ts(hour_start(0))
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in usage.StreamUsageSummaries(request):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_ids[1]" in field_violations(raised.value)


async def test_control_characters_in_the_dimension_key_are_invalid(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary",
        start_time=ts(hour_start(-1)),
        end_time=ts(hour_start(0)),
        group_by_dimension="re\x00gion",
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.GetUsageSummary(request)
    assert "group_by_dimension" in field_violations(raised.value)
