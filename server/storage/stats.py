"""Figures about the whole service, for the metrics gauges: read-only, cheap, bounded in time.

Totals come from the hourly rollups, not from the events: the rollups are far fewer rows,
and they keep counting events whose raw rows retention has dropped. Every query runs
with a statement timeout, so a scrape never waits long on a busy database.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

ACTIVE_DAYS = 30

_EVENTS = "SELECT coalesce(sum(event_count), 0)::bigint FROM usage_rollups"
# Tenants with usage in the last ACTIVE_DAYS days (the rollups' hour index serves the range).
_ACTIVE_TENANTS = """
SELECT count(DISTINCT tenant_id) FROM usage_rollups WHERE hour >= now() - make_interval(days => $1)
"""
_INVOICES = """
SELECT status, currency, count(*), coalesce(sum(total), 0)
FROM invoices GROUP BY status, currency ORDER BY status, currency
"""


@dataclass(frozen=True, slots=True)
class InvoiceFigures:
    """The number and total amount of the invoices in one state and currency."""

    state: str
    currency: str
    count: int
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Figures:
    """The service-wide figures behind the metrics gauges."""

    events: int  # usage events ever recorded
    active_tenants: int  # tenants with usage in the last ACTIVE_DAYS days
    invoices: tuple[InvoiceFigures, ...]


async def read_figures(pool: asyncpg.Pool, *, timeout_seconds: float) -> Figures:
    """The figures, in one read-only transaction; asyncpg's errors (a timeout included) pass through."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute(
            "SELECT set_config('statement_timeout', $1, true)", f"{int(timeout_seconds * 1000)}ms"
        )
        events = await conn.fetchval(_EVENTS, timeout=timeout_seconds)
        tenants = await conn.fetchval(_ACTIVE_TENANTS, ACTIVE_DAYS, timeout=timeout_seconds)
        rows = await conn.fetch(_INVOICES, timeout=timeout_seconds)
    return Figures(
        int(events), int(tenants), tuple(InvoiceFigures(r[0], r[1], int(r[2]), Decimal(r[3])) for r in rows)
    )
