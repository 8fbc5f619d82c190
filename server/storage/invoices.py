"""Queries on invoices and their line items, and the priced usage they are computed from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal

import asyncpg

from server.domain.audit import AuditEntry
from server.domain.models import Invoice, InvoiceStatus
from server.domain.pricing import LineItem, PricedUsage
from server.domain.requests import RequestKey
from server.storage import audit, request_ids
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


async def _priced_usage(
    conn: asyncpg.Connection, tenant_id: str, periods: Sequence[Period]
) -> dict[str, list[PricedUsage | None]]:
    """Per period label, the tenant's usage per type and price; None stands for usage no rate covers."""
    found: dict[str, list[PricedUsage | None]] = {label: [] for label, _, _ in periods}
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
            None
            if row["unit_price"] is None
            else PricedUsage(
                service=row["service"],
                usage_type=row["usage_type"],
                unit_price=row["unit_price"],
                quantity=row["quantity"],
                event_count=row["event_count"],
            )
        )
    return found


_INVOICE_COLUMNS = "id, tenant_id, period_start, period_end, currency, total, status, created_at, updated_at"
_LINE_COLUMNS = "invoice_id, service, usage_type, quantity, unit_price, amount, event_count"


async def _load(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> list[Invoice]:
    """Attach the line items to invoice rows (one query for all of them)."""
    lines: dict[str, list[LineItem]] = {row["id"]: [] for row in rows}
    if rows:
        for line in await conn.fetch(
            f"SELECT {_LINE_COLUMNS} FROM invoice_line_items WHERE invoice_id = ANY($1::text[])"
            " ORDER BY invoice_id, position",
            list(lines),
        ):
            lines[line["invoice_id"]].append(
                LineItem(
                    service=line["service"],
                    usage_type=line["usage_type"],
                    quantity=line["quantity"],
                    unit_price=line["unit_price"],
                    amount=line["amount"],
                    event_count=line["event_count"],
                )
            )
    return [
        Invoice(
            id=row["id"],
            tenant_id=row["tenant_id"],
            period_start=row["period_start"],
            period_end=row["period_end"],
            currency=row["currency"],
            lines=tuple(lines[row["id"]]),
            total=row["total"],
            status=InvoiceStatus(row["status"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            computed_at=row["updated_at"],
        )
        for row in rows
    ]


class InvoiceTransaction:
    """The reads and writes of one invoice generation, inside one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def overlapping(
        self, tenant_id: str, start: datetime, end: datetime
    ) -> list[tuple[str, datetime, datetime, InvoiceStatus]]:
        """(id, period_start, period_end, status) of the tenant's invoices overlapping [start, end)."""
        rows = await self._conn.fetch(
            "SELECT id, period_start, period_end, status FROM invoices"
            " WHERE tenant_id = $1 AND period_start < $3 AND period_end > $2 ORDER BY period_start",
            tenant_id,
            start,
            end,
        )
        return [(r["id"], r["period_start"], r["period_end"], InvoiceStatus(r["status"])) for r in rows]

    async def priced_usage(self, tenant_id: str, start: datetime, end: datetime) -> list[PricedUsage | None]:
        """The tenant's usage per type and price; None stands for usage that no rate covers."""
        return (await _priced_usage(self._conn, tenant_id, [("", start, end)]))[""]

    async def claim(self, key: RequestKey) -> bytes | None:
        """Claim a request's key for this change; the first call's response if it ran before."""
        return await request_ids.claim(self._conn, key)

    async def complete(self, key: RequestKey, response: bytes) -> None:
        """Store the response of the change that claimed `key`, committed (or not) with it."""
        await request_ids.complete(self._conn, key, response)

    async def append_audit(self, entry: AuditEntry) -> None:
        """Record the change in the audit trail, committed (or not) with it."""
        await audit.append(self._conn, entry)

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
    ) -> None:
        """Insert or overwrite the draft invoice and replace its lines."""
        await self._conn.execute(
            """INSERT INTO invoices (id, tenant_id, period_start, period_end, currency, total, status)
               VALUES ($1, $2, $3, $4, $5, $6, 'draft')
               ON CONFLICT (id) DO UPDATE
                   SET total = excluded.total, currency = excluded.currency, updated_at = now()""",
            invoice_id,
            tenant_id,
            start,
            end,
            currency,
            total,
        )
        await self._conn.execute("DELETE FROM invoice_line_items WHERE invoice_id = $1", invoice_id)
        if lines:
            await self._conn.executemany(
                """INSERT INTO invoice_line_items
                       (invoice_id, position, service, usage_type, quantity, unit_price, amount, event_count)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
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
                    )
                    for position, line in enumerate(lines)
                ],
            )


class InvoiceStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def tenant_transaction(self, tenant_id: str) -> AsyncIterator[InvoiceTransaction]:
        """A transaction holding the tenant's invoice lock: generations of one tenant run one at a time."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('invoices:' || $1, 0))", tenant_id
            )
            yield InvoiceTransaction(conn)

    async def get(self, invoice_id: str) -> Invoice | None:
        async def attempt() -> Invoice | None:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1", invoice_id)
                invoices = await _load(conn, rows)
            return invoices[0] if invoices else None

        return await run_with_retries(attempt)

    async def priced_usage(
        self, tenant_id: str, periods: Sequence[Period]
    ) -> dict[str, list[PricedUsage | None]]:
        """The tenant's usage over each period, now, per type and price (see InvoiceTransaction)."""

        async def attempt() -> dict[str, list[PricedUsage | None]]:
            async with self._pool.acquire() as conn:
                return await _priced_usage(conn, tenant_id, periods)

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
