"""The audit trail's values: who changed which money rule, when, in which request, from what to what.

Besides rate changes and invoices, the trail records backfills: usage recorded for times
older than the ingestion window changes the totals of past periods.

Entries are written in the same transaction as the change they describe, so the trail
has an entry for every committed change and none for a change that was rolled back.
States are plain JSON objects with exact decimal strings, never floats.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from server.domain.access import Caller
from server.domain.decimals import MINOR_UNITS, format_money, format_price, format_quantity
from server.domain.events import EventKey, EventRow
from server.domain.models import Invoice, Rate
from server.domain.timeutil import to_datetime


class AuditAction(StrEnum):
    """What kind of change an entry records; the value is what audit_events.action stores."""

    RATE_SET = "rate_set"
    INVOICE_CREATED = "invoice_created"
    INVOICE_RECOMPUTED = "invoice_recomputed"
    USAGE_BACKFILLED = "usage_backfilled"
    INVOICE_FINALIZED = "invoice_finalized"
    INVOICE_PAID = "invoice_paid"
    INVOICE_VOIDED = "invoice_voided"
    INVOICE_UNCOLLECTIBLE = "invoice_uncollectible"
    CREDIT_NOTE_CREATED = "credit_note_created"
    PLAN_CREATED = "plan_created"
    PLAN_VERSION_CREATED = "plan_version_created"
    BILLING_PROFILE_SET = "billing_profile_set"
    METER_CREATED = "meter_created"
    METER_ARCHIVED = "meter_archived"
    USAGE_EVENT_CANCELLED = "usage_event_cancelled"
    WEBHOOK_SUBSCRIPTION_CREATED = "webhook_subscription_created"
    WEBHOOK_SUBSCRIPTION_DELETED = "webhook_subscription_deleted"
    # Payments through Stripe (server.payments): failures and retries, refunds, disputes, and
    # the tenant's collection status that follows from them.
    PAYMENT_FAILED = "payment_failed"
    PAYMENT_REFUNDED = "payment_refunded"
    PAYMENT_DISPUTED = "payment_disputed"
    COLLECTION_STATUS_CHANGED = "collection_status_changed"


State = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A change to record. tenant_id is "" for changes to the shared rate card."""

    principal: str
    request_id: str
    action: AuditAction
    tenant_id: str
    resource: str
    before: State | None
    after: State | None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """A recorded entry, with its position in the trail and the time of its transaction."""

    id: int
    time: datetime
    entry: AuditEntry


def rate_resource(rate: Rate) -> str:
    """The audit entry's resource of a rate: rates/{service}/{usage_type}/{effective time}."""
    return f"rates/{rate.service}/{rate.usage_type}/{rate.effective_from.isoformat()}"


def rate_state(rate: Rate) -> State:
    """A rate as recorded in an audit entry's before and after: money as decimal strings."""
    return {
        "service": rate.service,
        "usage_type": rate.usage_type,
        "unit_price": format_price(rate.unit_price, MINOR_UNITS.get(rate.currency, 2)),
        "currency_code": rate.currency,
        "effective_time": rate.effective_from.isoformat(),
    }


def invoice_state(invoice: Invoice) -> State:
    """An invoice as recorded in an audit entry's before and after: money as decimal strings."""
    minor = MINOR_UNITS.get(invoice.currency, 2)
    state: dict[str, Any] = {
        "status": invoice.status.value,
        "currency_code": invoice.currency,
        "total": format_money(invoice.total, minor),
        "period_start": invoice.period_start.isoformat(),
        "period_end": invoice.period_end.isoformat(),
        "line_items": [
            {
                "service": line.service,
                "usage_type": line.usage_type,
                "quantity": format_quantity(line.quantity),
                "unit_price": "" if line.unit_price is None else format_price(line.unit_price, minor),
                "amount": format_money(line.amount, minor),
            }
            | (
                {}
                if line.kind.value == "usage"
                else {"kind": line.kind.value, "description": line.description}
            )
            for line in invoice.lines
        ],
    }
    if invoice.number:
        state["number"] = invoice.number
    if invoice.kind.value != "final":
        state["kind"] = invoice.kind.value
    return state


def backfill_entries(
    caller: Caller, rows: Mapping[EventKey, EventRow], new_keys: Set[EventKey]
) -> list[AuditEntry]:
    """One entry per tenant that got new events from a backfilled batch.

    `rows` are the batch's valid events and `new_keys` those of them recorded now (the
    others were duplicates). A tenant whose events were all duplicates changed nothing
    and gets no entry.
    """
    by_tenant: dict[str, list[EventRow]] = {}
    for row in rows.values():
        by_tenant.setdefault(row.tenant_id, []).append(row)
    entries = []
    for tenant_id in sorted(by_tenant):
        tenant_rows = by_tenant[tenant_id]
        new = [row for row in tenant_rows if row.key in new_keys]
        if not new:
            continue
        times = [row.time_micros for row in new]
        entries.append(
            AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=AuditAction.USAGE_BACKFILLED,
                tenant_id=tenant_id,
                resource=f"tenants/{tenant_id}/usage",
                before=None,
                after={
                    "accepted_count": len(new),
                    "duplicate_count": len(tenant_rows) - len(new),
                    "first_event_time": to_datetime(min(times)).isoformat(),
                    "last_event_time": to_datetime(max(times)).isoformat(),
                    "usage_types": sorted({f"{row.service}/{row.usage_type}" for row in new}),
                },
            )
        )
    return entries
