"""PaymentService: a tenant's collection status, as server.payments keeps it."""

from __future__ import annotations

import grpc

from server.api.calls import rpc
from server.api.convert import tenant_in, to_timestamp
from server.auth.authenticator import Authenticator
from server.domain.access import BILLING_READ, Caller
from server.domain.names import collection_status_name, invoice_name, parse_collection_status_name
from server.payments.ledger import CollectionStatus, PaymentLedger
from server.payments.states import CollectionState
from server.telemetry.calls import CallTelemetry
from tally.v1 import payment_service_pb2, payment_service_pb2_grpc

_Status = payment_service_pb2.CollectionStatus
_STATES = {
    CollectionState.GOOD_STANDING: _Status.STATE_GOOD_STANDING,
    CollectionState.PAST_DUE: _Status.STATE_PAST_DUE,
    CollectionState.DELINQUENT: _Status.STATE_DELINQUENT,
}


def collection_status_message(status: CollectionStatus) -> payment_service_pb2.CollectionStatus:
    """The proto of a tenant's collection status."""
    message = _Status(
        name=collection_status_name(status.tenant_id),
        state=_STATES[status.state],
        past_due_invoices=[invoice_name(status.tenant_id, i) for i in status.past_due_invoices],
        uncollectible_invoices=[invoice_name(status.tenant_id, i) for i in status.uncollectible_invoices],
    )
    if status.update_time is not None:
        message.update_time.CopyFrom(to_timestamp(status.update_time))
    return message


class PaymentApi(payment_service_pb2_grpc.PaymentServiceServicer):
    """PaymentService: converts and maps errors; the use cases are server.payments.ledger."""

    def __init__(self, ledger: PaymentLedger, authenticator: Authenticator, telemetry: CallTelemetry) -> None:
        self._ledger = ledger
        self.authenticator = authenticator
        self.telemetry = telemetry

    @rpc(BILLING_READ, tenant=lambda request: tenant_in(request.name, parse_collection_status_name))
    async def GetCollectionStatus(
        self,
        request: payment_service_pb2.GetCollectionStatusRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> payment_service_pb2.GetCollectionStatusResponse:
        """A tenant's standing (good standing, past due, delinquent) and the invoices behind it."""
        status = await self._ledger.collection_status(
            parse_collection_status_name(request.name), caller.principal
        )
        return payment_service_pb2.GetCollectionStatusResponse(
            collection_status=collection_status_message(status)
        )
