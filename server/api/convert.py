"""Conversions between protobuf messages and Tally's plain values."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from server.domain.aggregation import TimeBucket
from server.domain.audit import AuditAction, AuditEvent
from server.domain.decimals import MINOR_UNITS, format_money, format_price, format_quantity
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.events import RawEvent
from server.domain.inputs import RateChange, SummaryQuery
from server.domain.meters import Aggregation, Meter, MeterSpec, MeterState
from server.domain.models import (
    CreditNote,
    Invoice,
    InvoiceKind,
    InvoicePayment,
    InvoiceStatus,
    PaymentState,
    Rate,
    UsageSummary,
)
from server.domain.names import (
    audit_event_name,
    credit_note_name,
    invoice_name,
    rate_name,
    usage_summary_name,
)
from server.domain.pricing import LineItem, LineKind
from tally.v1 import billing_service_pb2, resources_pb2, usage_service_pb2

# Timestamps outside years 1..9999 (the protobuf Timestamp range) are malformed.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799

BUCKET_NAMES: dict[resources_pb2.TimeBucket.ValueType, TimeBucket] = {
    resources_pb2.TIME_BUCKET_UNSPECIFIED: TimeBucket.NONE,
    resources_pb2.TIME_BUCKET_HOUR: TimeBucket.HOUR,
    resources_pb2.TIME_BUCKET_DAY: TimeBucket.DAY,
    resources_pb2.TIME_BUCKET_MONTH: TimeBucket.MONTH,
}
_BUCKET_ENUMS = {name: value for value, name in BUCKET_NAMES.items()}


def timestamp_problem(ts: Timestamp) -> str | None:
    """Why `ts` is not a valid Timestamp (nanos or years 1..9999 out of range), or None."""
    if not 0 <= ts.nanos < 1_000_000_000 or not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        return "is not a valid timestamp"
    return None


def micros(ts: Timestamp) -> int:
    """A valid Timestamp as microseconds since the epoch (finer digits are dropped)."""
    return ts.seconds * 1_000_000 + ts.nanos // 1_000


def optional_micros(message: object, field: str) -> int | None:
    """The timestamp field in microseconds, None if unset; InvalidArgument if malformed."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    ts: Timestamp = getattr(message, field)
    if problem := timestamp_problem(ts):
        raise InvalidArgument.single(field, problem)
    return micros(ts)


def tenant_in(name: str, parse: Callable[[str], str]) -> str:
    """The tenant id that a resource name starts with, or "" if it is malformed.

    For charging the tenant's request rate before the request is validated: a malformed
    name is refused afterwards, by the method, and still charged to the principal.
    """
    try:
        return parse(name)
    except InvalidArgument:
        return ""


def summary_query(
    request: usage_service_pb2.GetUsageSummaryRequest | usage_service_pb2.StreamUsageSummariesRequest,
    mask: FieldMask | None,
) -> SummaryQuery:
    """The query of a summary request, not yet validated (the service does, after authorization).

    `mask` is the request's read_mask as summary_fields checked it: what to compute.
    """
    fields = None if mask is None else {path.split(".")[0] for path in mask.paths}
    return SummaryQuery(
        optional_micros(request, "start_time"),
        optional_micros(request, "end_time"),
        bucket_name(request.bucket),
        request.group_by_dimension,
        tuple(request.meters),
        with_aggregates=fields is None or "aggregates" in fields,
        with_meter_values=fields is None or "meter_aggregates" in fields,
    )


def summary_fields(mask: FieldMask) -> FieldMask | None:
    """The summary fields a read_mask asks for (AIP-157), or None for every field.

    Unset, empty and "*" mean every field; each other path must be a field of
    UsageSummary (or a field inside one of its singular message fields).
    """
    paths = list(mask.paths)
    if not paths or paths == ["*"]:
        return None
    violations = [
        FieldViolation(f"read_mask.paths[{index}]", f"{path!r} is not a field of UsageSummary")
        for index, path in enumerate(paths)
        if not FieldMask(paths=[path]).IsValidForDescriptor(resources_pb2.UsageSummary.DESCRIPTOR)
    ]
    if violations:
        raise InvalidArgument(violations)
    return FieldMask(paths=paths)


def rate_change(request: billing_service_pb2.SetRateRequest) -> RateChange:
    """The change a SetRate request asks for, not yet validated (the service does)."""
    return RateChange(
        request.service,
        request.usage_type,
        request.unit_price,
        request.currency_code,
        optional_micros(request, "effective_time"),
        request.reprice_past_usage,
    )


def bucket_name(value: int) -> TimeBucket:
    """The time bucket of a proto enum value; InvalidArgument (field `bucket`) for an unknown one."""
    name = BUCKET_NAMES.get(resources_pb2.TimeBucket.ValueType(value))
    if name is None:
        raise InvalidArgument.single("bucket", f"unknown time bucket {value}")
    return name


def to_timestamp(value: datetime) -> Timestamp:
    """An aware datetime as a Timestamp."""
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def raw_event(event: resources_pb2.UsageEvent) -> RawEvent:
    """A UsageEvent proto as an unvalidated RawEvent.

    A malformed event_time is kept as `time_error`, so that validation reports it with the
    event's other problems.
    """
    time_micros: int | None = None
    time_error: str | None = None
    if event.HasField("event_time"):
        time_error = timestamp_problem(event.event_time)
        if time_error is None:
            time_micros = micros(event.event_time)
    return RawEvent(
        tenant_id=event.tenant_id,
        event_id=event.event_id,
        service=event.service,
        usage_type=event.usage_type,
        quantity=event.quantity,
        time_micros=time_micros,
        dimensions=event.dimensions,
        time_error=time_error,
    )


def rate_message(rate: Rate) -> resources_pb2.Rate:
    """A Rate as its proto: its resource name, and its price in the currency's precision."""
    return resources_pb2.Rate(
        name=rate_name(rate.service, rate.usage_type, rate.effective_from),
        service=rate.service,
        usage_type=rate.usage_type,
        unit_price=format_price(rate.unit_price, MINOR_UNITS.get(rate.currency, 2)),
        currency_code=rate.currency,
        effective_time=to_timestamp(rate.effective_from),
        create_time=to_timestamp(rate.created_at),
    )


_STATUSES = {
    InvoiceStatus.DRAFT: resources_pb2.INVOICE_STATUS_DRAFT,
    InvoiceStatus.FINALIZED: resources_pb2.INVOICE_STATUS_FINALIZED,
    InvoiceStatus.PAID: resources_pb2.INVOICE_STATUS_PAID,
    InvoiceStatus.VOID: resources_pb2.INVOICE_STATUS_VOID,
    InvoiceStatus.UNCOLLECTIBLE: resources_pb2.INVOICE_STATUS_UNCOLLECTIBLE,
}
_KINDS = {
    InvoiceKind.FINAL: resources_pb2.INVOICE_KIND_FINAL,
    InvoiceKind.INTERIM: resources_pb2.INVOICE_KIND_INTERIM,
}
_LINE_KINDS = {
    LineKind.USAGE: resources_pb2.INVOICE_LINE_KIND_USAGE,
    LineKind.FLAT_FEE: resources_pb2.INVOICE_LINE_KIND_FLAT_FEE,
    LineKind.MINIMUM: resources_pb2.INVOICE_LINE_KIND_MINIMUM,
    LineKind.ADJUSTMENT: resources_pb2.INVOICE_LINE_KIND_ADJUSTMENT,
    LineKind.TAX: resources_pb2.INVOICE_LINE_KIND_TAX,
}


def _party(party: Mapping[str, Any] | None) -> resources_pb2.InvoiceParty | None:
    if party is None:
        return None
    return resources_pb2.InvoiceParty(
        name=party.get("name", ""),
        address=party.get("address", ""),
        tax_id=party.get("tax_id", ""),
        email=party.get("email", ""),
        tenant_id=party.get("tenant_id", ""),
    )


def _line_message(line: LineItem, minor: int) -> resources_pb2.InvoiceLineItem:
    message = resources_pb2.InvoiceLineItem(
        service=line.service,
        usage_type=line.usage_type,
        quantity=format_quantity(line.quantity),
        unit_price="" if line.unit_price is None else format_price(line.unit_price, minor),
        amount=format_money(line.amount, minor),
        event_count=line.event_count,
        kind=_LINE_KINDS[line.kind],
        description=line.description,
        charge_key=line.charge_key,
        tiers=[
            resources_pb2.TierPortion(
                tier=t.tier,
                above=format_quantity(t.above),
                up_to="" if t.up_to is None else format_quantity(t.up_to),
                quantity=format_quantity(t.quantity),
                unit_price=format_price(t.unit_price, minor),
                flat_fee=format_price(t.flat_fee, minor),
                amount=format_quantity(t.amount),
            )
            for t in line.tiers
        ],
    )
    if line.kind is LineKind.TAX:
        message.unit_price = format_quantity(line.unit_price or Decimal(0))
    if line.period_start is not None and line.period_end is not None:
        message.period_start_time.CopyFrom(to_timestamp(line.period_start))
        message.period_end_time.CopyFrom(to_timestamp(line.period_end))
    return message


def invoice_message(invoice: Invoice) -> resources_pb2.Invoice:
    """An Invoice as its proto, with its real status, kind, parties and lifecycle times."""
    minor = MINOR_UNITS.get(invoice.currency, 2)
    message = _invoice_message(invoice, minor)
    message.kind = _KINDS[invoice.kind]
    message.number = invoice.number
    parties = invoice.parties or {}
    if (issuer := _party(parties.get("issuer"))) is not None:
        message.issuer.CopyFrom(issuer)
    if (customer := _party(parties.get("customer"))) is not None:
        message.customer.CopyFrom(customer)
    for field, value in (
        ("finalize_time", invoice.finalize_time),
        ("paid_time", invoice.paid_time),
        ("void_time", invoice.void_time),
        ("uncollectible_time", invoice.uncollectible_time),
    ):
        if value is not None:
            getattr(message, field).CopyFrom(to_timestamp(value))
    if invoice.payment is not None:
        message.payment.CopyFrom(payment_message(invoice.payment))
    return message


_PAYMENT_STATES: dict[PaymentState, resources_pb2.PaymentState.ValueType] = {
    PaymentState.SIMULATED: resources_pb2.PAYMENT_STATE_SIMULATED,
    PaymentState.PENDING: resources_pb2.PAYMENT_STATE_PENDING,
    PaymentState.OPEN: resources_pb2.PAYMENT_STATE_OPEN,
    PaymentState.PAID: resources_pb2.PAYMENT_STATE_PAID,
    PaymentState.FAILED: resources_pb2.PAYMENT_STATE_FAILED,
    PaymentState.ACTION_REQUIRED: resources_pb2.PAYMENT_STATE_ACTION_REQUIRED,
    PaymentState.UNCOLLECTIBLE: resources_pb2.PAYMENT_STATE_UNCOLLECTIBLE,
    PaymentState.VOID: resources_pb2.PAYMENT_STATE_VOID,
}


def payment_message(payment: InvoicePayment) -> resources_pb2.InvoicePayment:
    """The proto of an invoice's payment: state, attempts, next attempt, Stripe's id."""
    message = resources_pb2.InvoicePayment(
        state=_PAYMENT_STATES[payment.state],
        attempt_count=payment.attempt_count,
        stripe_invoice_id=payment.stripe_invoice_id or "",
        last_failure=payment.last_failure or "",
    )
    if payment.next_attempt_time is not None:
        message.next_attempt_time.CopyFrom(to_timestamp(payment.next_attempt_time))
    return message


def credit_note_message(note: CreditNote) -> resources_pb2.CreditNote:
    """A CreditNote as its proto, its amount in the currency's minor units."""
    minor = MINOR_UNITS.get(note.currency, 2)
    message = resources_pb2.CreditNote(
        name=credit_note_name(note.tenant_id, note.id),
        tenant_id=note.tenant_id,
        invoice=invoice_name(note.tenant_id, note.invoice_id),
        number=note.number,
        currency_code=note.currency,
        amount=format_money(note.amount, minor),
        reason=note.reason,
        create_time=to_timestamp(note.create_time),
    )
    if (issuer := _party(note.parties.get("issuer"))) is not None:
        message.issuer.CopyFrom(issuer)
    if (customer := _party(note.parties.get("customer"))) is not None:
        message.customer.CopyFrom(customer)
    return message


def _invoice_message(invoice: Invoice, minor: int) -> resources_pb2.Invoice:
    return resources_pb2.Invoice(
        name=invoice_name(invoice.tenant_id, invoice.id) if invoice.id else "",
        tenant_id=invoice.tenant_id,
        period_start_time=to_timestamp(invoice.period_start),
        period_end_time=to_timestamp(invoice.period_end),
        currency_code=invoice.currency,
        line_items=[_line_message(line, minor) for line in invoice.lines],
        total=format_money(invoice.total, minor),
        status=_STATUSES[invoice.status],
        create_time=to_timestamp(invoice.created_at),
        update_time=to_timestamp(invoice.updated_at),
        compute_time=to_timestamp(invoice.computed_at),
    )


_AGGREGATIONS: dict[Aggregation, resources_pb2.MeterAggregation.ValueType] = {
    Aggregation.SUM: resources_pb2.METER_AGGREGATION_SUM,
    Aggregation.COUNT: resources_pb2.METER_AGGREGATION_COUNT,
    Aggregation.MAX: resources_pb2.METER_AGGREGATION_MAX,
    Aggregation.MIN: resources_pb2.METER_AGGREGATION_MIN,
    Aggregation.LATEST: resources_pb2.METER_AGGREGATION_LATEST,
    Aggregation.UNIQUE_COUNT: resources_pb2.METER_AGGREGATION_UNIQUE_COUNT,
    Aggregation.TIME_WEIGHTED: resources_pb2.METER_AGGREGATION_TIME_WEIGHTED,
}
_AGGREGATION_OF = {value: name for name, value in _AGGREGATIONS.items()}
_METER_STATES = {
    MeterState.BACKFILLING: resources_pb2.METER_STATE_BACKFILLING,
    MeterState.ACTIVE: resources_pb2.METER_STATE_ACTIVE,
    MeterState.ARCHIVED: resources_pb2.METER_STATE_ARCHIVED,
}


def meter_spec(meter: resources_pb2.Meter) -> MeterSpec:
    """The definition a CreateMeter request carries; INVALID_ARGUMENT for a missing aggregation."""
    aggregation = _AGGREGATION_OF.get(meter.aggregation)
    if aggregation is None:
        raise InvalidArgument.single(
            "meter.aggregation", "is required (one of the METER_AGGREGATION_ values)"
        )
    return MeterSpec(
        meter_id=meter.meter_id,
        service=meter.service,
        usage_type=meter.usage_type,
        aggregation=aggregation,
        filter=dict(meter.filter),
        value_dimension=meter.value_dimension,
        group_by=tuple(meter.group_by_dimensions),
        description=meter.description,
    )


def meter_message(meter: Meter) -> resources_pb2.Meter:
    """A Meter as its proto: its spec, state and times."""
    spec = meter.spec
    message = resources_pb2.Meter(
        name=meter.name,
        meter_id=spec.meter_id,
        description=spec.description,
        service=spec.service,
        usage_type=spec.usage_type,
        filter=dict(spec.filter),
        aggregation=_AGGREGATIONS[spec.aggregation],
        value_dimension=spec.value_dimension,
        group_by_dimensions=list(spec.group_by),
        state=_METER_STATES[meter.state],
        create_time=to_timestamp(meter.create_time),
    )
    if meter.archive_time is not None:
        message.archive_time.CopyFrom(to_timestamp(meter.archive_time))
    backfill = meter.backfill
    message.backfill.scanned_event_count = backfill.scanned_events
    message.backfill.counted_event_count = backfill.counted_events
    if backfill.end_time is not None:
        message.backfill.end_time.CopyFrom(to_timestamp(backfill.end_time))
    return message


def masked_summary_message(summary: UsageSummary, mask: FieldMask | None) -> resources_pb2.UsageSummary:
    """A UsageSummary as its proto, only the fields of `mask` (summary_fields; None: all)."""
    message = summary_message(summary)
    if mask is None:
        return message
    masked = resources_pb2.UsageSummary()
    mask.MergeMessage(message, masked)
    return masked


def summary_message(summary: UsageSummary) -> resources_pb2.UsageSummary:
    """A UsageSummary as its proto: usage aggregates, then meter values."""
    message = resources_pb2.UsageSummary(
        name=usage_summary_name(summary.tenant_id),
        tenant_id=summary.tenant_id,
        start_time=to_timestamp(summary.start),
        end_time=to_timestamp(summary.end),
        bucket=_BUCKET_ENUMS[summary.bucket],
        group_by_dimension=summary.group_by_dimension,
    )
    add = message.aggregates.add
    for aggregate in summary.aggregates:
        item = add(
            service=aggregate.service,
            usage_type=aggregate.usage_type,
            dimension_value=aggregate.dimension_value,
            quantity=aggregate.quantity,
            event_count=aggregate.event_count,
        )
        if aggregate.bucket_start_seconds is not None:
            item.bucket_start_time.seconds = aggregate.bucket_start_seconds
    add_value = message.meter_aggregates.add
    for value in summary.meter_values:
        entry = add_value(
            meter=value.meter.name,
            aggregation=_AGGREGATIONS[value.meter.spec.aggregation],
            dimension_value=value.dimension_value,
            value=value.value,
        )
        if value.bucket_start_seconds is not None:
            entry.bucket_start_time.seconds = value.bucket_start_seconds
    return message


# Each action is the contract's value of the same name (a test keeps the two lists equal).
_AUDIT_ACTIONS = {
    action: resources_pb2.AuditAction.Value(f"AUDIT_ACTION_{action.name}") for action in AuditAction
}


def audit_event_message(event: AuditEvent) -> resources_pb2.AuditEvent:
    """An audit entry as its proto, with its before and after values as Structs."""
    entry = event.entry
    message = resources_pb2.AuditEvent(
        name=audit_event_name(event.id),
        create_time=to_timestamp(event.time),
        principal=entry.principal,
        request_id=entry.request_id,
        action=_AUDIT_ACTIONS[entry.action],
        tenant_id=entry.tenant_id,
        resource=entry.resource,
    )
    if entry.before is not None:
        message.before.update(entry.before)
    if entry.after is not None:
        message.after.update(entry.after)
    return message
