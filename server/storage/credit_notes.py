"""Queries on credit_notes: created inside the transaction that locks their invoice, and listed."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal

import asyncpg

from server.domain.models import CreditNote
from server.storage.database import run_with_retries

_COLUMNS = (
    "id, tenant_id, invoice_id, number, currency, amount, reason, parties::text AS parties, create_time"
)


def _note(row: asyncpg.Record) -> CreditNote:
    return CreditNote(
        id=row["id"],
        tenant_id=row["tenant_id"],
        invoice_id=row["invoice_id"],
        number=row["number"],
        currency=row["currency"],
        amount=row["amount"],
        reason=row["reason"],
        parties=json.loads(row["parties"]),
        create_time=row["create_time"],
    )


async def get(conn: asyncpg.Connection, note_id: str) -> CreditNote | None:
    """The credit note `note_id`, or None."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM credit_notes WHERE id = $1", note_id)
    return None if row is None else _note(row)


async def credited(conn: asyncpg.Connection, invoice_id: str) -> Decimal:
    """The sum of the invoice's credit notes so far."""
    total: Decimal = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM credit_notes WHERE invoice_id = $1", invoice_id
    )
    return total


async def insert(conn: asyncpg.Connection, note: CreditNote) -> CreditNote:
    """Store a credit note, inside the caller's transaction (which holds its invoice locked)."""
    row = await conn.fetchrow(
        f"""INSERT INTO credit_notes (id, tenant_id, invoice_id, number, currency, amount, reason, parties,
                                      create_time, issuer)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10) RETURNING {_COLUMNS}""",
        note.id,
        note.tenant_id,
        note.invoice_id,
        note.number,
        note.currency,
        note.amount,
        note.reason,
        json.dumps(note.parties, sort_keys=True),
        note.create_time,
        note.parties["issuer"]["name"],
    )
    return _note(row)


class CreditNoteStore:
    """Lists credit notes; they are created by `insert` in their invoice's transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def list_for_tenant(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[CreditNote]:
        """The tenant's credit notes, oldest first, after the page key (create_time, id)."""

        async def attempt() -> list[CreditNote]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM credit_notes WHERE tenant_id = $1"
                    " AND ($2::timestamptz IS NULL OR (create_time, id) > ($2, $3))"
                    " ORDER BY create_time, id LIMIT $4",
                    tenant_id,
                    after[0] if after else None,
                    after[1] if after else "",
                    limit,
                )
            return [_note(row) for row in rows]

        return await run_with_retries(attempt)
