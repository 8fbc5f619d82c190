"""The audit trail's values: who changed which money rule, when, in which request, from what to what.

Entries are written in the same transaction as the change they describe, so the trail
has an entry for every committed change and none for a change that was rolled back.
States are plain JSON objects with exact decimal strings, never floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from server.domain.decimals import MINOR_UNITS, format_money, format_price, format_quantity
from server.domain.models import Invoice, Rate

RATE_SET: Final = "rate_set"
INVOICE_CREATED: Final = "invoice_created"
INVOICE_RECOMPUTED: Final = "invoice_recomputed"

State = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A change to record. tenant_id is "" for changes to the shared rate card."""

    principal: str
    request_id: str
    action: str
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
    return f"rates/{rate.service}/{rate.usage_type}/{rate.effective_from.isoformat()}"


def rate_state(rate: Rate) -> State:
    return {
        "service": rate.service,
        "usage_type": rate.usage_type,
        "unit_price": format_price(rate.unit_price, MINOR_UNITS.get(rate.currency, 2)),
        "currency_code": rate.currency,
        "effective_time": rate.effective_from.isoformat(),
    }


def invoice_state(invoice: Invoice) -> State:
    minor = MINOR_UNITS.get(invoice.currency, 2)
    return {
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
                "unit_price": format_price(line.unit_price, minor),
                "amount": format_money(line.amount, minor),
            }
            for line in invoice.lines
        ],
    }
