"""The Stripe events Tally applies, read from a verified delivery into plain typed values.

Only the fields Tally uses are read, and each defensively: an endpoint may be pinned to an
older or newer Stripe API version than the SDK's, and a field that a version lacks reads
as absent rather than failing the delivery. Amounts stay in the currency's minor units, as
Stripe sends them (integers, never floats).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

# The metadata key the push puts on every Stripe invoice it creates.
TALLY_INVOICE_KEY = "tally_invoice_id"


class EventType(Enum):
    """The event types Tally acts on; the others are stored and acknowledged, nothing more."""

    INVOICE_PAID = "invoice.paid"
    PAYMENT_FAILED = "invoice.payment_failed"
    ACTION_REQUIRED = "invoice.payment_action_required"
    INVOICE_VOIDED = "invoice.voided"
    MARKED_UNCOLLECTIBLE = "invoice.marked_uncollectible"
    CHARGE_REFUNDED = "charge.refunded"
    DISPUTE_CREATED = "charge.dispute.created"


INVOICE_EVENTS = frozenset(
    {
        EventType.INVOICE_PAID,
        EventType.PAYMENT_FAILED,
        EventType.ACTION_REQUIRED,
        EventType.INVOICE_VOIDED,
        EventType.MARKED_UNCOLLECTIBLE,
    }
)


@dataclass(frozen=True, slots=True)
class StripeEvent:
    """One delivered event. `kind` is None for a type Tally does not act on.

    For invoice events `stripe_invoice_id` is the object's id; for charges and disputes it
    is the invoice the object names, if the API version still has that field. `refs` are
    the ids of the payment objects involved (charges, payment intents): a dispute names its
    charge, and a charge may no longer name its invoice, so these tie them back to one.
    """

    id: str
    type: str
    kind: EventType | None
    created: datetime
    object_id: str
    stripe_invoice_id: str | None
    tally_invoice_id: str | None
    attempt_count: int
    failure: str
    amount_minor: int  # charge.refunded: amount_refunded; dispute: amount; invoices: amount_paid
    currency: str
    refs: tuple[str, ...]


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping):  # an expanded object instead of its id
        return _text(value.get("id"))
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _payment_refs(obj: Mapping[str, Any]) -> list[str]:
    """The charge and payment intent ids an invoice or charge names, in any API version."""
    refs = [_text(obj.get(key)) for key in ("charge", "payment_intent")]
    payments = obj.get("payments")  # invoices from API 2025-03-31 on: data[].payment.{charge,payment_intent}
    if isinstance(payments, Mapping) and isinstance(payments.get("data"), list):
        for item in payments["data"]:
            payment = item.get("payment") if isinstance(item, Mapping) else None
            if isinstance(payment, Mapping):
                refs.extend(_text(payment.get(key)) for key in ("charge", "payment_intent"))
    return [ref for ref in refs if ref]


def _failure(obj: Mapping[str, Any]) -> str:
    error = obj.get("last_payment_error")  # on payment intents; invoices carry none
    if isinstance(error, Mapping):
        parts = [_text(error.get(key)) for key in ("code", "decline_code", "message")]
        return ": ".join(part for part in parts if part)[:500]
    return ""


def read_event(values: Mapping[str, Any]) -> StripeEvent:
    """A verified event's fields; ValueError if it lacks an id, a type or an object."""
    event_id, event_type = _text(values.get("id")), _text(values.get("type"))
    data = values.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if event_id is None or event_type is None or not isinstance(obj, Mapping):
        raise ValueError("an event needs an id, a type and data.object")
    try:
        kind: EventType | None = EventType(event_type)
    except ValueError:
        kind = None
    metadata = obj.get("metadata")
    tally_invoice_id = _text(metadata.get(TALLY_INVOICE_KEY)) if isinstance(metadata, Mapping) else None
    object_id = _text(obj.get("id")) or ""
    refs = _payment_refs(obj)
    if kind in INVOICE_EVENTS:
        stripe_invoice_id: str | None = object_id or None
        amount = _int(obj.get("amount_paid"))
    else:
        stripe_invoice_id = _text(obj.get("invoice"))
        amount = _int(obj.get("amount_refunded" if kind is EventType.CHARGE_REFUNDED else "amount"))
        if kind is EventType.CHARGE_REFUNDED and object_id:
            refs.insert(0, object_id)
    return StripeEvent(
        id=event_id,
        type=event_type,
        kind=kind,
        created=datetime.fromtimestamp(_int(values.get("created")), UTC),
        object_id=object_id,
        stripe_invoice_id=stripe_invoice_id,
        tally_invoice_id=tally_invoice_id,
        attempt_count=_int(obj.get("attempt_count")),
        failure=_failure(obj),
        amount_minor=amount,
        currency=(_text(obj.get("currency")) or "").upper(),
        refs=tuple(dict.fromkeys(refs)),
    )
