"""The values the client takes and returns: plain frozen dataclasses with exact types.

Quantities and money are `decimal.Decimal`, times are timezone-aware `datetime`s in
UTC, tenants are their plain tenant ids. Nothing here knows about protobuf; the
conversions live in tally_client.convert.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

Quantity = Decimal | int | str
"""What the client accepts as an exact number: a Decimal, an int, or a decimal string. Never a float."""


def exact(value: Quantity, what: str = "quantity") -> Decimal:
    """`value` as a finite Decimal; floats are refused, since they cannot hold most decimal fractions."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise TypeError(f"{what} must be a Decimal, an int or a decimal string, not {type(value).__name__}")
    number = Decimal(value) if not isinstance(value, Decimal) else value
    if not number.is_finite():
        raise ValueError(f"{what} must be finite, not {value}")
    return number


def aware(value: datetime, what: str) -> datetime:
    """`value` if it has a time zone: a naive datetime's instant is ambiguous."""
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (e.g. datetime.now(UTC)), not naive")
    return value


def new_event_id() -> str:
    """A random event id (the idempotency key): 32 hex digits."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One measured amount of usage. `(tenant_id, event_id)` identifies it: resending it is safe.

    `event_id` defaults to a random id chosen when the event is built, so resending the
    same UsageEvent object never counts twice; give your own id to make resends safe
    across restarts of your program. `event_time` defaults to when the server receives it.
    """

    tenant_id: str
    service: str
    usage_type: str
    quantity: Decimal
    event_id: str = field(default_factory=new_event_id)
    event_time: datetime | None = None
    dimensions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantity", exact(self.quantity))
        if self.event_time is not None:
            aware(self.event_time, "event_time")


class ReportOutcome(enum.Enum):
    """What became of a reported event."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What became of one reported event, identified by its tenant and event id."""

    tenant_id: str
    event_id: str
    outcome: ReportOutcome


class RejectionCause(enum.Enum):
    """Why an event of a batch was rejected: fix the event, or use a token for its tenant."""

    INVALID = "invalid"
    PERMISSION_DENIED = "permission_denied"


@dataclass(frozen=True, slots=True)
class EventRejection:
    """One event of a batch that was not recorded; the rest of its batch was."""

    event_id: str
    field: str
    reason: str
    cause: RejectionCause


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Counts over one IngestUsage call: every event is in exactly one of the three counts."""

    batch_count: int
    accepted_count: int
    duplicate_count: int
    rejected_count: int
    rejections: tuple[EventRejection, ...]


class TimeBucket(enum.Enum):
    """Time grouping of a usage summary (UTC)."""

    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class UsageAggregate:
    """One usage type's quantity and event count.

    Within one time bucket (`bucket_start_time`, None without buckets) and one value of the
    grouped dimension (`dimension_value`, empty without grouping).
    """

    service: str
    usage_type: str
    bucket_start_time: datetime | None
    dimension_value: str
    quantity: Decimal
    event_count: int


@dataclass(frozen=True, slots=True)
class MeterAggregate:
    """The value of one named meter (within one time bucket and one value of the grouped dimension).

    `value` means what `aggregation` says: a quantity (sum, max, min, latest), a number of
    events or values (count, unique_count), or unit-hours (time_weighted).
    """

    meter: str
    aggregation: str
    bucket_start_time: datetime | None
    dimension_value: str
    value: Decimal


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """A tenant's usage over [start_time, end_time)."""

    name: str
    tenant_id: str
    start_time: datetime
    end_time: datetime
    bucket: TimeBucket | None
    group_by_dimension: str
    aggregates: tuple[UsageAggregate, ...]
    meter_aggregates: tuple[MeterAggregate, ...] = ()  # the meters asked for, if any


@dataclass(frozen=True, slots=True)
class Rate:
    """A unit price of one usage type from `effective_time` on, set at `create_time`."""

    name: str
    service: str
    usage_type: str
    unit_price: Decimal
    currency_code: str
    effective_time: datetime
    create_time: datetime


@dataclass(frozen=True, slots=True)
class InvoiceLineItem:
    """One priced line. `unit_price` is None where no single price applies (graduated tiers)."""

    service: str
    usage_type: str
    quantity: Decimal
    unit_price: Decimal | None
    amount: Decimal
    event_count: int
    kind: str = "usage"  # usage, flat_fee, minimum, adjustment, tax
    description: str = ""  # the line as printed; empty on rate card lines
    charge_key: str = ""  # the plan charge it prices


@dataclass(frozen=True, slots=True)
class InvoicePayment:
    """How collecting a finalized invoice through Stripe stands.

    `state` is simulated (no Stripe key: collected outside Tally), pending, open, paid,
    failed, action_required, uncollectible or void. `stripe_invoice_id` is empty in
    simulation mode and before Stripe created the invoice; `last_failure` empty if no
    attempt failed.
    """

    state: str
    attempt_count: int
    next_attempt_time: datetime | None
    stripe_invoice_id: str
    last_failure: str


@dataclass(frozen=True, slots=True)
class InvoiceParty:
    """The issuer or the customer of a finalized invoice, frozen when it was finalized.

    The issuer has a name, address and tax id; the customer a name, email and tenant id.
    """

    name: str
    address: str = ""
    tax_id: str = ""
    email: str = ""
    tenant_id: str = ""


@dataclass(frozen=True, slots=True)
class Invoice:
    """A tenant's invoice for [period_start_time, period_end_time), with exact amounts.

    `status` is draft, finalized, paid, void or uncollectible. A preview (PreviewInvoice) is not
    stored: its `name` and `invoice_id` are empty.
    """

    name: str
    tenant_id: str
    invoice_id: str
    period_start_time: datetime
    period_end_time: datetime
    currency_code: str
    line_items: tuple[InvoiceLineItem, ...]
    total: Decimal
    status: str
    create_time: datetime
    update_time: datetime
    number: str = ""  # the document number, once finalized
    kind: str = "final"  # final, or interim (billed early: the spend threshold was passed)
    issuer: InvoiceParty | None = None  # None on a draft
    customer: InvoiceParty | None = None  # None on a draft
    finalize_time: datetime | None = None
    paid_time: datetime | None = None
    void_time: datetime | None = None
    uncollectible_time: datetime | None = None
    # Collecting it through Stripe; None on a draft and on invoices finalized before payments existed.
    payment: InvoicePayment | None = None


@dataclass(frozen=True, slots=True)
class GeneratedInvoice:
    """GenerateInvoice's answer: the invoice, and whether it was created.

    `created` False: an existing draft covering the period was recomputed.
    """

    invoice: Invoice
    created: bool


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of the audit trail; `before`/`after` are JSON values (money as strings)."""

    name: str
    create_time: datetime
    principal: str
    request_id: str
    action: str
    tenant_id: str
    resource: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class CancelledEvent:
    """CancelEvent's answer: the event, and when it was cancelled (the first time, if cancelled again)."""

    tenant_id: str
    event_id: str
    cancel_time: datetime


@dataclass(frozen=True, slots=True)
class MeterBackfill:
    """How far a meter's rebuild from the events recorded before its creation has come.

    `end_time` is None while the meter is backfilling, and for sum and count meters, which need none.
    """

    scanned_event_count: int
    counted_event_count: int
    end_time: datetime | None


@dataclass(frozen=True, slots=True)
class Meter:
    """A meter: which events it reads (one usage type, narrowed by `filter`) and how it aggregates them.

    `aggregation` is sum, count, max, min, latest, unique_count or time_weighted; `state`
    active, archived or backfilling. Meters are shared by every tenant.
    """

    name: str
    meter_id: str
    description: str
    service: str
    usage_type: str
    filter: Mapping[str, str]
    aggregation: str
    value_dimension: str
    group_by_dimensions: tuple[str, ...]
    state: str
    create_time: datetime
    archive_time: datetime | None
    backfill: MeterBackfill


@dataclass(frozen=True, slots=True)
class CreditNote:
    """A credit of `amount` (in the invoice's currency) against one of the tenant's invoices."""

    name: str
    tenant_id: str
    credit_note_id: str
    invoice_id: str
    number: str
    currency_code: str
    amount: Decimal
    reason: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class CollectionStatus:
    """How a tenant stands in collections, from its invoices' payments.

    `state` is good_standing, past_due (a failed payment is being retried, or waits for the
    customer) or delinquent (an invoice was written off). The invoices are given by their
    ids (for get_invoice with the tenant id), oldest period first, at most 100 each.
    `update_time` is when the state last changed; None if it never did.
    """

    name: str
    tenant_id: str
    state: str
    past_due_invoices: tuple[str, ...]
    uncollectible_invoices: tuple[str, ...]
    update_time: datetime | None


@dataclass(frozen=True, slots=True)
class WebhookSubscription:
    """Where Tally POSTs the events of `event_types`, signed with a secret that is never returned.

    Event types: invoice.finalized, invoice.paid, invoice.payment_failed,
    invoice.uncollectible, threshold.crossed. Subscriptions receive every tenant's events.
    """

    name: str
    subscription_id: str
    url: str
    event_types: tuple[str, ...]
    description: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class WebhookDeliveryAttempt:
    """One POST of a delivery: the receiver's HTTP status (0 if none came back) and why it failed."""

    attempt_time: datetime
    status_code: int
    error: str


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """The delivery of one event to one subscription; `state` is pending, delivered or failed.

    `next_attempt_time` is set only while pending, `deliver_time` only once delivered;
    attempts stop at `expire_time`.
    """

    name: str
    event_id: str
    event_type: str
    state: str
    attempt_count: int
    attempts: tuple[WebhookDeliveryAttempt, ...]
    next_attempt_time: datetime | None
    create_time: datetime
    deliver_time: datetime | None
    expire_time: datetime | None
