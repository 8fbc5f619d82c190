"""BillingService: protobuf in and out around server.billing."""

from __future__ import annotations

import grpc

from server.api.calls import rpc
from server.api.convert import audit_event_message, invoice_message, optional_micros, rate_message
from server.auth.authenticator import Authenticator
from server.billing import Billing
from server.domain.access import BILLING_ADMIN, BILLING_READ, Caller
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc


class BillingApi(billing_service_pb2_grpc.BillingServiceServicer):
    def __init__(self, billing: Billing, authenticator: Authenticator) -> None:
        self._billing = billing
        self.authenticator = authenticator

    @rpc(BILLING_READ)
    async def ListRates(
        self, request: billing_service_pb2.ListRatesRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> billing_service_pb2.ListRatesResponse:
        page = await self._billing.list_rates(
            optional_micros(request, "as_of_time"),
            request.show_history,
            request.page_size,
            request.page_token,
        )
        return billing_service_pb2.ListRatesResponse(
            rates=[rate_message(rate) for rate in page.items], next_page_token=page.next_page_token
        )

    @rpc(BILLING_ADMIN)
    async def SetRate(
        self, request: billing_service_pb2.SetRateRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> billing_service_pb2.SetRateResponse:
        rate = await self._billing.set_rate(
            request.service,
            request.usage_type,
            request.unit_price,
            request.currency_code,
            optional_micros(request, "effective_time"),
            caller,
            reprice_past_usage=request.reprice_past_usage,
        )
        return billing_service_pb2.SetRateResponse(rate=rate_message(rate))

    @rpc(BILLING_ADMIN, tenant=lambda request: request.tenant_id)
    async def GenerateInvoice(
        self,
        request: billing_service_pb2.GenerateInvoiceRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.GenerateInvoiceResponse:
        invoice, created = await self._billing.generate_invoice(
            request.tenant_id,
            optional_micros(request, "period_start"),
            optional_micros(request, "period_end"),
            caller,
        )
        return billing_service_pb2.GenerateInvoiceResponse(invoice=invoice_message(invoice), created=created)

    @rpc(BILLING_READ)
    async def GetInvoice(
        self,
        request: billing_service_pb2.GetInvoiceRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.GetInvoiceResponse:
        invoice = await self._billing.get_invoice(request.invoice_id, caller.principal)
        return billing_service_pb2.GetInvoiceResponse(invoice=invoice_message(invoice))

    @rpc(BILLING_READ, tenant=lambda request: request.tenant_id)
    async def ListInvoices(
        self,
        request: billing_service_pb2.ListInvoicesRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.ListInvoicesResponse:
        page = await self._billing.list_invoices(
            request.tenant_id, request.page_size, request.page_token, caller.principal
        )
        return billing_service_pb2.ListInvoicesResponse(
            invoices=[invoice_message(i) for i in page.items], next_page_token=page.next_page_token
        )

    @rpc(BILLING_ADMIN, tenant=lambda request: request.tenant_id)
    async def ListAuditEvents(
        self,
        request: billing_service_pb2.ListAuditEventsRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.ListAuditEventsResponse:
        page = await self._billing.list_audit_events(
            request.tenant_id,
            optional_micros(request, "start_time"),
            optional_micros(request, "end_time"),
            request.page_size,
            request.page_token,
            caller.principal,
        )
        return billing_service_pb2.ListAuditEventsResponse(
            audit_events=[audit_event_message(e) for e in page.items], next_page_token=page.next_page_token
        )
