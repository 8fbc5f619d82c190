"""BillingService: protobuf in and out around server.billing, resource names and request ids."""

from __future__ import annotations

import grpc

from server.api.calls import rpc
from server.api.convert import (
    audit_event_message,
    invoice_message,
    optional_micros,
    rate_message,
    tenant_in,
)
from server.api.request_ids import once, response
from server.auth.authenticator import Authenticator
from server.billing import Billing
from server.domain.access import BILLING_ADMIN, BILLING_READ, Caller
from server.domain.models import Invoice, Rate
from server.domain.names import parse_invoice_name, parse_tenant_name
from server.telemetry.calls import CallTelemetry
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc

_METHODS = billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].methods_by_name
# The method part of request ids' keys (AIP-155), e.g. "tally.v1.BillingService.SetRate".
_SET_RATE = _METHODS["SetRate"].full_name
_GENERATE_INVOICE = _METHODS["GenerateInvoice"].full_name


class BillingApi(billing_service_pb2_grpc.BillingServiceServicer):
    def __init__(self, billing: Billing, authenticator: Authenticator, telemetry: CallTelemetry) -> None:
        self._billing = billing
        self.authenticator = authenticator
        self.telemetry = telemetry

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
        def respond(rate: Rate) -> billing_service_pb2.SetRateResponse:
            return billing_service_pb2.SetRateResponse(rate=rate_message(rate))

        result = await self._billing.set_rate(
            request.service,
            request.usage_type,
            request.unit_price,
            request.currency_code,
            optional_micros(request, "effective_time"),
            caller,
            once(request, _SET_RATE, caller, respond),
            reprice_past_usage=request.reprice_past_usage,
        )
        return response(result, respond, billing_service_pb2.SetRateResponse)

    @rpc(BILLING_ADMIN, tenant=lambda request: tenant_in(request.parent, parse_tenant_name))
    async def GenerateInvoice(
        self,
        request: billing_service_pb2.GenerateInvoiceRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.GenerateInvoiceResponse:
        def respond(result: tuple[Invoice, bool]) -> billing_service_pb2.GenerateInvoiceResponse:
            invoice, created = result
            return billing_service_pb2.GenerateInvoiceResponse(
                invoice=invoice_message(invoice), created=created
            )

        result = await self._billing.generate_invoice(
            parse_tenant_name(request.parent),
            optional_micros(request, "period_start_time"),
            optional_micros(request, "period_end_time"),
            caller,
            once(request, _GENERATE_INVOICE, caller, respond),
        )
        return response(result, respond, billing_service_pb2.GenerateInvoiceResponse)

    @rpc(
        BILLING_READ, tenant=lambda request: tenant_in(request.name, lambda name: parse_invoice_name(name)[0])
    )
    async def GetInvoice(
        self,
        request: billing_service_pb2.GetInvoiceRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.GetInvoiceResponse:
        tenant_id, invoice_id = parse_invoice_name(request.name)
        invoice = await self._billing.get_invoice(tenant_id, invoice_id, caller.principal)
        return billing_service_pb2.GetInvoiceResponse(invoice=invoice_message(invoice))

    @rpc(BILLING_READ, tenant=lambda request: tenant_in(request.parent, parse_tenant_name))
    async def ListInvoices(
        self,
        request: billing_service_pb2.ListInvoicesRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.ListInvoicesResponse:
        page = await self._billing.list_invoices(
            parse_tenant_name(request.parent), request.page_size, request.page_token, caller.principal
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
