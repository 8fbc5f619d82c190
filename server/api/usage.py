"""UsageService: protobuf in and out around server.metering."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from server.api.convert import bucket_name, optional_micros, raw_event, summary_message
from server.api.errors import rpc
from server.domain.events import Rejection
from server.metering import Metering
from tally.v1 import resources_pb2, usage_service_pb2, usage_service_pb2_grpc

MAX_LISTED_REJECTIONS = 1_000


def _rejection(rejection: Rejection, batch_index: int) -> resources_pb2.EventRejection:
    return resources_pb2.EventRejection(
        event_index=rejection.index,
        batch_index=batch_index,
        event_id=rejection.event_id,
        field=rejection.field,
        reason=rejection.reason,
    )


class UsageApi(usage_service_pb2_grpc.UsageServiceServicer):
    def __init__(self, metering: Metering) -> None:
        self._metering = metering

    @rpc
    async def ReportUsage(
        self, request: usage_service_pb2.ReportUsageRequest, context: grpc.aio.ServicerContext
    ) -> usage_service_pb2.ReportUsageResponse:
        recorded = await self._metering.report(raw_event(request.event))
        return usage_service_pb2.ReportUsageResponse(
            tenant_id=request.event.tenant_id,
            event_id=request.event.event_id,
            outcome=usage_service_pb2.REPORT_OUTCOME_RECORDED
            if recorded
            else usage_service_pb2.REPORT_OUTCOME_DUPLICATE,
        )

    @rpc
    async def IngestUsage(
        self,
        request_iterator: AsyncIterator[usage_service_pb2.IngestUsageRequest],
        context: grpc.aio.ServicerContext,
    ) -> usage_service_pb2.IngestUsageResponse:
        response = usage_service_pb2.IngestUsageResponse()
        async for request in request_iterator:
            outcome = await self._metering.record_batch([raw_event(e) for e in request.events])
            response.accepted_count += outcome.accepted
            response.duplicate_count += outcome.duplicates
            response.rejected_count += len(outcome.rejections)
            room = MAX_LISTED_REJECTIONS - len(response.rejections)
            response.rejections.extend(_rejection(r, response.batch_count) for r in outcome.rejections[:room])
            response.batch_count += 1
        response.rejections_truncated = response.rejected_count > len(response.rejections)
        return response

    @rpc
    async def StreamUsage(
        self,
        request_iterator: AsyncIterator[usage_service_pb2.StreamUsageRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[usage_service_pb2.StreamUsageResponse]:
        async for request in request_iterator:
            outcome = await self._metering.record_batch([raw_event(e) for e in request.events])
            yield usage_service_pb2.StreamUsageResponse(
                sequence=request.sequence,
                accepted_count=outcome.accepted,
                duplicate_count=outcome.duplicates,
                rejected_count=len(outcome.rejections),
                rejections=[_rejection(r, 0) for r in outcome.rejections],
            )

    @rpc
    async def GetUsageSummary(
        self, request: usage_service_pb2.GetUsageSummaryRequest, context: grpc.aio.ServicerContext
    ) -> usage_service_pb2.GetUsageSummaryResponse:
        summary = await self._metering.summary(
            request.tenant_id,
            optional_micros(request, "start_time"),
            optional_micros(request, "end_time"),
            bucket_name(request.bucket),
            request.group_by_dimension,
        )
        return usage_service_pb2.GetUsageSummaryResponse(summary=summary_message(summary))

    @rpc
    async def StreamUsageSummaries(
        self, request: usage_service_pb2.StreamUsageSummariesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[usage_service_pb2.StreamUsageSummariesResponse]:
        summaries = self._metering.summaries(
            list(request.tenant_ids),
            optional_micros(request, "start_time"),
            optional_micros(request, "end_time"),
            bucket_name(request.bucket),
            request.group_by_dimension,
        )
        async for summary in summaries:
            yield usage_service_pb2.StreamUsageSummariesResponse(summary=summary_message(summary))
