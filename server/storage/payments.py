"""Queries on invoice_payments (the payment state of finalized invoices) and the Stripe customer ids."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from server.domain.models import InvoicePayment, PaymentState

_COLUMNS = (
    "invoice_id, state, stripe_invoice_id, attempt_count, next_attempt_time, last_failure, updated_time"
)


def _payment(row: asyncpg.Record) -> InvoicePayment:
    return InvoicePayment(
        state=PaymentState(row["state"]),
        stripe_invoice_id=row["stripe_invoice_id"],
        attempt_count=row["attempt_count"],
        next_attempt_time=row["next_attempt_time"],
        last_failure=row["last_failure"],
        updated_time=row["updated_time"],
    )


async def of_invoices(conn: asyncpg.Connection, invoice_ids: Sequence[str]) -> dict[str, InvoicePayment]:
    """The payment state of each of these invoices that has one (one query for all)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM invoice_payments WHERE invoice_id = ANY($1::text[])", list(invoice_ids)
    )
    return {row["invoice_id"]: _payment(row) for row in rows}


async def get(conn: asyncpg.Connection | asyncpg.Pool, invoice_id: str) -> InvoicePayment | None:
    """The invoice's payment record, or None if it was never finalized."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM invoice_payments WHERE invoice_id = $1", invoice_id)
    return None if row is None else _payment(row)


async def create_many(
    conn: asyncpg.Connection, invoice_ids: Sequence[str], state: PaymentState, at: datetime
) -> None:
    """The invoices' payment rows, when they are finalized (once: a second call changes nothing)."""
    await conn.execute(
        "INSERT INTO invoice_payments (invoice_id, state, updated_time)"
        " SELECT invoice_id, $2, $3 FROM unnest($1::text[]) AS invoice_id"
        " ON CONFLICT (invoice_id) DO NOTHING",
        list(invoice_ids),
        state.value,
        at,
    )


async def note_paid_attempts(conn: asyncpg.Connection, invoice_id: str, attempt_count: int) -> None:
    """Keep Stripe's count of attempts on a paid invoice's payment (never lowering it)."""
    await conn.execute(
        "UPDATE invoice_payments SET attempt_count = $2"
        " WHERE invoice_id = $1 AND state = 'paid' AND attempt_count < $2",
        invoice_id,
        attempt_count,
    )


async def set_stripe_invoice(
    conn: asyncpg.Connection, invoice_id: str, stripe_invoice_id: str, at: datetime
) -> None:
    """Store the id of the Stripe invoice made for the Tally invoice."""
    await conn.execute(
        "UPDATE invoice_payments SET stripe_invoice_id = $2, updated_time = $3 WHERE invoice_id = $1",
        invoice_id,
        stripe_invoice_id,
        at,
    )


async def set_state(
    conn: asyncpg.Connection,
    invoice_id: str,
    state: PaymentState,
    at: datetime,
    *,
    last_failure: str | None = None,
    attempt_count: int | None = None,
) -> None:
    """Move the payment state (a paid invoice is never moved back: Stripe's last word on it)."""
    await conn.execute(
        "UPDATE invoice_payments SET state = $2, updated_time = $3,"
        " last_failure = COALESCE($4, last_failure), attempt_count = COALESCE($5, attempt_count)"
        " WHERE invoice_id = $1 AND (state <> 'paid' OR $2 = 'paid')",
        invoice_id,
        state.value,
        at,
        last_failure,
        attempt_count,
    )


async def note_failure(conn: asyncpg.Connection, invoice_id: str, failure: str, at: datetime) -> None:
    """Why collecting it went wrong, shown with the payment state (which stays as it was)."""
    await conn.execute(
        "UPDATE invoice_payments SET last_failure = $2, updated_time = $3 WHERE invoice_id = $1",
        invoice_id,
        failure,
        at,
    )


async def stripe_customer(conn: asyncpg.Connection, tenant_id: str) -> str | None:
    """The tenant's Stripe customer id, stored on its billing profile (None: not created yet)."""
    value: str | None = await conn.fetchval(
        "SELECT stripe_customer_id FROM billing_profiles WHERE tenant_id = $1", tenant_id
    )
    return value


async def set_stripe_customer(conn: asyncpg.Connection, tenant_id: str, customer_id: str) -> bool:
    """Store the tenant's Stripe customer id; False if the tenant has no billing profile."""
    status: str = await conn.execute(
        "UPDATE billing_profiles SET stripe_customer_id = $2 WHERE tenant_id = $1", tenant_id, customer_id
    )
    return status != "UPDATE 0"
