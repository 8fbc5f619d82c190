"""GetUsageSummary and StreamUsageSummaries with a read_mask (AIP-157 partial responses)."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tests.helpers import error_info, event, field_violations, hour_start, ts

Code = grpc.StatusCode
METER = "meters/marketplace-wpk-review"  # a default SUM meter


async def _tenant_with_usage(usage: usage_service_pb2_grpc.UsageServiceStub) -> str:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    for quantity in ("1.5", "4"):
        await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(
                event=event(tenant, usage_type="wpk_review", quantity=quantity)
            )
        )
    return tenant


def _request(tenant: str, *paths: str) -> usage_service_pb2.GetUsageSummaryRequest:
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary",
        start_time=ts(hour_start(-1)),
        end_time=ts(hour_start(1)),
        meters=[METER],
    )
    if paths:
        request.read_mask.CopyFrom(FieldMask(paths=list(paths)))
    return request


async def test_a_mask_returns_only_the_fields_it_names(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    tenant = await _tenant_with_usage(usage)
    whole = (await usage.GetUsageSummary(_request(tenant))).summary
    assert [(a.usage_type, a.quantity) for a in whole.aggregates] == [("wpk_review", "5.5")]
    assert [(a.meter, a.value) for a in whole.meter_aggregates] == [(METER, "5.5")]
    assert (await usage.GetUsageSummary(_request(tenant, "*"))).summary == whole

    meters_only = (await usage.GetUsageSummary(_request(tenant, "meter_aggregates"))).summary
    assert list(meters_only.meter_aggregates) == list(whole.meter_aggregates)
    assert not meters_only.aggregates
    assert (meters_only.name, meters_only.tenant_id, meters_only.HasField("start_time")) == ("", "", False)

    usage_only = (await usage.GetUsageSummary(_request(tenant, "aggregates", "name", "start_time"))).summary
    assert list(usage_only.aggregates) == list(whole.aggregates)
    assert not usage_only.meter_aggregates
    assert (usage_only.name, usage_only.start_time) == (whole.name, whole.start_time)
    assert not usage_only.HasField("end_time")


async def test_a_mask_with_a_path_that_is_no_summary_field_is_invalid(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    tenant = await _tenant_with_usage(usage)
    for paths in (("meter_aggregates", "quantity"), ("meter_aggregates", "aggregates.quantity")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await usage.GetUsageSummary(_request(tenant, *paths))
        assert raised.value.code() == Code.INVALID_ARGUMENT
        assert list(field_violations(raised.value)) == ["read_mask.paths[1]"]
        assert error_info(raised.value).reason == "FIELD_INVALID"  # type: ignore[union-attr]


async def test_meters_left_out_by_the_mask_are_still_checked(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    tenant = await _tenant_with_usage(usage)
    request = _request(tenant, "aggregates")
    request.meters.append("meters/no-such-meter")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.GetUsageSummary(request)
    assert raised.value.code() == Code.NOT_FOUND


async def test_streamed_summaries_honour_the_mask_per_summary(
    usage: usage_service_pb2_grpc.UsageServiceStub,
) -> None:
    tenants = sorted([await _tenant_with_usage(usage), await _tenant_with_usage(usage)])
    streamed = usage.StreamUsageSummaries(
        usage_service_pb2.StreamUsageSummariesRequest(
            tenant_ids=tenants,
            start_time=ts(hour_start(-1)),
            end_time=ts(hour_start(1)),
            meters=[METER],
            read_mask=FieldMask(paths=["tenant_id", "meter_aggregates"]),
        )
    )
    got = [
        (r.summary.tenant_id, len(r.summary.aggregates), [a.value for a in r.summary.meter_aggregates])
        async for r in streamed
    ]
    assert got == [(tenants[0], 0, ["5.5"]), (tenants[1], 0, ["5.5"])]
