"""The billing values passed between storage, the services and the API layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from server.domain.meters import Meter
from server.domain.pricing import LineItem


@dataclass(frozen=True, slots=True)
class Rate:
    service: str
    usage_type: str
    unit_price: Decimal
    currency: str
    effective_from: datetime
    created_at: datetime


class InvoiceStatus(Enum):
    """Where an invoice is in its life (see server.domain.lifecycle for the moves allowed)."""

    DRAFT = "draft"
    FINALIZED = "finalized"
    PAID = "paid"
    VOID = "void"
    UNCOLLECTIBLE = "uncollectible"


class InvoiceKind(Enum):
    """A period's one final invoice, or an interim one billed when a spend threshold was passed."""

    FINAL = "final"
    INTERIM = "interim"


class PaymentState(Enum):
    """Where collecting a finalized invoice stands (docs/stripe.md; table invoice_payments)."""

    SIMULATED = "simulated"  # no Stripe key configured: nothing was sent
    PENDING = "pending"  # queued for Stripe, not yet open there
    OPEN = "open"
    PAID = "paid"
    FAILED = "failed"
    ACTION_REQUIRED = "action_required"
    UNCOLLECTIBLE = "uncollectible"
    VOID = "void"


@dataclass(frozen=True, slots=True)
class InvoicePayment:
    """A finalized invoice's payment state, mirrored from Stripe."""

    state: PaymentState
    stripe_invoice_id: str | None = None
    attempt_count: int = 0
    next_attempt_time: datetime | None = None
    last_failure: str | None = None
    updated_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Invoice:
    id: str
    tenant_id: str
    period_start: datetime
    period_end: datetime
    currency: str
    lines: tuple[LineItem, ...]
    total: Decimal
    status: InvoiceStatus
    created_at: datetime
    updated_at: datetime
    # When lines and total were computed: updated_at for the stored invoice, the time of
    # the read for a draft priced afresh when read.
    computed_at: datetime
    kind: InvoiceKind = InvoiceKind.FINAL
    number: str = ""  # assigned when finalized
    finalize_time: datetime | None = None
    paid_time: datetime | None = None
    void_time: datetime | None = None
    uncollectible_time: datetime | None = None
    # The issuer and the customer as printed, frozen when finalized (None on a draft).
    parties: Mapping[str, Any] | None = None
    plan_ids: tuple[str, ...] = ()
    payment: InvoicePayment | None = None  # None on a draft (and before payments existed)


@dataclass(frozen=True, slots=True)
class UsageAggregate:
    """One line of a usage summary.

    A read model, shaped for output: the bucket as Unix seconds and the total as a
    canonical exact decimal string (summaries are printed, never computed with).
    """

    tenant_id: str
    service: str
    usage_type: str
    bucket_start_seconds: int | None  # None when the summary has no time buckets
    dimension_value: str
    quantity: str
    event_count: int


@dataclass(frozen=True, slots=True)
class MeterValue:
    """One line of a meter's summary: its value in one bucket and dimension value, as decimal text."""

    tenant_id: str
    meter: Meter
    bucket_start_seconds: int | None
    dimension_value: str
    value: str


@dataclass(frozen=True, slots=True)
class UsageSummary:
    tenant_id: str
    start: datetime
    end: datetime
    bucket: str  # "" (none), "hour", "day" or "month"
    group_by_dimension: str
    aggregates: tuple[UsageAggregate, ...]
    meter_values: tuple[MeterValue, ...] = ()
