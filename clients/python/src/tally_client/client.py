"""The blocking client: every Tally RPC as a typed method, plus a thread-backed batching ingester.

The same calls as tally_client.aio.AsyncTallyClient, for code without an event loop
(scripts, web handlers, the CLI). Each call carries the bearer token and a fresh
x-request-id, has a deadline, is retried with backoff on passing failures, and fails
with a typed TallyError.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    meter_service_pb2,
    meter_service_pb2_grpc,
    notification_service_pb2,
    notification_service_pb2_grpc,
    payment_service_pb2,
    payment_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tally_client import convert, convert_payments, convert_pricing
from tally_client.auth import TokenSource
from tally_client.connection import DEFAULT_TIMEOUT_SECONDS, Connection, Metadata, new_request_id
from tally_client.errors import UnauthenticatedError, from_rpc_error
from tally_client.ingester import STREAM_RETRY
from tally_client.models import (
    AuditEvent,
    CancelledEvent,
    CollectionStatus,
    CreditNote,
    GeneratedInvoice,
    IngestResult,
    Invoice,
    Meter,
    Quantity,
    Rate,
    ReportResult,
    TimeBucket,
    UsageEvent,
    UsageSummary,
    WebhookDelivery,
    WebhookSubscription,
)
from tally_client.names import (
    billing_profile_name,
    collection_status_name,
    invoice_name,
    meter_name,
    plan_name,
    tenant_name,
    webhook_subscription_name,
)
from tally_client.pricing import BillingProfile, Charge, Plan, PriceOverride
from tally_client.retry import DEFAULT_RETRY, RetryPolicy, is_transient
from tally_client.threaded import Ingester

Response = TypeVar("Response")
Item = TypeVar("Item")


class TallyClient:
    """A connection to one Tally server; close it (or use `with`).

    `target` is "host:port" or a Connection; it and `token` default to TALLY_ADDR and
    TALLY_TOKEN (see Connection.create). `timeout` is each unary call's deadline in
    seconds; `retry` how often passing failures are retried.

        with TallyClient("localhost:50051", token=token) as tally:
            tally.report_usage(UsageEvent("acme", "analytics", "query", Decimal("3")))
    """

    def __init__(
        self,
        target: str | Connection | None = None,
        *,
        token: str | TokenSource | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy = DEFAULT_RETRY,
        options: Sequence[tuple[str, Any]] = (),
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.connection = (
            target
            if isinstance(target, Connection)
            else Connection.create(
                target, token=token, credentials=credentials, timeout=timeout, retry=retry, options=options
            )
        )
        self._channel = self.connection.sync_channel()
        self._usage = usage_service_pb2_grpc.UsageServiceStub(self._channel)
        self._billing = billing_service_pb2_grpc.BillingServiceStub(self._channel)
        self._meters = meter_service_pb2_grpc.MeterServiceStub(self._channel)
        self._payments = payment_service_pb2_grpc.PaymentServiceStub(self._channel)
        self._notifications = notification_service_pb2_grpc.NotificationServiceStub(self._channel)
        self._sleep = sleep
        self._random = random

    def close(self) -> None:
        """Close the channel; calls still in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _metadata(self, request_id: str) -> Metadata:
        source = self.connection.token
        return self.connection.metadata(None if source is None else source.token(), request_id)

    def _call(self, method: Callable[..., Response], request: Any) -> Response:
        policy = self.connection.retry
        attempt = 0
        while True:
            request_id = new_request_id()
            try:
                return method(request, timeout=self.connection.timeout, metadata=self._metadata(request_id))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, request_id=request_id)
                attempt += 1
                if not is_transient(error) or attempt >= policy.max_attempts:
                    raise error from exc
            if isinstance(error, UnauthenticatedError) and self.connection.token is not None:
                self.connection.token.invalidate()
            self._sleep(policy.delay(attempt - 1, error, self._random))

    def _pages(
        self, method: Callable[..., Any], request: Any, items: Callable[[Any], Iterable[Item]]
    ) -> Iterator[Item]:
        """Every item of a List call, fetching the next page (each call retried on its own) as needed."""
        while True:
            response = self._call(method, request)
            yield from items(response)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def _stream(self, call: Any) -> Iterator[Any]:
        """The responses of a server stream, its failure as a TallyError (not retried: output may repeat)."""
        try:
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # -- UsageService -------------------------------------------------------------------

    def report_usage(self, event: UsageEvent) -> ReportResult:
        """Record one event (or learn it was recorded before: outcome DUPLICATE)."""
        request = usage_service_pb2.ReportUsageRequest(event=convert.event_message(event))
        return convert.report_result(self._call(self._usage.ReportUsage, request))

    def ingest_usage(self, batches: Iterable[Sequence[UsageEvent]]) -> IngestResult:
        """Send batches on one IngestUsage stream; counts over the stream. For bulk, prefer `ingester()`."""
        requests = [
            usage_service_pb2.IngestUsageRequest(events=[convert.event_message(e) for e in batch])
            for batch in batches
        ]
        request_id = new_request_id()
        try:
            response = self._usage.IngestUsage(
                iter(requests), timeout=self.connection.timeout, metadata=self._metadata(request_id)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id=request_id) from exc
        return convert.ingest_result(response)

    def get_usage_summary(
        self,
        tenant_id: str,
        start_time: datetime,
        end_time: datetime,
        *,
        bucket: TimeBucket | None = None,
        group_by_dimension: str = "",
        meters: Sequence[str] = (),
        fields: Sequence[str] | None = None,
    ) -> UsageSummary:
        """A tenant's usage over [start_time, end_time) (whole UTC hours), per usage type.

        Also the value of each meter named in `meters` (ids or "meters/{meter}", at most 20).
        `fields` (None: all) names the parts to compute and return, e.g. ["meter_aggregates"]
        for the meters' values alone (the usage types' aggregates are then not read).
        """
        request = convert.summary_request(
            tenant_id, start_time, end_time, bucket, group_by_dimension, meters, fields
        )
        return convert.usage_summary(self._call(self._usage.GetUsageSummary, request).summary)

    def stream_usage_summaries(
        self,
        start_time: datetime,
        end_time: datetime,
        *,
        tenant_ids: Sequence[str] = (),
        bucket: TimeBucket | None = None,
        group_by_dimension: str = "",
        meters: Sequence[str] = (),
        fields: Sequence[str] | None = None,
    ) -> Iterator[UsageSummary]:
        """One summary per tenant (the listed ones, or every tenant with usage), in tenant_id order.

        Each also has the value of each meter named in `meters` (ids or "meters/{meter}", at most 20);
        `fields` as in get_usage_summary.
        """
        request = convert.summaries_request(
            tenant_ids, start_time, end_time, bucket, group_by_dimension, meters, fields
        )
        call = self._usage.StreamUsageSummaries(request, metadata=self._metadata(new_request_id()))
        for response in self._stream(call):
            yield convert.usage_summary(response.summary)

    def cancel_event(self, tenant_id: str, event_id: str, *, request_id: str | None = None) -> CancelledEvent:
        """Cancel a recorded event: it stops counting in summaries, meters and drafts.

        Cancelling it again answers the first cancellation's time; NotFoundError (EVENT_NOT_FOUND)
        if the tenant has no such event. Retries reuse one request_id.
        """
        request = usage_service_pb2.CancelEventRequest(
            tenant_id=tenant_id, event_id=event_id, request_id=request_id or new_request_id()
        )
        return convert.cancelled_event(self._call(self._usage.CancelEvent, request))

    def ingester(
        self,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_buffered_events: int = 50_000,
        max_batches_in_flight: int = 8,
        retry: RetryPolicy = STREAM_RETRY,
    ) -> Ingester:
        """A batching ingester over StreamUsage, run by a background thread (see tally_client.threaded)."""
        return Ingester(
            self.connection,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_buffered_events=max_buffered_events,
            max_batches_in_flight=max_batches_in_flight,
            retry=retry,
        )

    # -- BillingService -----------------------------------------------------------------

    def list_rates(
        self, *, as_of_time: datetime | None = None, show_history: bool = False, page_size: int = 0
    ) -> Iterator[Rate]:
        """The rate card in effect (now or at as_of_time), or every rate ever set; fetches pages as needed."""
        request = convert.list_rates_request(as_of_time, show_history, page_size)
        return self._pages(self._billing.ListRates, request, lambda r: map(convert.rate, r.rates))

    def set_rate(
        self,
        service: str,
        usage_type: str,
        unit_price: Quantity,
        *,
        effective_time: datetime | None = None,
        currency_code: str = "",
        reprice_past_usage: bool = False,
        request_id: str | None = None,
    ) -> Rate:
        """Set a price from effective_time on (default: the next whole hour). Retries reuse one request_id.

        An effective_time in the past needs `reprice_past_usage` (InvalidArgumentError otherwise).
        """
        request = convert.set_rate_request(
            service,
            usage_type,
            unit_price,
            effective_time=effective_time,
            currency_code=currency_code,
            request_id=request_id or new_request_id(),
            reprice_past_usage=reprice_past_usage,
        )
        return convert.rate(self._call(self._billing.SetRate, request).rate)

    def generate_invoice(
        self,
        tenant_id: str,
        period_start_time: datetime,
        period_end_time: datetime,
        *,
        request_id: str | None = None,
    ) -> GeneratedInvoice:
        """The tenant's invoice for the period, created or recomputed. Retries reuse one request_id."""
        request = convert.generate_invoice_request(
            tenant_id, period_start_time, period_end_time, request_id or new_request_id()
        )
        response = self._call(self._billing.GenerateInvoice, request)
        return GeneratedInvoice(convert.invoice(response.invoice), response.created)

    def get_invoice(self, tenant_id: str, invoice_id: str) -> Invoice:
        """One invoice of the tenant; NotFoundError for a missing one or another tenant's."""
        request = billing_service_pb2.GetInvoiceRequest(name=invoice_name(tenant_id, invoice_id))
        return convert.invoice(self._call(self._billing.GetInvoice, request).invoice)

    def list_invoices(self, tenant_id: str, *, page_size: int = 0) -> Iterator[Invoice]:
        """The tenant's invoices, newest period first."""
        request = billing_service_pb2.ListInvoicesRequest(parent=tenant_name(tenant_id), page_size=page_size)
        return self._pages(self._billing.ListInvoices, request, lambda r: map(convert.invoice, r.invoices))

    def list_audit_events(
        self,
        *,
        tenant_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> Iterator[AuditEvent]:
        """The audit trail, oldest first."""
        request = convert.list_audit_events_request(tenant_id, start_time, end_time, page_size)
        return self._pages(
            self._billing.ListAuditEvents, request, lambda r: map(convert.audit_event, r.audit_events)
        )

    # The invoice's life after GenerateInvoice. Each change sends one request_id on every attempt.

    def finalize_invoice(self, tenant_id: str, invoice_id: str, *, request_id: str | None = None) -> Invoice:
        """Freeze a draft and number it; other statuses: FailedPreconditionError (INVOICE_STATUS_INVALID)."""
        request = billing_service_pb2.FinalizeInvoiceRequest(
            name=invoice_name(tenant_id, invoice_id), request_id=request_id or new_request_id()
        )
        return convert.invoice(self._call(self._billing.FinalizeInvoice, request).invoice)

    def void_invoice(self, tenant_id: str, invoice_id: str, *, request_id: str | None = None) -> Invoice:
        """Void a draft, finalized or uncollectible invoice: it bills nothing and frees its period."""
        request = billing_service_pb2.VoidInvoiceRequest(
            name=invoice_name(tenant_id, invoice_id), request_id=request_id or new_request_id()
        )
        return convert.invoice(self._call(self._billing.VoidInvoice, request).invoice)

    def mark_invoice_paid(self, tenant_id: str, invoice_id: str, *, request_id: str | None = None) -> Invoice:
        """Mark a finalized or uncollectible invoice paid."""
        request = billing_service_pb2.MarkInvoicePaidRequest(
            name=invoice_name(tenant_id, invoice_id), request_id=request_id or new_request_id()
        )
        return convert.invoice(self._call(self._billing.MarkInvoicePaid, request).invoice)

    def mark_invoice_uncollectible(
        self, tenant_id: str, invoice_id: str, *, request_id: str | None = None
    ) -> Invoice:
        """Mark a finalized invoice uncollectible (a bad debt; it may still be paid or voided)."""
        request = billing_service_pb2.MarkInvoiceUncollectibleRequest(
            name=invoice_name(tenant_id, invoice_id), request_id=request_id or new_request_id()
        )
        return convert.invoice(self._call(self._billing.MarkInvoiceUncollectible, request).invoice)

    def create_credit_note(
        self,
        tenant_id: str,
        invoice_id: str,
        amount: Quantity,
        reason: str,
        *,
        request_id: str | None = None,
    ) -> CreditNote:
        """Credit part or all of a finalized, paid or uncollectible invoice. Retries reuse one request_id.

        FailedPreconditionError (CREDIT_EXCEEDS_INVOICE) past the invoice's total.
        """
        request = billing_service_pb2.CreateCreditNoteRequest(
            invoice=invoice_name(tenant_id, invoice_id),
            amount=convert.decimal_text(amount, "amount"),
            reason=reason,
            request_id=request_id or new_request_id(),
        )
        return convert.credit_note(self._call(self._billing.CreateCreditNote, request).credit_note)

    def list_credit_notes(self, tenant_id: str, *, page_size: int = 0) -> Iterator[CreditNote]:
        """The tenant's credit notes, oldest first."""
        request = billing_service_pb2.ListCreditNotesRequest(
            parent=tenant_name(tenant_id), page_size=page_size
        )
        return self._pages(
            self._billing.ListCreditNotes, request, lambda r: map(convert.credit_note, r.credit_notes)
        )

    def preview_invoice(self, tenant_id: str) -> Invoice:
        """The tenant's open period priced now, not stored: a draft without name, id or number."""
        request = billing_service_pb2.PreviewInvoiceRequest(parent=tenant_name(tenant_id))
        return convert.invoice(self._call(self._billing.PreviewInvoice, request).invoice)

    def close_period(self, tenant_id: str, *, request_id: str | None = None) -> Invoice:
        """Close the tenant's oldest open period now; its invoice, finalized. Retries reuse one request_id.

        NotFoundError (BILLING_PROFILE_NOT_FOUND) for a tenant without a billing profile.
        """
        request = billing_service_pb2.ClosePeriodRequest(
            parent=tenant_name(tenant_id), request_id=request_id or new_request_id()
        )
        return convert.invoice(self._call(self._billing.ClosePeriod, request).invoice)

    # Plans and billing profiles.

    def create_plan(
        self,
        plan_id: str,
        display_name: str,
        currency_code: str,
        *,
        charges: Sequence[Charge] = (),
        minimum_amount: Quantity | None = None,
        effective_time: datetime | None = None,
        request_id: str | None = None,
    ) -> Plan:
        """A plan with its first version (from effective_time, default the current hour).

        AlreadyExistsError for a plan_id in use. Retries reuse one request_id.
        """
        request = convert_pricing.create_plan_request(
            plan_id,
            display_name,
            currency_code,
            charges=charges,
            minimum_amount=minimum_amount,
            effective_time=effective_time,
            request_id=request_id or new_request_id(),
        )
        return convert_pricing.plan(self._call(self._billing.CreatePlan, request).plan)

    def get_plan(self, plan: str) -> Plan:
        """One plan (by id or "plans/{plan}") with its versions; NotFoundError if there is none."""
        request = billing_service_pb2.GetPlanRequest(name=plan_name(plan))
        return convert_pricing.plan(self._call(self._billing.GetPlan, request).plan)

    def list_plans(self, *, page_size: int = 0) -> Iterator[Plan]:
        """The plans in id order ("default", the rate card, first)."""
        request = billing_service_pb2.ListPlansRequest(page_size=page_size)
        return self._pages(self._billing.ListPlans, request, lambda r: map(convert_pricing.plan, r.plans))

    def create_plan_version(
        self,
        plan: str,
        *,
        charges: Sequence[Charge] = (),
        minimum_amount: Quantity | None = None,
        effective_time: datetime | None = None,
        request_id: str | None = None,
    ) -> Plan:
        """New charges for a plan from effective_time (default the next hour) on; the plan with them.

        Retries reuse one request_id.
        """
        request = convert_pricing.create_plan_version_request(
            plan,
            charges=charges,
            minimum_amount=minimum_amount,
            effective_time=effective_time,
            request_id=request_id or new_request_id(),
        )
        return convert_pricing.plan(self._call(self._billing.CreatePlanVersion, request).plan)

    def set_billing_profile(
        self,
        tenant_id: str,
        display_name: str,
        *,
        email: str = "",
        currency_code: str = "",
        plan: str = "",
        plan_effective_time: datetime | None = None,
        billing_anchor_day: int = 0,
        billing_start_time: datetime | None = None,
        tax_percentage: Quantity | None = None,
        spend_threshold: Quantity | None = None,
        price_overrides: Sequence[PriceOverride] = (),
        request_id: str | None = None,
    ) -> BillingProfile:
        """Create or replace the tenant's billing profile, whole; the profile as stored.

        A setting left out takes its default (the plan's currency, the default plan, no tax,
        no threshold); the anchor day and billing start are fixed at creation. Retries reuse
        one request_id.
        """
        request = convert_pricing.set_billing_profile_request(
            tenant_id,
            display_name,
            email=email,
            currency_code=currency_code,
            plan=plan,
            plan_effective_time=plan_effective_time,
            billing_anchor_day=billing_anchor_day,
            billing_start_time=billing_start_time,
            tax_percentage=tax_percentage,
            spend_threshold=spend_threshold,
            price_overrides=price_overrides,
            request_id=request_id or new_request_id(),
        )
        response = self._call(self._billing.SetBillingProfile, request)
        return convert_pricing.billing_profile(response.billing_profile)

    def get_billing_profile(self, tenant_id: str) -> BillingProfile:
        """The tenant's billing profile; NotFoundError (BILLING_PROFILE_NOT_FOUND) if it has none."""
        request = billing_service_pb2.GetBillingProfileRequest(name=billing_profile_name(tenant_id))
        response = self._call(self._billing.GetBillingProfile, request)
        return convert_pricing.billing_profile(response.billing_profile)

    # -- MeterService -------------------------------------------------------------------

    def create_meter(
        self,
        meter_id: str,
        service: str,
        usage_type: str,
        aggregation: str,
        *,
        description: str = "",
        filter: Mapping[str, str] | None = None,
        value_dimension: str = "",
        group_by_dimensions: Sequence[str] = (),
        request_id: str | None = None,
    ) -> Meter:
        """A meter over one usage type, aggregated one way (sum, count, max, min, latest...).

        AlreadyExistsError (METER_EXISTS) for a meter_id in use. Retries reuse one request_id.
        """
        request = convert.create_meter_request(
            meter_id,
            service,
            usage_type,
            aggregation,
            description=description,
            filter=filter or {},
            value_dimension=value_dimension,
            group_by_dimensions=group_by_dimensions,
            request_id=request_id or new_request_id(),
        )
        return convert.meter(self._call(self._meters.CreateMeter, request).meter)

    def get_meter(self, meter: str) -> Meter:
        """One meter (by id or "meters/{meter}"); NotFoundError (METER_NOT_FOUND) if there is none."""
        request = meter_service_pb2.GetMeterRequest(name=meter_name(meter))
        return convert.meter(self._call(self._meters.GetMeter, request).meter)

    def list_meters(self, *, page_size: int = 0) -> Iterator[Meter]:
        """Every meter, active and archived, in meter_id order."""
        request = meter_service_pb2.ListMetersRequest(page_size=page_size)
        return self._pages(self._meters.ListMeters, request, lambda r: map(convert.meter, r.meters))

    def archive_meter(self, meter: str, *, request_id: str | None = None) -> Meter:
        """Stop a meter counting new events (what it counted stays readable); archiving again is a no-op."""
        request = meter_service_pb2.ArchiveMeterRequest(
            name=meter_name(meter), request_id=request_id or new_request_id()
        )
        return convert.meter(self._call(self._meters.ArchiveMeter, request).meter)

    # -- PaymentService -----------------------------------------------------------------

    def get_collection_status(self, tenant_id: str) -> CollectionStatus:
        """How the tenant stands in collections: good_standing, past_due or delinquent.

        A tenant whose payments never failed is in good standing, billed or not.
        PermissionDeniedError (TENANT_NOT_PERMITTED) for a tenant the token does not cover.
        """
        request = payment_service_pb2.GetCollectionStatusRequest(name=collection_status_name(tenant_id))
        response = self._call(self._payments.GetCollectionStatus, request)
        return convert_payments.collection_status(response.collection_status)

    # -- NotificationService ------------------------------------------------------------
    # Every call needs a token for all tenants with the scope notifications:admin.

    def create_webhook_subscription(
        self,
        url: str,
        secret: str,
        event_types: Sequence[str],
        *,
        description: str = "",
        request_id: str | None = None,
    ) -> WebhookSubscription:
        """Subscribe `url` to `event_types`; deliveries are signed with `secret`, which is never returned.

        Each call creates a new subscription; retries reuse one request_id, so they create one.
        InvalidArgumentError names each bad field (url, secret, event_types[i]).
        """
        request = convert_payments.create_webhook_subscription_request(
            url, secret, event_types, description, request_id or new_request_id()
        )
        response = self._call(self._notifications.CreateWebhookSubscription, request)
        return convert_payments.webhook_subscription(response.webhook_subscription)

    def get_webhook_subscription(self, subscription: str) -> WebhookSubscription:
        """One subscription, by id or "webhookSubscriptions/{id}".

        NotFoundError (WEBHOOK_SUBSCRIPTION_NOT_FOUND) if there is none.
        """
        request = notification_service_pb2.GetWebhookSubscriptionRequest(
            name=webhook_subscription_name(subscription)
        )
        response = self._call(self._notifications.GetWebhookSubscription, request)
        return convert_payments.webhook_subscription(response.webhook_subscription)

    def list_webhook_subscriptions(self, *, page_size: int = 0) -> Iterator[WebhookSubscription]:
        """Every subscription, oldest first."""
        request = notification_service_pb2.ListWebhookSubscriptionsRequest(page_size=page_size)
        return self._pages(
            self._notifications.ListWebhookSubscriptions,
            request,
            lambda r: map(convert_payments.webhook_subscription, r.webhook_subscriptions),
        )

    def delete_webhook_subscription(self, subscription: str, *, request_id: str | None = None) -> None:
        """Delete a subscription and its deliveries not yet made. Retries reuse one request_id.

        NotFoundError (WEBHOOK_SUBSCRIPTION_NOT_FOUND) if there is none.
        """
        request = notification_service_pb2.DeleteWebhookSubscriptionRequest(
            name=webhook_subscription_name(subscription), request_id=request_id or new_request_id()
        )
        self._call(self._notifications.DeleteWebhookSubscription, request)

    def list_webhook_deliveries(self, subscription: str, *, page_size: int = 0) -> Iterator[WebhookDelivery]:
        """A subscription's deliveries, newest first, each with its attempts."""
        request = notification_service_pb2.ListWebhookDeliveriesRequest(
            parent=webhook_subscription_name(subscription), page_size=page_size
        )
        return self._pages(
            self._notifications.ListWebhookDeliveries,
            request,
            lambda r: map(convert_payments.webhook_delivery, r.deliveries),
        )
