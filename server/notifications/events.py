"""Publishing an event: one call, inside the transaction of the change it reports.

`publish(conn, event_type, data)` stores the event with a fresh id (what receivers
deduplicate on) and a delivery per subscription of its type, each with an outbox job
`webhook.deliver`, all in the caller's transaction: the event goes out if and only if the
change commits. Nothing is stored when no subscription wants the type.

The event types are constants; `data` is a JSON object of strings, numbers as exact decimal
strings (docs/notifications.md lists each type's fields). invoice_data() gives the invoice
events their common shape. All of them live below this module, re-exported here: the types
and invoice_data in server.domain.webhooks, publish in server.storage.webhooks (so that a
billing transaction publishes without this package: server.domain.stores.BillingTransaction).
"""

from __future__ import annotations

from server.domain.webhooks import (
    EVENT_TYPES,
    INVOICE_FINALIZED,
    INVOICE_PAID,
    INVOICE_PAYMENT_FAILED,
    INVOICE_UNCOLLECTIBLE,
    THRESHOLD_CROSSED,
    invoice_data,
)
from server.storage.webhooks import publish, publish_many

__all__ = [
    "EVENT_TYPES",
    "INVOICE_FINALIZED",
    "INVOICE_PAID",
    "INVOICE_PAYMENT_FAILED",
    "INVOICE_UNCOLLECTIBLE",
    "THRESHOLD_CROSSED",
    "invoice_data",
    "publish",
    "publish_many",
]
