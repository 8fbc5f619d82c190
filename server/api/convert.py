"""Conversions between protobuf messages and Tally's plain values."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from server.domain.audit import INVOICE_CREATED, INVOICE_RECOMPUTED, RATE_SET, USAGE_BACKFILLED, AuditEvent
from server.domain.decimals import MINOR_UNITS, format_money, format_price, format_quantity
from server.domain.errors import InvalidArgument
from server.domain.events import RawEvent
from server.domain.models import Invoice, Rate, UsageSummary
from server.domain.names import audit_event_name, invoice_name, rate_name, usage_summary_name
from tally.v1 import resources_pb2

# Timestamps outside years 1..9999 (the protobuf Timestamp range) are malformed.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799

BUCKET_NAMES: dict[resources_pb2.TimeBucket.ValueType, str] = {
    resources_pb2.TIME_BUCKET_UNSPECIFIED: "",
    resources_pb2.TIME_BUCKET_HOUR: "hour",
    resources_pb2.TIME_BUCKET_DAY: "day",
    resources_pb2.TIME_BUCKET_MONTH: "month",
}
_BUCKET_ENUMS = {name: value for value, name in BUCKET_NAMES.items()}


def timestamp_problem(ts: Timestamp) -> str | None:
    if not 0 <= ts.nanos < 1_000_000_000 or not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        return "is not a valid timestamp"
    return None


def micros(ts: Timestamp) -> int:
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


def bucket_name(value: int) -> str:
    name = BUCKET_NAMES.get(resources_pb2.TimeBucket.ValueType(value))
    if name is None:
        raise InvalidArgument.single("bucket", f"unknown time bucket {value}")
    return name


def to_timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def raw_event(event: resources_pb2.UsageEvent) -> RawEvent:
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
    return resources_pb2.Rate(
        name=rate_name(rate.service, rate.usage_type, rate.effective_from),
        service=rate.service,
        usage_type=rate.usage_type,
        unit_price=format_price(rate.unit_price, MINOR_UNITS.get(rate.currency, 2)),
        currency_code=rate.currency,
        effective_time=to_timestamp(rate.effective_from),
        create_time=to_timestamp(rate.created_at),
    )


def invoice_message(invoice: Invoice) -> resources_pb2.Invoice:
    minor = MINOR_UNITS.get(invoice.currency, 2)
    return resources_pb2.Invoice(
        name=invoice_name(invoice.tenant_id, invoice.id),
        tenant_id=invoice.tenant_id,
        period_start_time=to_timestamp(invoice.period_start),
        period_end_time=to_timestamp(invoice.period_end),
        currency_code=invoice.currency,
        line_items=[
            resources_pb2.InvoiceLineItem(
                service=line.service,
                usage_type=line.usage_type,
                quantity=format_quantity(line.quantity),
                unit_price=format_price(line.unit_price, minor),
                amount=format_money(line.amount, minor),
                event_count=line.event_count,
            )
            for line in invoice.lines
        ],
        total=format_money(invoice.total, minor),
        status=resources_pb2.INVOICE_STATUS_DRAFT,
        create_time=to_timestamp(invoice.created_at),
        update_time=to_timestamp(invoice.updated_at),
        compute_time=to_timestamp(invoice.computed_at),
    )


def summary_message(summary: UsageSummary) -> resources_pb2.UsageSummary:
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
    return message


_AUDIT_ACTIONS = {
    RATE_SET: resources_pb2.AUDIT_ACTION_RATE_SET,
    INVOICE_CREATED: resources_pb2.AUDIT_ACTION_INVOICE_CREATED,
    INVOICE_RECOMPUTED: resources_pb2.AUDIT_ACTION_INVOICE_RECOMPUTED,
    USAGE_BACKFILLED: resources_pb2.AUDIT_ACTION_USAGE_BACKFILLED,
}


def audit_event_message(event: AuditEvent) -> resources_pb2.AuditEvent:
    entry = event.entry
    message = resources_pb2.AuditEvent(
        name=audit_event_name(event.id),
        create_time=to_timestamp(event.time),
        principal=entry.principal,
        request_id=entry.request_id,
        action=_AUDIT_ACTIONS.get(entry.action, resources_pb2.AUDIT_ACTION_UNSPECIFIED),
        tenant_id=entry.tenant_id,
        resource=entry.resource,
    )
    if entry.before is not None:
        message.before.update(entry.before)
    if entry.after is not None:
        message.after.update(entry.after)
    return message
