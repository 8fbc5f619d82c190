"""Queries on invoices and their line items, and the priced usage they are computed from."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from server.domain.audit import AuditEntry
from server.domain.charges import TierPortion
from server.domain.models import Invoice, InvoiceKind, InvoicePayment, InvoiceStatus
from server.domain.pricing import LineItem, LineKind
from server.domain.requests import RequestKey
from server.storage import audit, payments, request_ids
from server.storage.database import run_with_retries

# Usage of tenant $1 over each period [$3[i], $4[i]) (labelled $2[i]) per usage type
# and unit price. Each rate holds from its effective_from until the next rate of its
# usage type; rollups are hourly and rates change on whole hours, so each hour has
# exactly one price. Hours without a rate (impossible through the API) come back with
# a NULL unit_price. Several periods in one query, so that a page of drafts is priced
# in one round trip.
_PRICED_USAGE = """
WITH periods AS (
    SELECT * FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[])
        AS p(label, period_start, period_end)
), rate_periods AS (
    SELECT service, usage_type, unit_price, effective_from,
           lead(effective_from, 1, 'infinity') OVER (
               PARTITION BY service, usage_type ORDER BY effective_from) AS effective_until
    FROM rates
), hourly AS (
    SELECT pe.label, u.service, u.usage_type, u.hour,
           sum(u.quantity) AS quantity, sum(u.event_count) AS event_count
    FROM periods pe
    JOIN usage_rollups u
      ON u.tenant_id = $1 AND u.hour >= pe.period_start AND u.hour < pe.period_end
    GROUP BY 1, 2, 3, 4
)
SELECT h.label, h.service, h.usage_type, p.unit_price,
       sum(h.quantity) AS quantity, sum(h.event_count)::bigint AS event_count
FROM hourly h
LEFT JOIN rate_periods p
       ON p.service = h.service AND p.usage_type = h.usage_type
      AND h.hour >= p.effective_from AND h.hour < p.effective_until
GROUP BY 1, 2, 3, 4
"""

Period = tuple[str, datetime, datetime]  # (label, start, end)


UsageRow = tuple[
    str, str, Decimal | None, Decimal, int
]  # (service, usage_type, unit price, quantity, events)


async def _usage_rows(
    conn: asyncpg.Connection, tenant_id: str, periods: Sequence[Period]
) -> dict[str, list[UsageRow]]:
    """Per period label, the tenant's usage per type and rate card price (None: no rate covers it)."""
    found: dict[str, list[UsageRow]] = {label: [] for label, _, _ in periods}
    if not periods:
        return found
    rows = await conn.fetch(
        _PRICED_USAGE,
        tenant_id,
        [label for label, _, _ in periods],
        [start for _, start, _ in periods],
        [end for _, _, end in periods],
    )
    for row in rows:
        found[row["label"]].append(
            (row["service"], row["usage_type"], row["unit_price"], row["quantity"], row["event_count"])
        )
    return found


_INVOICE_COLUMNS = (
    "id, tenant_id, period_start, period_end, currency, total, status, created_at, updated_at, kind, number,"
    " finalize_time, paid_time, void_time, uncollectible_time, parties::text AS parties, plan_ids"
)
_LINE_COLUMNS = (
    "l.invoice_id, l.service, l.usage_type, l.quantity, l.unit_price, l.amount, l.event_count, l.kind,"
    " l.description, l.charge_key, l.period_start, l.period_end, l.tiers::text AS tiers"
)


def _tiers_json(tiers: Sequence[TierPortion]) -> str:
    return json.dumps(
        [
            {
                "tier": t.tier,
                "above": str(t.above),
                "up_to": None if t.up_to is None else str(t.up_to),
                "quantity": str(t.quantity),
                "unit_price": str(t.unit_price),
                "flat_fee": str(t.flat_fee),
                "amount": str(t.amount),
            }
            for t in tiers
        ]
    )


def _tiers(text: str) -> tuple[TierPortion, ...]:
    return tuple(
        TierPortion(
            tier=t["tier"],
            above=Decimal(t["above"]),
            up_to=None if t["up_to"] is None else Decimal(t["up_to"]),
            quantity=Decimal(t["quantity"]),
            unit_price=Decimal(t["unit_price"]),
            flat_fee=Decimal(t["flat_fee"]),
            amount=Decimal(t["amount"]),
        )
        for t in json.loads(text)
    )


def line_item(line: asyncpg.Record) -> LineItem:
    return LineItem(
        service=line["service"],
        usage_type=line["usage_type"],
        quantity=line["quantity"],
        unit_price=line["unit_price"],
        amount=line["amount"],
        event_count=line["event_count"],
        kind=LineKind(line["kind"]),
        description=line["description"],
        charge_key=line["charge_key"],
        period_start=line["period_start"],
        period_end=line["period_end"],
        tiers=_tiers(line["tiers"]),
    )


async def _load(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> list[Invoice]:
    """Attach the line items to invoice rows (one query for all of them)."""
    lines: dict[str, list[LineItem]] = {row["id"]: [] for row in rows}
    found: dict[str, InvoicePayment] = {}
    if rows:
        for line in await conn.fetch(
            f"SELECT {_LINE_COLUMNS} FROM invoice_line_items l WHERE l.invoice_id = ANY($1::text[])"
            " ORDER BY l.invoice_id, l.position",
            list(lines),
        ):
            lines[line["invoice_id"]].append(line_item(line))
        if any(row["status"] != "draft" for row in rows):
            found = await payments.of_invoices(conn, list(lines))
    return [_invoice(row, tuple(lines[row["id"]]), found.get(row["id"])) for row in rows]


def _invoice(
    row: asyncpg.Record, lines: tuple[LineItem, ...], payment: InvoicePayment | None = None
) -> Invoice:
    return Invoice(
        id=row["id"],
        tenant_id=row["tenant_id"],
        period_start=row["period_start"],
        period_end=row["period_end"],
        currency=row["currency"],
        lines=lines,
        total=row["total"],
        status=InvoiceStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        computed_at=row["finalize_time"] or row["updated_at"],
        kind=InvoiceKind(row["kind"]),
        number=row["number"] or "",
        finalize_time=row["finalize_time"],
        paid_time=row["paid_time"],
        void_time=row["void_time"],
        uncollectible_time=row["uncollectible_time"],
        parties=None if row["parties"] is None else json.loads(row["parties"]),
        plan_ids=tuple(row["plan_ids"]),
        payment=payment,
    )


class InvoiceTransaction:
    """The reads and writes of one invoice generation, inside one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @property
    def connection(self) -> asyncpg.Connection:
        """The transaction's connection, for the other stores' queries in the same transaction."""
        return self._conn

    async def lock_tenant(self, tenant_id: str) -> None:
        """Hold the tenant's invoice lock until the transaction ends (see InvoiceStore.tenant_transaction)."""
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('invoices:' || $1, 0))", tenant_id
        )

    async def overlapping(
        self, tenant_id: str, start: datetime, end: datetime
    ) -> list[tuple[str, datetime, datetime, InvoiceStatus]]:
        """(id, period_start, period_end, status) of the tenant's final invoices overlapping [start, end).

        Void invoices no longer hold their period; interim invoices belong to their period's
        final invoice and never count as an overlap.
        """
        rows = await self._conn.fetch(
            "SELECT id, period_start, period_end, status FROM invoices"
            " WHERE tenant_id = $1 AND period_start < $3 AND period_end > $2"
            " AND status <> 'void' AND kind = 'final' ORDER BY period_start",
            tenant_id,
            start,
            end,
        )
        return [(r["id"], r["period_start"], r["period_end"], InvoiceStatus(r["status"])) for r in rows]

    async def usage_rows(self, tenant_id: str, periods: Sequence[Period]) -> dict[str, list[UsageRow]]:
        """The tenant's usage per labelled period, per type and rate card price (None: no rate)."""
        return await _usage_rows(self._conn, tenant_id, periods)

    async def billed_lines(
        self, tenant_id: str, start: datetime, end: datetime
    ) -> list[tuple[datetime, datetime, LineItem]]:
        """(period_start, period_end, line) of the billed lines that bear on pricing [start, end).

        Billed: finalized, paid or uncollectible (a void invoice was withdrawn). They are the
        lines of invoices of periods ending by `start`, of the interim invoices of [start, end),
        and every adjustment of an earlier period wherever it was billed. Adjustment lines name
        the period they correct in their own period_start/period_end.
        """
        rows = await self._conn.fetch(
            f"SELECT i.period_start AS invoice_start, i.period_end AS invoice_end, {_LINE_COLUMNS}"
            " FROM invoices i JOIN invoice_line_items l ON l.invoice_id = i.id"
            " WHERE i.tenant_id = $1 AND i.status IN ('finalized', 'paid', 'uncollectible')"
            " AND (i.period_end <= $2 OR (i.kind = 'interim' AND i.period_start = $2 AND i.period_end = $3)"
            "      OR (l.kind = 'adjustment' AND l.period_end <= $2))"
            " ORDER BY i.period_start, l.invoice_id, l.position",
            tenant_id,
            start,
            end,
        )
        return [(r["invoice_start"], r["invoice_end"], line_item(r)) for r in rows]

    async def lock(self, invoice_id: str) -> Invoice | None:
        """The invoice, its row locked until the transaction ends."""
        rows = await self._conn.fetch(
            f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1 FOR UPDATE", invoice_id
        )
        invoices = await _load(self._conn, rows)
        return invoices[0] if invoices else None

    async def next_number(self, issuer: str, prefix: str) -> int:
        """The next number of the (issuer, prefix) sequence, taken in this transaction.

        The counter row stays locked until commit, so concurrent finalizations from any
        process wait for each other; a rollback gives the number back. No gap, no repeat.
        """
        number: int = await self._conn.fetchval(
            "INSERT INTO document_sequences AS s (issuer, prefix, last_number) VALUES ($1, $2, 1)"
            " ON CONFLICT (issuer, prefix) DO UPDATE SET last_number = s.last_number + 1"
            " RETURNING last_number",
            issuer,
            prefix,
        )
        return number

    async def finalize(
        self,
        invoice_id: str,
        number: str,
        parties: Mapping[str, Any],
        plan_ids: Sequence[str],
        at: datetime,
        lines: Sequence[LineItem],
    ) -> Invoice:
        """Freeze a draft whose `lines` were just saved: number it, mark it finalized, return it.

        One round trip (RETURNING, the lines as saved): it runs while the numbering
        sequence's row is locked, which every concurrent finalization waits for.
        """
        row = await self._conn.fetchrow(
            "UPDATE invoices SET status = 'finalized', number = $2, parties = $3::jsonb, plan_ids = $4,"
            " finalize_time = $5, issuer = $6, updated_at = now() WHERE id = $1 AND status = 'draft'"
            f" RETURNING {_INVOICE_COLUMNS}",
            invoice_id,
            number,
            json.dumps(parties, sort_keys=True),
            list(plan_ids),
            at,
            parties["issuer"]["name"],
        )
        return _invoice(row, tuple(lines))

    async def set_status(self, invoice_id: str, status: InvoiceStatus, at: datetime) -> None:
        """Move a finalized invoice along its lifecycle, stamping the time of the new status."""
        column = {
            InvoiceStatus.PAID: "paid_time",
            InvoiceStatus.VOID: "void_time",
            InvoiceStatus.UNCOLLECTIBLE: "uncollectible_time",
        }[status]
        await self._conn.execute(
            f"UPDATE invoices SET status = $2, {column} = $3 WHERE id = $1", invoice_id, status.value, at
        )

    async def claim(self, key: RequestKey) -> bytes | None:
        """Claim a request's key for this change; the first call's response if it ran before."""
        return await request_ids.claim(self._conn, key)

    async def complete(self, key: RequestKey, response: bytes) -> None:
        """Store the response of the change that claimed `key`, committed (or not) with it."""
        await request_ids.complete(self._conn, key, response)

    async def append_audit(self, entry: AuditEntry) -> None:
        """Record the change in the audit trail, committed (or not) with it."""
        await audit.append(self._conn, entry)

    async def find(self, invoice_id: str) -> Invoice | None:
        """The invoice (not locked), or None."""
        rows = await self._conn.fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1", invoice_id)
        invoices = await _load(self._conn, rows)
        return invoices[0] if invoices else None

    async def load(self, invoice_id: str) -> Invoice:
        rows = await self._conn.fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1", invoice_id)
        return (await _load(self._conn, rows))[0]

    async def save(
        self,
        invoice_id: str,
        tenant_id: str,
        start: datetime,
        end: datetime,
        currency: str,
        total: Decimal,
        lines: Sequence[LineItem],
        kind: InvoiceKind = InvoiceKind.FINAL,
    ) -> None:
        """Insert or overwrite the draft invoice and replace its lines."""
        await self._conn.execute(
            """INSERT INTO invoices (id, tenant_id, period_start, period_end, currency, total, status, kind)
               VALUES ($1, $2, $3, $4, $5, $6, 'draft', $7)
               ON CONFLICT (id) DO UPDATE
                   SET total = excluded.total, currency = excluded.currency, updated_at = now()""",
            invoice_id,
            tenant_id,
            start,
            end,
            currency,
            total,
            kind.value,
        )
        await self._conn.execute("DELETE FROM invoice_line_items WHERE invoice_id = $1", invoice_id)
        if lines:
            await self._conn.executemany(
                """INSERT INTO invoice_line_items
                       (invoice_id, position, service, usage_type, quantity, unit_price, amount, event_count,
                        kind, description, charge_key, period_start, period_end, tiers)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb)""",
                [
                    (
                        invoice_id,
                        position,
                        line.service,
                        line.usage_type,
                        line.quantity,
                        line.unit_price,
                        line.amount,
                        line.event_count,
                        line.kind.value,
                        line.description,
                        line.charge_key,
                        line.period_start,
                        line.period_end,
                        _tiers_json(line.tiers),
                    )
                    for position, line in enumerate(lines)
                ],
            )


class InvoiceStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[InvoiceTransaction]:
        """A read-only, repeatable-read transaction: several queries see one snapshot."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield InvoiceTransaction(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[InvoiceTransaction]:
        """A plain transaction, for changes that lock what they touch themselves."""
        async with self._pool.acquire() as conn, conn.transaction():
            yield InvoiceTransaction(conn)

    @asynccontextmanager
    async def tenant_transaction(self, tenant_id: str) -> AsyncIterator[InvoiceTransaction]:
        """A transaction holding the tenant's invoice lock: generations of one tenant run one at a time."""
        async with self._pool.acquire() as conn, conn.transaction():
            tx = InvoiceTransaction(conn)
            await tx.lock_tenant(tenant_id)
            yield tx

    @asynccontextmanager
    async def try_tenant_transaction(self, tenant_id: str) -> AsyncIterator[InvoiceTransaction | None]:
        """Like tenant_transaction, but None at once if another transaction holds the tenant's lock."""
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtextextended('invoices:' || $1, 0))", tenant_id
            )
            yield InvoiceTransaction(conn) if locked else None

    async def with_threshold(self) -> list[str]:
        """Tenants whose billing profile has a spend threshold."""

        async def attempt() -> list[str]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT tenant_id FROM billing_profiles WHERE spend_threshold IS NOT NULL"
                    " ORDER BY tenant_id"
                )
            return [r["tenant_id"] for r in rows]

        return await run_with_retries(attempt)

    async def due_for_close(self, now: datetime, limit: int) -> list[str]:
        """Tenants whose next period close is due at `now` (not locked: each close checks again)."""

        async def attempt() -> list[str]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT tenant_id FROM billing_profiles WHERE next_close_time <= $1"
                    " ORDER BY next_close_time, tenant_id LIMIT $2",
                    now,
                    limit,
                )
            return [r["tenant_id"] for r in rows]

        return await run_with_retries(attempt)

    async def get(self, invoice_id: str) -> Invoice | None:
        async def attempt() -> Invoice | None:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1", invoice_id)
                invoices = await _load(conn, rows)
            return invoices[0] if invoices else None

        return await run_with_retries(attempt)

    async def list_for_tenant(
        self, tenant_id: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Invoice]:
        """Invoices of a tenant, newest period first, after the page key (period_start, id)."""

        async def attempt() -> list[Invoice]:
            async with self._pool.acquire() as conn:
                if before is None:
                    rows = await conn.fetch(
                        f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE tenant_id = $1"
                        " ORDER BY period_start DESC, id DESC LIMIT $2",
                        tenant_id,
                        limit,
                    )
                else:
                    rows = await conn.fetch(
                        f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE tenant_id = $1"
                        " AND (period_start, id) < ($2, $3)"
                        " ORDER BY period_start DESC, id DESC LIMIT $4",
                        tenant_id,
                        before[0],
                        before[1],
                        limit,
                    )
                return await _load(conn, rows)

        return await run_with_retries(attempt)
