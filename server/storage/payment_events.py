"""Queries of Stripe webhooks and dunning: the event store, payment rows, collection status.

Every function runs on the caller's connection, inside the transaction that applies one
event or one retry outcome, so the event's row, the payment's change, the invoice's status
and their audit entries commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from server.domain.models import PaymentState
from server.payments.events import StripeEvent
from server.payments.states import CollectionState, Payment

_PAYMENT_COLUMNS = (
    "invoice_id, state, stripe_invoice_id, attempt_count, next_attempt_time, last_failure, first_failure_time"
)


async def record_event(conn: asyncpg.Connection, event: StripeEvent, payload: str, at: datetime) -> bool:
    """Store a delivered event once; False if its id was stored before (a redelivery).

    A concurrent delivery of the same id waits on the primary key until this transaction
    ends, then finds the row: the event is applied by exactly one of them.
    """
    inserted = await conn.fetchval(
        "INSERT INTO stripe_events (id, type, object_id, created_time, receive_time, outcome, payload)"
        " VALUES ($1, $2, $3, $4, $5, 'ignored', $6::jsonb) ON CONFLICT (id) DO NOTHING RETURNING true",
        event.id,
        event.type,
        event.object_id,
        event.created,
        at,
        payload,
    )
    return bool(inserted)


async def set_outcome(conn: asyncpg.Connection, event_id: str, outcome: str, invoice_id: str | None) -> None:
    """Record what a stored event did (applied, unchanged, unmatched...) and its invoice."""
    await conn.execute(
        "UPDATE stripe_events SET outcome = $2, invoice_id = $3 WHERE id = $1", event_id, outcome, invoice_id
    )


async def find_invoice(conn: asyncpg.Connection, event: StripeEvent) -> tuple[str, str] | None:
    """(invoice id, tenant id) of the Tally invoice an event is about, or None.

    By the push's metadata on the Stripe invoice, else by the Stripe invoice id the push
    stored, else by a charge or payment intent seen on one of the invoice's earlier events.
    """
    if event.tally_invoice_id is not None:
        row = await conn.fetchrow("SELECT id, tenant_id FROM invoices WHERE id = $1", event.tally_invoice_id)
        if row is not None:
            return row["id"], row["tenant_id"]
    if event.stripe_invoice_id is not None:
        row = await conn.fetchrow(
            "SELECT i.id, i.tenant_id FROM invoice_payments p JOIN invoices i ON i.id = p.invoice_id"
            " WHERE p.stripe_invoice_id = $1",
            event.stripe_invoice_id,
        )
        if row is not None:
            return row["id"], row["tenant_id"]
    if event.refs:
        row = await conn.fetchrow(
            "SELECT i.id, i.tenant_id FROM stripe_payment_refs r JOIN invoices i ON i.id = r.invoice_id"
            " WHERE r.ref = ANY($1::text[]) LIMIT 1",
            list(event.refs),
        )
        if row is not None:
            return row["id"], row["tenant_id"]
    return None


async def remember_refs(conn: asyncpg.Connection, invoice_id: str, refs: Sequence[str]) -> None:
    """Remember the Stripe objects (charges, payment intents) that name the invoice, for later events."""
    if refs:
        await conn.execute(
            "INSERT INTO stripe_payment_refs (ref, invoice_id) SELECT unnest($1::text[]), $2"
            " ON CONFLICT (ref) DO NOTHING",
            list(refs),
            invoice_id,
        )


def _payment(row: asyncpg.Record) -> Payment:
    return Payment(
        invoice_id=row["invoice_id"],
        state=PaymentState(row["state"]),
        stripe_invoice_id=row["stripe_invoice_id"],
        attempt_count=row["attempt_count"] or 0,
        next_attempt_time=row["next_attempt_time"],
        last_failure=row["last_failure"] or "",
        first_failure_time=row["first_failure_time"],
    )


async def lock_payment(conn: asyncpg.Connection, invoice_id: str) -> Payment | None:
    """The invoice's payment row, locked until the transaction ends; None if it has none yet."""
    row = await conn.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM invoice_payments WHERE invoice_id = $1 FOR UPDATE", invoice_id
    )
    return None if row is None else _payment(row)


async def read_payment(conn: asyncpg.Connection, invoice_id: str) -> Payment | None:
    """The invoice's payment row as the rules see it, or None."""
    row = await conn.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM invoice_payments WHERE invoice_id = $1", invoice_id
    )
    return None if row is None else _payment(row)


async def save_payment(conn: asyncpg.Connection, payment: Payment, at: datetime) -> None:
    """Write the columns webhooks and dunning own; the push's other columns stay as they are."""
    await conn.execute(
        "INSERT INTO invoice_payments (invoice_id, state, stripe_invoice_id, attempt_count,"
        " next_attempt_time, last_failure, first_failure_time, updated_time)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (invoice_id) DO UPDATE SET state = excluded.state,"
        " stripe_invoice_id = coalesce(invoice_payments.stripe_invoice_id, excluded.stripe_invoice_id),"
        " attempt_count = excluded.attempt_count, next_attempt_time = excluded.next_attempt_time,"
        " last_failure = excluded.last_failure, first_failure_time = excluded.first_failure_time,"
        " updated_time = excluded.updated_time",
        payment.invoice_id,
        payment.state.value,
        payment.stripe_invoice_id,
        payment.attempt_count,
        payment.next_attempt_time,
        payment.last_failure,
        payment.first_failure_time,
        at,
    )


# Payments still owed: failed or written off, on an invoice not since paid or voided by hand
# (BillingService's MarkInvoicePaid / VoidInvoice settle it whatever Stripe last said).
_OUTSTANDING = (
    "p.state IN ('uncollectible', 'failed', 'action_required') AND i.status NOT IN ('paid', 'void')"
)


async def collection_counts(conn: asyncpg.Connection, tenant_id: str) -> tuple[int, int]:
    """(uncollectible, past due) counts of the tenant's invoice payments."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE p.state = 'uncollectible') AS uncollectible,"
        " count(*) FILTER (WHERE p.state IN ('failed', 'action_required')) AS past_due"
        " FROM invoices i JOIN invoice_payments p ON p.invoice_id = i.id"
        f" WHERE i.tenant_id = $1 AND {_OUTSTANDING}",
        tenant_id,
    )
    return row["uncollectible"], row["past_due"]


async def collection(conn: asyncpg.Connection, tenant_id: str) -> tuple[CollectionState, datetime] | None:
    """The tenant's recorded collection status and when it was set; None: never recorded."""
    row = await conn.fetchrow(
        "SELECT state, update_time FROM tenant_collections WHERE tenant_id = $1", tenant_id
    )
    return None if row is None else (CollectionState(row["state"]), row["update_time"])


async def set_collection(
    conn: asyncpg.Connection, tenant_id: str, state: CollectionState, at: datetime
) -> None:
    """Record a tenant's new collection state."""
    await conn.execute(
        "INSERT INTO tenant_collections (tenant_id, state, update_time) VALUES ($1, $2, $3)"
        " ON CONFLICT (tenant_id) DO UPDATE SET state = excluded.state, update_time = excluded.update_time",
        tenant_id,
        state.value,
        at,
    )


async def past_due_invoices(conn: asyncpg.Connection, tenant_id: str, limit: int) -> list[tuple[str, str]]:
    """(invoice id, payment state) of the tenant's invoices that are past due or uncollectible."""
    rows = await conn.fetch(
        "SELECT i.id, p.state FROM invoices i JOIN invoice_payments p ON p.invoice_id = i.id"
        f" WHERE i.tenant_id = $1 AND {_OUTSTANDING} ORDER BY i.period_start, i.id LIMIT $2",
        tenant_id,
        limit,
    )
    return [(r["id"], r["state"]) for r in rows]
