"""Publishing an event: one call, inside the transaction of the change it reports.

`publish(conn, event_type, data)` stores the event with a fresh id (what receivers deduplicate
on) and a delivery per subscription of its type, each with an outbox job `webhook.deliver`,
all in the caller's transaction: the event goes out if and only if the change commits. Nothing
is stored when no subscription wants the type.

The event types are the constants below (re-exported from server.domain.webhooks); `data` is
a JSON object of strings, numbers as exact decimal strings (docs/notifications.md lists each
type's fields). invoice_data() gives the invoice events their common shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from server.domain.decimals import MINOR_UNITS, format_money
from server.domain.models import Invoice
from server.domain.names import invoice_name
from server.domain.webhooks import (
    DELIVERY_WINDOW,
    EVENT_TYPES,
    INVOICE_FINALIZED,
    INVOICE_PAID,
    INVOICE_PAYMENT_FAILED,
    INVOICE_UNCOLLECTIBLE,
    THRESHOLD_CROSSED,
    rfc3339,
)
from server.notifications.delivery import DELIVER_JOB
from server.payments.outbox import enqueue
from server.storage import webhooks

__all__ = [
    "EVENT_TYPES",
    "INVOICE_FINALIZED",
    "INVOICE_PAID",
    "INVOICE_PAYMENT_FAILED",
    "INVOICE_UNCOLLECTIBLE",
    "THRESHOLD_CROSSED",
    "invoice_data",
    "publish",
]


async def publish(
    conn: asyncpg.Connection,
    event_type: str,
    data: Mapping[str, Any],
    *,
    time: datetime | None = None,
) -> str | None:
    """Publish an event in the caller's transaction; its id, or None if nobody subscribes to its type.

    `time` is the event's time, from which its deliveries are due and retried for 3 days: pass
    the time of the change from the caller's clock (tests step fake ones); without it, the
    transaction's start time from the database.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    if time is None:
        time = await conn.fetchval("SELECT now()")
    assert time is not None
    event_id = f"evt_{uuid.uuid4().hex}"
    body = json.dumps(dict(data), sort_keys=True)
    deliveries = await webhooks.insert_event(conn, event_id, event_type, body, time, time + DELIVERY_WINDOW)
    for delivery_id in deliveries:
        await enqueue(conn, DELIVER_JOB, str(delivery_id), due=time)
    return event_id if deliveries else None


async def publish_many(
    conn: asyncpg.Connection, event_type: str, datas: Sequence[Mapping[str, Any]], *, time: datetime
) -> None:
    """`publish` of many events of one type (a period close's block); one query when nobody subscribes."""
    if not datas or not await webhooks.has_subscribers(conn, event_type):
        return
    for data in datas:
        await publish(conn, event_type, data, time=time)


def invoice_data(invoice: Invoice, **extra: str) -> dict[str, str]:
    """The fields every invoice event carries (plus `extra`, e.g. a failure's reason)."""
    minor = MINOR_UNITS.get(invoice.currency, 2)
    data = {
        "invoice": invoice_name(invoice.tenant_id, invoice.id),
        "tenant_id": invoice.tenant_id,
        "number": invoice.number,
        "kind": invoice.kind.value,
        "status": invoice.status.value,
        "currency_code": invoice.currency,
        "total": format_money(invoice.total, minor),
        "period_start_time": rfc3339(invoice.period_start),
        "period_end_time": rfc3339(invoice.period_end),
    }
    data.update(extra)
    return data
