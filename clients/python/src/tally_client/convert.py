"""Between the client's values (Decimal, aware datetime, enums) and tally.v1 messages.

Exact numbers travel as decimal strings without exponent and are read back with
Decimal(str): nothing passes through a float. Times go out as Timestamps of the
instant and come back as aware UTC datetimes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from tally.v1 import billing_service_pb2, meter_service_pb2, resources_pb2, usage_service_pb2
from tally_client.models import (
    AuditEvent,
    CancelledEvent,
    CreditNote,
    EventRejection,
    IngestResult,
    Invoice,
    InvoiceLineItem,
    InvoiceParty,
    InvoicePayment,
    Meter,
    MeterAggregate,
    MeterBackfill,
    Quantity,
    Rate,
    RejectionCause,
    ReportOutcome,
    ReportResult,
    TimeBucket,
    UsageAggregate,
    UsageEvent,
    UsageSummary,
    aware,
    exact,
)
from tally_client.names import (
    meter_name,
    parse_credit_note_name,
    parse_invoice_name,
    tenant_name,
    usage_summary_name,
)

_BUCKETS = {
    None: resources_pb2.TIME_BUCKET_UNSPECIFIED,
    TimeBucket.HOUR: resources_pb2.TIME_BUCKET_HOUR,
    TimeBucket.DAY: resources_pb2.TIME_BUCKET_DAY,
    TimeBucket.MONTH: resources_pb2.TIME_BUCKET_MONTH,
}
_BUCKETS_BACK = {value: key for key, value in _BUCKETS.items()}
_AGGREGATION = "METER_AGGREGATION_"
_CAUSES = {
    resources_pb2.REJECTION_CAUSE_INVALID: RejectionCause.INVALID,
    resources_pb2.REJECTION_CAUSE_PERMISSION_DENIED: RejectionCause.PERMISSION_DENIED,
}


def decimal_text(value: Quantity, what: str = "quantity") -> str:
    """The exact decimal string of `value`, without exponent ("1E+3" -> "1000")."""
    return format(exact(value, what), "f")


def timestamp(value: datetime, what: str) -> timestamp_pb2.Timestamp:
    """A Timestamp of an aware datetime; ValueError naming the field `what` for a naive one."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(aware(value, what))
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware datetime in UTC."""
    return stamp.ToDatetime(tzinfo=UTC)


def event_message(event: UsageEvent) -> resources_pb2.UsageEvent:
    """A UsageEvent as its proto; the quantity travels as its exact decimal string."""
    message = resources_pb2.UsageEvent(
        tenant_id=event.tenant_id,
        event_id=event.event_id,
        service=event.service,
        usage_type=event.usage_type,
        quantity=decimal_text(event.quantity),
        dimensions=dict(event.dimensions),
    )
    if event.event_time is not None:
        message.event_time.CopyFrom(timestamp(event.event_time, "event_time"))
    return message


def report_result(response: usage_service_pb2.ReportUsageResponse) -> ReportResult:
    """The outcome of ReportUsage: recorded, or a duplicate of an event recorded before."""
    outcome = (
        ReportOutcome.DUPLICATE
        if response.outcome == usage_service_pb2.REPORT_OUTCOME_DUPLICATE
        else ReportOutcome.RECORDED
    )
    return ReportResult(response.tenant_id, response.event_id, outcome)


def rejection(message: resources_pb2.EventRejection) -> EventRejection:
    """One rejected event of a batch; a cause this client does not know reads as INVALID."""
    return EventRejection(
        event_id=message.event_id,
        field=message.field,
        reason=message.reason,
        cause=_CAUSES.get(message.cause, RejectionCause.INVALID),
    )


def ingest_result(response: usage_service_pb2.IngestUsageResponse) -> IngestResult:
    """The counts of an IngestUsage call, with its rejections."""
    return IngestResult(
        batch_count=response.batch_count,
        accepted_count=response.accepted_count,
        duplicate_count=response.duplicate_count,
        rejected_count=response.rejected_count,
        rejections=tuple(rejection(r) for r in response.rejections),
    )


def usage_summary(message: resources_pb2.UsageSummary) -> UsageSummary:
    """A UsageSummary proto as exact values: quantities and meter values as Decimals, times in UTC."""
    return UsageSummary(
        name=message.name,
        tenant_id=message.tenant_id,
        start_time=from_timestamp(message.start_time),
        end_time=from_timestamp(message.end_time),
        bucket=_BUCKETS_BACK.get(message.bucket),
        group_by_dimension=message.group_by_dimension,
        aggregates=tuple(
            UsageAggregate(
                service=a.service,
                usage_type=a.usage_type,
                bucket_start_time=(
                    from_timestamp(a.bucket_start_time) if a.HasField("bucket_start_time") else None
                ),
                dimension_value=a.dimension_value,
                quantity=Decimal(a.quantity),
                event_count=a.event_count,
            )
            for a in message.aggregates
        ),
        meter_aggregates=tuple(
            MeterAggregate(
                meter=m.meter,
                aggregation=_aggregation_text(m.aggregation),
                bucket_start_time=(
                    from_timestamp(m.bucket_start_time) if m.HasField("bucket_start_time") else None
                ),
                dimension_value=m.dimension_value,
                value=Decimal(m.value),
            )
            for m in message.meter_aggregates
        ),
    )


def _aggregation_text(value: resources_pb2.MeterAggregation.ValueType) -> str:
    return resources_pb2.MeterAggregation.Name(value).removeprefix(_AGGREGATION).lower()


def optional_time(message: Any, field: str) -> datetime | None:
    """The Timestamp `field` of `message` as a UTC datetime; None where it is unset."""
    return from_timestamp(getattr(message, field)) if message.HasField(field) else None


def cancelled_event(response: usage_service_pb2.CancelEventResponse) -> CancelledEvent:
    """CancelEvent's answer: the event and the time of its (first) cancellation."""
    return CancelledEvent(response.tenant_id, response.event_id, from_timestamp(response.cancel_time))


def meter(message: resources_pb2.Meter) -> Meter:
    """A Meter proto; its aggregation and state in lower case without their enum prefixes."""
    return Meter(
        name=message.name,
        meter_id=message.meter_id,
        description=message.description,
        service=message.service,
        usage_type=message.usage_type,
        filter=dict(message.filter),
        aggregation=_aggregation_text(message.aggregation),
        value_dimension=message.value_dimension,
        group_by_dimensions=tuple(message.group_by_dimensions),
        state=resources_pb2.MeterState.Name(message.state).removeprefix("METER_STATE_").lower(),
        create_time=from_timestamp(message.create_time),
        archive_time=optional_time(message, "archive_time"),
        backfill=MeterBackfill(
            scanned_event_count=message.backfill.scanned_event_count,
            counted_event_count=message.backfill.counted_event_count,
            end_time=optional_time(message.backfill, "end_time"),
        ),
    )


def create_meter_request(
    meter_id: str,
    service: str,
    usage_type: str,
    aggregation: str,
    *,
    description: str,
    filter: Mapping[str, str],
    value_dimension: str,
    group_by_dimensions: Sequence[str],
    request_id: str,
) -> meter_service_pb2.CreateMeterRequest:
    """The CreateMeter request; ValueError for an aggregation that is not one of MeterAggregation's."""
    known = [name.removeprefix(_AGGREGATION).lower() for name in resources_pb2.MeterAggregation.keys()]
    if aggregation not in known or aggregation == "unspecified":
        raise ValueError(f"aggregation must be one of {', '.join(known[1:])}, not {aggregation!r}")
    return meter_service_pb2.CreateMeterRequest(
        meter=resources_pb2.Meter(
            meter_id=meter_id.removeprefix("meters/"),
            description=description,
            service=service,
            usage_type=usage_type,
            filter=dict(filter),
            aggregation=resources_pb2.MeterAggregation.Value(_AGGREGATION + aggregation.upper()),
            value_dimension=value_dimension,
            group_by_dimensions=list(group_by_dimensions),
        ),
        request_id=request_id,
    )


def credit_note(message: resources_pb2.CreditNote) -> CreditNote:
    """A CreditNote proto with its amount as a Decimal and its tenant's, its own and its invoice's ids."""
    return CreditNote(
        name=message.name,
        tenant_id=message.tenant_id,
        credit_note_id=parse_credit_note_name(message.name)[1],
        invoice_id=parse_invoice_name(message.invoice)[1],
        number=message.number,
        currency_code=message.currency_code,
        amount=Decimal(message.amount),
        reason=message.reason,
        create_time=from_timestamp(message.create_time),
    )


def rate(message: resources_pb2.Rate) -> Rate:
    """A Rate proto with its unit price as a Decimal."""
    return Rate(
        name=message.name,
        service=message.service,
        usage_type=message.usage_type,
        unit_price=Decimal(message.unit_price),
        currency_code=message.currency_code,
        effective_time=from_timestamp(message.effective_time),
        create_time=from_timestamp(message.create_time),
    )


def invoice(message: resources_pb2.Invoice) -> Invoice:
    """An Invoice proto with exact amounts; a preview, which has no name, has an empty invoice_id."""
    return Invoice(
        name=message.name,
        tenant_id=message.tenant_id,
        # A preview (PreviewInvoice) is not stored: it has no name.
        invoice_id=parse_invoice_name(message.name)[1] if message.name else "",
        period_start_time=from_timestamp(message.period_start_time),
        period_end_time=from_timestamp(message.period_end_time),
        currency_code=message.currency_code,
        line_items=tuple(
            InvoiceLineItem(
                service=line.service,
                usage_type=line.usage_type,
                quantity=Decimal(line.quantity),
                unit_price=Decimal(line.unit_price) if line.unit_price else None,
                amount=Decimal(line.amount),
                event_count=line.event_count,
                kind=resources_pb2.InvoiceLineKind.Name(line.kind).removeprefix("INVOICE_LINE_KIND_").lower(),
                description=line.description,
                charge_key=line.charge_key,
            )
            for line in message.line_items
        ),
        total=Decimal(message.total),
        status=resources_pb2.InvoiceStatus.Name(message.status).removeprefix("INVOICE_STATUS_").lower(),
        create_time=from_timestamp(message.create_time),
        update_time=from_timestamp(message.update_time),
        number=message.number,
        kind=enum_text(resources_pb2.InvoiceKind, message.kind, "INVOICE_KIND_") or "final",
        issuer=_party(message.issuer) if message.HasField("issuer") else None,
        customer=_party(message.customer) if message.HasField("customer") else None,
        finalize_time=optional_time(message, "finalize_time"),
        paid_time=optional_time(message, "paid_time"),
        void_time=optional_time(message, "void_time"),
        uncollectible_time=optional_time(message, "uncollectible_time"),
        payment=invoice_payment(message.payment) if message.HasField("payment") else None,
    )


def enum_text(enum: Any, value: int, prefix: str) -> str:
    """An enum value in lower case without its prefix; "" for UNSPECIFIED or a value unknown here."""
    try:
        name = str(enum.Name(value))
    except ValueError:
        return ""
    text = name.removeprefix(prefix).lower()
    return "" if text == "unspecified" else text


def _party(message: resources_pb2.InvoiceParty) -> InvoiceParty:
    return InvoiceParty(
        name=message.name,
        address=message.address,
        tax_id=message.tax_id,
        email=message.email,
        tenant_id=message.tenant_id,
    )


def invoice_payment(message: resources_pb2.InvoicePayment) -> InvoicePayment:
    """An InvoicePayment proto; its state in lower case without the PAYMENT_STATE_ prefix."""
    return InvoicePayment(
        state=enum_text(resources_pb2.PaymentState, message.state, "PAYMENT_STATE_"),
        attempt_count=message.attempt_count,
        next_attempt_time=optional_time(message, "next_attempt_time"),
        stripe_invoice_id=message.stripe_invoice_id,
        last_failure=message.last_failure,
    )


def _struct(message: resources_pb2.AuditEvent, field: str, value: struct_pb2.Struct) -> dict[str, Any] | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    return json_format.MessageToDict(value)


def audit_event(message: resources_pb2.AuditEvent) -> AuditEvent:
    """An AuditEvent proto, its before and after as JSON values (None where absent)."""
    return AuditEvent(
        name=message.name,
        create_time=from_timestamp(message.create_time),
        principal=message.principal,
        request_id=message.request_id,
        action=resources_pb2.AuditAction.Name(message.action).removeprefix("AUDIT_ACTION_").lower(),
        tenant_id=message.tenant_id,
        resource=message.resource,
        before=_struct(message, "before", message.before),
        after=_struct(message, "after", message.after),
    )


def summary_request(
    tenant_id: str,
    start_time: datetime,
    end_time: datetime,
    bucket: TimeBucket | None,
    group_by_dimension: str,
    meters: Sequence[str] = (),
    fields: Sequence[str] | None = None,
) -> usage_service_pb2.GetUsageSummaryRequest:
    """The GetUsageSummary request; meters may be given by id or by name ("meters/{meter}").

    `fields` (None: all) become its read_mask: e.g. ["meter_aggregates"] for meter values alone.
    """
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=usage_summary_name(tenant_id),
        start_time=timestamp(start_time, "start_time"),
        end_time=timestamp(end_time, "end_time"),
        bucket=_BUCKETS[bucket],
        group_by_dimension=group_by_dimension,
        meters=[meter_name(meter) for meter in meters],
    )
    if fields is not None:
        request.read_mask.paths.extend(fields)
    return request


def summaries_request(
    tenant_ids: Sequence[str],
    start_time: datetime,
    end_time: datetime,
    bucket: TimeBucket | None,
    group_by_dimension: str,
    meters: Sequence[str] = (),
    fields: Sequence[str] | None = None,
) -> usage_service_pb2.StreamUsageSummariesRequest:
    """The StreamUsageSummaries request for several tenants over one period; as in summary_request."""
    request = usage_service_pb2.StreamUsageSummariesRequest(
        tenant_ids=list(tenant_ids),
        start_time=timestamp(start_time, "start_time"),
        end_time=timestamp(end_time, "end_time"),
        bucket=_BUCKETS[bucket],
        group_by_dimension=group_by_dimension,
        meters=[meter_name(meter) for meter in meters],
    )
    if fields is not None:
        request.read_mask.paths.extend(fields)
    return request


def list_rates_request(
    as_of_time: datetime | None, show_history: bool, page_size: int
) -> billing_service_pb2.ListRatesRequest:
    """The ListRates request: the card as of `as_of_time` (None: now), or all history."""
    request = billing_service_pb2.ListRatesRequest(show_history=show_history, page_size=page_size)
    if as_of_time is not None:
        request.as_of_time.CopyFrom(timestamp(as_of_time, "as_of_time"))
    return request


def set_rate_request(
    service: str,
    usage_type: str,
    unit_price: Quantity,
    *,
    effective_time: datetime | None,
    currency_code: str,
    request_id: str,
    reprice_past_usage: bool = False,
) -> billing_service_pb2.SetRateRequest:
    """The SetRate request; None `effective_time` takes the server's default (the next whole hour)."""
    request = billing_service_pb2.SetRateRequest(
        service=service,
        usage_type=usage_type,
        unit_price=decimal_text(unit_price, "unit_price"),
        currency_code=currency_code,
        request_id=request_id,
        reprice_past_usage=reprice_past_usage,
    )
    if effective_time is not None:
        request.effective_time.CopyFrom(timestamp(effective_time, "effective_time"))
    return request


def generate_invoice_request(
    tenant_id: str, period_start_time: datetime, period_end_time: datetime, request_id: str
) -> billing_service_pb2.GenerateInvoiceRequest:
    """The GenerateInvoice request; every attempt of one call sends the same `request_id`."""
    return billing_service_pb2.GenerateInvoiceRequest(
        parent=tenant_name(tenant_id),
        period_start_time=timestamp(period_start_time, "period_start_time"),
        period_end_time=timestamp(period_end_time, "period_end_time"),
        request_id=request_id,
    )


def list_audit_events_request(
    tenant_id: str, start_time: datetime | None, end_time: datetime | None, page_size: int
) -> billing_service_pb2.ListAuditEventsRequest:
    """The ListAuditEvents request; an empty `tenant_id` and None times do not narrow it."""
    request = billing_service_pb2.ListAuditEventsRequest(tenant_id=tenant_id, page_size=page_size)
    if start_time is not None:
        request.start_time.CopyFrom(timestamp(start_time, "start_time"))
    if end_time is not None:
        request.end_time.CopyFrom(timestamp(end_time, "end_time"))
    return request
