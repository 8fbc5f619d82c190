"""UsageService: protobuf in and out around server.metering (which owns the use cases), errors mapped."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from server.api.calls import rpc
from server.api.convert import (
    masked_summary_message,
    raw_event,
    summary_fields,
    summary_query,
    tenant_in,
    to_timestamp,
)
from server.api.request_ids import once, response
from server.auth.authenticator import Authenticator
from server.domain.access import BILLING_ADMIN, USAGE_READ, USAGE_WRITE, Caller
from server.domain.events import CancelledEvent, RawEvent, Rejection, RejectionCause
from server.domain.names import parse_usage_summary_name
from server.metering import BatchOutcome, Metering
from server.metering.corrections import Corrections
from server.telemetry.calls import CallTelemetry
from tally.v1 import resources_pb2, usage_service_pb2, usage_service_pb2_grpc

MAX_LISTED_REJECTIONS = 1_000
_CANCEL_EVENT = (
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].methods_by_name["CancelEvent"].full_name
)

# A request carrying a batch: IngestUsageRequest or StreamUsageRequest.
R = TypeVar("R", usage_service_pb2.IngestUsageRequest, usage_service_pb2.StreamUsageRequest)

_CAUSES = {
    RejectionCause.INVALID: resources_pb2.REJECTION_CAUSE_INVALID,
    RejectionCause.PERMISSION_DENIED: resources_pb2.REJECTION_CAUSE_PERMISSION_DENIED,
}


def _rejection(rejection: Rejection, batch_index: int) -> resources_pb2.EventRejection:
    return resources_pb2.EventRejection(
        event_index=rejection.index,
        batch_index=batch_index,
        event_id=rejection.event_id,
        field=rejection.field,
        reason=rejection.reason,
        cause=_CAUSES[rejection.cause],
    )


@dataclass(frozen=True, slots=True)
class _Batch:
    """A request's batch for Metering (an IncomingBatch): its events are decoded only when asked."""

    request: usage_service_pb2.IngestUsageRequest | usage_service_pb2.StreamUsageRequest

    @property
    def size(self) -> int:
        return len(self.request.events)

    @property
    def backfill(self) -> bool:
        return self.request.backfill

    def events(self) -> list[RawEvent]:
        return [raw_event(e) for e in self.request.events]


class UsageApi(usage_service_pb2_grpc.UsageServiceServicer):
    """The UsageService servicer: ingestion, summaries and cancellations.

    Converts protos and hands each use case to server.metering (`metering`) or to the
    corrections (`corrections`); the contract, scopes and errors are documented in
    protos/tally/v1/usage_service.proto.
    """

    def __init__(
        self,
        metering: Metering,
        authenticator: Authenticator,
        telemetry: CallTelemetry,
        corrections: Corrections,
    ) -> None:
        self._metering = metering
        self._corrections = corrections
        self.authenticator = authenticator
        self.telemetry = telemetry

    def _record_stream(
        self, caller: Caller, requests: AsyncIterator[R]
    ) -> AsyncGenerator[tuple[R, BatchOutcome], None]:
        """Each request's batch recorded, in order (see Metering.record_stream)."""
        return self._metering.record_stream(caller, requests, _Batch)

    @rpc(USAGE_WRITE, tenant=lambda request: request.event.tenant_id)
    async def ReportUsage(
        self, request: usage_service_pb2.ReportUsageRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> usage_service_pb2.ReportUsageResponse:
        """Record one event; the answer says whether it was recorded or a duplicate."""
        recorded = await self._metering.report(raw_event(request.event), caller.principal)
        return usage_service_pb2.ReportUsageResponse(
            tenant_id=request.event.tenant_id,
            event_id=request.event.event_id,
            outcome=usage_service_pb2.REPORT_OUTCOME_RECORDED
            if recorded
            else usage_service_pb2.REPORT_OUTCOME_DUPLICATE,
        )

    @rpc(USAGE_WRITE)
    async def IngestUsage(
        self,
        request_iterator: AsyncIterator[usage_service_pb2.IngestUsageRequest],
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> usage_service_pb2.IngestUsageResponse:
        """Bulk ingestion: record each batch as it arrives; one answer with the stream's counts."""
        response = usage_service_pb2.IngestUsageResponse()
        async with contextlib.aclosing(self._record_stream(caller, request_iterator)) as batches:
            async for _, outcome in batches:
                response.accepted_count += outcome.accepted
                response.duplicate_count += outcome.duplicates
                response.rejected_count += len(outcome.rejections)
                room = MAX_LISTED_REJECTIONS - len(response.rejections)
                response.rejections.extend(
                    _rejection(r, response.batch_count) for r in outcome.rejections[:room]
                )
                response.batch_count += 1
        response.rejections_truncated = response.rejected_count > len(response.rejections)
        return response

    @rpc(USAGE_WRITE)
    async def StreamUsage(
        self,
        request_iterator: AsyncIterator[usage_service_pb2.StreamUsageRequest],
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> AsyncIterator[usage_service_pb2.StreamUsageResponse]:
        """Record each batch and acknowledge it, in order, once it is committed."""
        # Closed however the handler ends: cancelled while it sends an acknowledgement, it
        # is not inside the pipeline, and only closing it stops the pipeline's tasks.
        async with contextlib.aclosing(self._record_stream(caller, request_iterator)) as batches:
            async for request, outcome in batches:
                yield usage_service_pb2.StreamUsageResponse(
                    sequence=request.sequence,
                    accepted_count=outcome.accepted,
                    duplicate_count=outcome.duplicates,
                    rejected_count=len(outcome.rejections),
                    rejections=[_rejection(r, 0) for r in outcome.rejections],
                )

    @rpc(USAGE_READ, tenant=lambda request: tenant_in(request.name, parse_usage_summary_name))
    async def GetUsageSummary(
        self,
        request: usage_service_pb2.GetUsageSummaryRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> usage_service_pb2.GetUsageSummaryResponse:
        """One tenant's usage over a time range, and the values of the meters asked for."""
        mask = summary_fields(request.read_mask)
        summary = await self._metering.summary(
            parse_usage_summary_name(request.name), summary_query(request, mask), caller.principal
        )
        return usage_service_pb2.GetUsageSummaryResponse(summary=masked_summary_message(summary, mask))

    @rpc(USAGE_READ)
    async def StreamUsageSummaries(
        self,
        request: usage_service_pb2.StreamUsageSummariesRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> AsyncIterator[usage_service_pb2.StreamUsageSummariesResponse]:
        """One summary per tenant, in tenant_id order.

        For the listed tenants, or else for every tenant with usage that the token covers.
        """
        mask = summary_fields(request.read_mask)
        summaries = self._metering.summaries(
            list(request.tenant_ids), summary_query(request, mask), caller.principal
        )
        async for summary in summaries:
            yield usage_service_pb2.StreamUsageSummariesResponse(
                summary=masked_summary_message(summary, mask)
            )

    @rpc(BILLING_ADMIN, tenant=lambda request: request.tenant_id)
    async def CancelEvent(
        self, request: usage_service_pb2.CancelEventRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> usage_service_pb2.CancelEventResponse:
        """Cancel a recorded event; cancelling it again answers the first cancellation."""

        def respond(event: CancelledEvent) -> usage_service_pb2.CancelEventResponse:
            return usage_service_pb2.CancelEventResponse(
                tenant_id=event.tenant_id,
                event_id=event.event_id,
                cancel_time=to_timestamp(event.cancel_time),
            )

        keyed = once(request, _CANCEL_EVENT, caller, respond)
        result = await self._corrections.cancel(request.tenant_id, request.event_id, caller, keyed)
        return response(result, respond, usage_service_pb2.CancelEventResponse)
