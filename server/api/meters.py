"""MeterService: protobuf in and out around server.metering.meters, with request ids."""

from __future__ import annotations

import grpc

from server.api.calls import rpc
from server.api.convert import meter_message, meter_spec
from server.api.request_ids import once, response
from server.auth.authenticator import Authenticator
from server.domain.access import METERS_ADMIN, USAGE_READ, Caller
from server.domain.errors import InvalidArgument
from server.domain.meters import Meter
from server.metering.meters import MeterCatalog
from server.telemetry.calls import CallTelemetry
from tally.v1 import meter_service_pb2, meter_service_pb2_grpc

_METHODS = meter_service_pb2.DESCRIPTOR.services_by_name["MeterService"].methods_by_name
_CREATE_METER = _METHODS["CreateMeter"].full_name
_ARCHIVE_METER = _METHODS["ArchiveMeter"].full_name


class MeterApi(meter_service_pb2_grpc.MeterServiceServicer):
    """The MeterService servicer: create, read, list and archive meters (server.metering.meters).

    The contract, scopes and errors are documented in protos/tally/v1/meter_service.proto.
    """

    def __init__(self, meters: MeterCatalog, authenticator: Authenticator, telemetry: CallTelemetry) -> None:
        self._meters = meters
        self.authenticator = authenticator
        self.telemetry = telemetry

    @rpc(METERS_ADMIN)
    async def CreateMeter(
        self,
        request: meter_service_pb2.CreateMeterRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> meter_service_pb2.CreateMeterResponse:
        """Define a meter; its id is never reused, even once archived (ALREADY_EXISTS)."""

        def respond(meter: Meter) -> meter_service_pb2.CreateMeterResponse:
            return meter_service_pb2.CreateMeterResponse(meter=meter_message(meter))

        if not request.HasField("meter"):
            raise InvalidArgument.single("meter", "is required")
        keyed = once(request, _CREATE_METER, caller, respond)
        result = await self._meters.create(meter_spec(request.meter), caller, keyed)
        return response(result, respond, meter_service_pb2.CreateMeterResponse)

    @rpc(USAGE_READ)
    async def GetMeter(
        self, request: meter_service_pb2.GetMeterRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> meter_service_pb2.GetMeterResponse:
        """One meter by name; NOT_FOUND if there is none."""
        return meter_service_pb2.GetMeterResponse(meter=meter_message(await self._meters.get(request.name)))

    @rpc(USAGE_READ)
    async def ListMeters(
        self, request: meter_service_pb2.ListMetersRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> meter_service_pb2.ListMetersResponse:
        """The meters, active and archived, in meter_id order; one page."""
        page = await self._meters.list(request.page_size, request.page_token)
        return meter_service_pb2.ListMetersResponse(
            meters=[meter_message(m) for m in page.meters], next_page_token=page.next_page_token
        )

    @rpc(METERS_ADMIN)
    async def ArchiveMeter(
        self,
        request: meter_service_pb2.ArchiveMeterRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> meter_service_pb2.ArchiveMeterResponse:
        """Stop a meter counting new events; archiving it again returns it unchanged."""

        def respond(meter: Meter) -> meter_service_pb2.ArchiveMeterResponse:
            return meter_service_pb2.ArchiveMeterResponse(meter=meter_message(meter))

        keyed = once(request, _ARCHIVE_METER, caller, respond)
        result = await self._meters.archive(request.name, caller, keyed)
        return response(result, respond, meter_service_pb2.ArchiveMeterResponse)
