"""BillingService: protobuf in and out around server.billing's use cases, resource names and request ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from server.api.calls import rpc
from server.api.convert import (
    audit_event_message,
    credit_note_message,
    invoice_message,
    optional_micros,
    rate_change,
    rate_message,
    tenant_in,
)
from server.api.plan_convert import charges_in, overrides_in, plan_message, profile_message
from server.api.request_ids import once, response
from server.auth.authenticator import Authenticator
from server.billing import Billing
from server.billing.lifecycle import Lifecycle
from server.billing.periods import Periods
from server.billing.plans import Plans, ProfileInput
from server.domain.access import BILLING_ADMIN, BILLING_READ, Caller
from server.domain.models import CreditNote, Invoice, InvoiceStatus, Rate
from server.domain.names import (
    parse_billing_profile_name,
    parse_invoice_name,
    parse_plan_name,
    parse_tenant_name,
)
from server.domain.plans import BillingProfile, Plan
from server.telemetry.calls import CallTelemetry
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc

M = TypeVar("M", bound=Message)

_METHODS = billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].methods_by_name
# The method part of request ids' keys (AIP-155), e.g. "tally.v1.BillingService.SetRate".
_SET_RATE = _METHODS["SetRate"].full_name
_GENERATE_INVOICE = _METHODS["GenerateInvoice"].full_name


def _method(name: str) -> str:
    return str(_METHODS[name].full_name)


def _invoice_tenant(request: object) -> str:
    return tenant_in(getattr(request, "name"), lambda name: parse_invoice_name(name)[0])  # noqa: B009


def _invoice_response(response_type: type[M]) -> Callable[[Invoice], M]:
    return lambda invoice: response_type(invoice=invoice_message(invoice))


class BillingApi(billing_service_pb2_grpc.BillingServiceServicer):
    def __init__(
        self,
        billing: Billing,
        lifecycle: Lifecycle,
        plans: Plans,
        periods: Periods,
        authenticator: Authenticator,
        telemetry: CallTelemetry,
    ) -> None:
        self._billing = billing
        self._lifecycle = lifecycle
        self._plans = plans
        self._periods = periods
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
            rate_change(request), caller, once(request, _SET_RATE, caller, respond)
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

    # --- invoice lifecycle ---------------------------------------------------------

    async def _move(
        self, request: Message, caller: Caller, target: InvoiceStatus, method: str, response_type: type[M]
    ) -> M:
        respond = _invoice_response(response_type)
        tenant_id, invoice_id = parse_invoice_name(getattr(request, "name"))  # noqa: B009
        if target is InvoiceStatus.FINALIZED:
            result = await self._lifecycle.finalize(
                tenant_id, invoice_id, caller, once(request, _method(method), caller, respond)
            )
        else:
            result = await self._lifecycle.move(
                tenant_id, invoice_id, target, caller, once(request, _method(method), caller, respond)
            )
        return response(result, respond, response_type)

    @rpc(BILLING_ADMIN, tenant=_invoice_tenant)
    async def FinalizeInvoice(
        self,
        request: billing_service_pb2.FinalizeInvoiceRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.FinalizeInvoiceResponse:
        return await self._move(
            request,
            caller,
            InvoiceStatus.FINALIZED,
            "FinalizeInvoice",
            billing_service_pb2.FinalizeInvoiceResponse,
        )

    @rpc(BILLING_ADMIN, tenant=_invoice_tenant)
    async def VoidInvoice(
        self,
        request: billing_service_pb2.VoidInvoiceRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.VoidInvoiceResponse:
        return await self._move(
            request, caller, InvoiceStatus.VOID, "VoidInvoice", billing_service_pb2.VoidInvoiceResponse
        )

    @rpc(BILLING_ADMIN, tenant=_invoice_tenant)
    async def MarkInvoicePaid(
        self,
        request: billing_service_pb2.MarkInvoicePaidRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.MarkInvoicePaidResponse:
        return await self._move(
            request,
            caller,
            InvoiceStatus.PAID,
            "MarkInvoicePaid",
            billing_service_pb2.MarkInvoicePaidResponse,
        )

    @rpc(BILLING_ADMIN, tenant=_invoice_tenant)
    async def MarkInvoiceUncollectible(
        self,
        request: billing_service_pb2.MarkInvoiceUncollectibleRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.MarkInvoiceUncollectibleResponse:
        return await self._move(
            request,
            caller,
            InvoiceStatus.UNCOLLECTIBLE,
            "MarkInvoiceUncollectible",
            billing_service_pb2.MarkInvoiceUncollectibleResponse,
        )

    @rpc(BILLING_ADMIN, tenant=lambda request: tenant_in(request.invoice, lambda n: parse_invoice_name(n)[0]))
    async def CreateCreditNote(
        self,
        request: billing_service_pb2.CreateCreditNoteRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.CreateCreditNoteResponse:
        def respond(note: CreditNote) -> billing_service_pb2.CreateCreditNoteResponse:
            return billing_service_pb2.CreateCreditNoteResponse(credit_note=credit_note_message(note))

        tenant_id, invoice_id = parse_invoice_name(request.invoice, "invoice")
        result = await self._lifecycle.create_credit_note(
            tenant_id,
            invoice_id,
            request.amount,
            request.reason,
            caller,
            once(request, _method("CreateCreditNote"), caller, respond),
        )
        return response(result, respond, billing_service_pb2.CreateCreditNoteResponse)

    @rpc(BILLING_READ, tenant=lambda request: tenant_in(request.parent, parse_tenant_name))
    async def ListCreditNotes(
        self,
        request: billing_service_pb2.ListCreditNotesRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.ListCreditNotesResponse:
        page = await self._lifecycle.list_credit_notes(
            parse_tenant_name(request.parent), request.page_size, request.page_token, caller.principal
        )
        return billing_service_pb2.ListCreditNotesResponse(
            credit_notes=[credit_note_message(n) for n in page.items], next_page_token=page.next_page_token
        )

    # --- plans and profiles --------------------------------------------------------

    @rpc(BILLING_ADMIN)
    async def CreatePlan(
        self,
        request: billing_service_pb2.CreatePlanRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.CreatePlanResponse:
        def respond(plan: Plan) -> billing_service_pb2.CreatePlanResponse:
            return billing_service_pb2.CreatePlanResponse(plan=plan_message(plan))

        caller.principal.require_all_tenants("creating a plan")
        result = await self._plans.create_plan(
            request.plan_id,
            request.display_name,
            request.currency_code,
            charges_in(request.charges),
            request.minimum_amount,
            optional_micros(request, "effective_time"),
            caller,
            once(request, _method("CreatePlan"), caller, respond),
        )
        return response(result, respond, billing_service_pb2.CreatePlanResponse)

    @rpc(BILLING_READ)
    async def GetPlan(
        self, request: billing_service_pb2.GetPlanRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> billing_service_pb2.GetPlanResponse:
        plan = await self._plans.get_plan(parse_plan_name(request.name))
        return billing_service_pb2.GetPlanResponse(plan=plan_message(plan))

    @rpc(BILLING_READ)
    async def ListPlans(
        self, request: billing_service_pb2.ListPlansRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> billing_service_pb2.ListPlansResponse:
        page = await self._plans.list_plans(request.page_size, request.page_token)
        return billing_service_pb2.ListPlansResponse(
            plans=[plan_message(p) for p in page.items], next_page_token=page.next_page_token
        )

    @rpc(BILLING_ADMIN)
    async def CreatePlanVersion(
        self,
        request: billing_service_pb2.CreatePlanVersionRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.CreatePlanVersionResponse:
        def respond(plan: Plan) -> billing_service_pb2.CreatePlanVersionResponse:
            return billing_service_pb2.CreatePlanVersionResponse(plan=plan_message(plan))

        caller.principal.require_all_tenants("changing a plan")
        result = await self._plans.create_version(
            parse_plan_name(request.parent, "parent"),
            charges_in(request.charges),
            request.minimum_amount,
            optional_micros(request, "effective_time"),
            caller,
            once(request, _method("CreatePlanVersion"), caller, respond),
        )
        return response(result, respond, billing_service_pb2.CreatePlanVersionResponse)

    @rpc(
        BILLING_ADMIN,
        tenant=lambda request: tenant_in(request.billing_profile.name, parse_billing_profile_name),
    )
    async def SetBillingProfile(
        self,
        request: billing_service_pb2.SetBillingProfileRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.SetBillingProfileResponse:
        def respond(profile: BillingProfile) -> billing_service_pb2.SetBillingProfileResponse:
            return billing_service_pb2.SetBillingProfileResponse(billing_profile=profile_message(profile))

        given = request.billing_profile
        tenant_id = parse_billing_profile_name(given.name, "billing_profile.name")
        caller.principal.require_tenant(tenant_id)
        result = await self._plans.set_profile(
            ProfileInput(
                tenant_id=tenant_id,
                display_name=given.display_name,
                email=given.email,
                currency=given.currency_code,
                plan_id=parse_plan_name(given.plan, "billing_profile.plan") if given.plan else "",
                plan_effective_micros=optional_micros(given, "plan_effective_time"),
                anchor_day=given.billing_anchor_day,
                billing_start_micros=optional_micros(given, "billing_start_time"),
                tax_percentage=given.tax_percentage,
                spend_threshold=given.spend_threshold,
                overrides=overrides_in(given.price_overrides),
            ),
            caller,
            once(request, _method("SetBillingProfile"), caller, respond),
        )
        return response(result, respond, billing_service_pb2.SetBillingProfileResponse)

    @rpc(BILLING_READ, tenant=lambda request: tenant_in(request.name, parse_billing_profile_name))
    async def GetBillingProfile(
        self,
        request: billing_service_pb2.GetBillingProfileRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.GetBillingProfileResponse:
        profile = await self._plans.get_profile(parse_billing_profile_name(request.name), caller.principal)
        return billing_service_pb2.GetBillingProfileResponse(billing_profile=profile_message(profile))

    # --- periods -------------------------------------------------------------------

    @rpc(BILLING_READ, tenant=lambda request: tenant_in(request.parent, parse_tenant_name))
    async def PreviewInvoice(
        self,
        request: billing_service_pb2.PreviewInvoiceRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.PreviewInvoiceResponse:
        invoice = await self._periods.preview(parse_tenant_name(request.parent), caller.principal)
        return billing_service_pb2.PreviewInvoiceResponse(invoice=invoice_message(invoice))

    @rpc(BILLING_ADMIN, tenant=lambda request: tenant_in(request.parent, parse_tenant_name))
    async def ClosePeriod(
        self,
        request: billing_service_pb2.ClosePeriodRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> billing_service_pb2.ClosePeriodResponse:
        respond = _invoice_response(billing_service_pb2.ClosePeriodResponse)
        result = await self._periods.close_period(
            parse_tenant_name(request.parent), caller, once(request, _method("ClosePeriod"), caller, respond)
        )
        return response(result, respond, billing_service_pb2.ClosePeriodResponse)
