"""Scenarios 6 and 7: closing a period for 10,000 tenants, and PreviewInvoice at 1M and 10M events.

Scenario 6 loads 10,000 tenants with billing profiles on the default plan (the rate card)
and hourly rollups in all seven usage types over January 2026, straight into the tables,
and makes their close due; then `tally serve` (its period-close task looking every
second) closes them by itself (and then the months after, which are past too: those are
not timed). It measures the time until every invoice is finalized and
checks each total against an independent computation in SQL (per usage type: quantity x
rate, rounded to the cent half away from zero, summed).

Scenario 7 loads one tenant with 1M, then 10M events (as scenario 4) in its open period
and measures PreviewInvoice, which prices the open period live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench import harness, queries
from bench.workload import USAGE_TYPES

TENANTS = 10_000
MONTH = datetime(2026, 1, 1, tzinfo=UTC)
NEXT_MONTH = datetime(2026, 2, 1, tzinfo=UTC)

# One rollup row per tenant, usage type and day of the month: 31 x 7 = 217 rows a tenant.
_LOAD_ROLLUPS = """
INSERT INTO usage_rollups (tenant_id, hour, service, usage_type, dimensions, quantity, event_count)
SELECT 'close-' || t, $1::timestamptz + d * interval '1 day' + (t % 24) * interval '1 hour',
       (ARRAY[{services}])[k], (ARRAY[{types}])[k], '{{}}'::jsonb,
       ((t * 7 + k * 13 + d) % 997 + 1)::numeric / 1000, 3
FROM generate_series(1, $2::int) AS t, generate_series(0, 30) AS d, generate_series(1, 7) AS k
"""
_LOAD_PROFILES = """
INSERT INTO billing_profiles (tenant_id, display_name, email, currency, anchor_day, billing_start,
                              closed_until, next_close_time)
SELECT 'close-' || t, 'Tenant ' || t, '', 'USD', 1, $1, $1, $2
FROM generate_series(1, $3::int) AS t
"""
_LOAD_PLANS = """
INSERT INTO tenant_plans (tenant_id, effective_from, plan_id)
SELECT 'close-' || t, $1, 'default' FROM generate_series(1, $2::int) AS t
"""
# The expected total of each tenant, computed apart from the server's code.
_EXPECTED = """
SELECT u.tenant_id, sum(round(u.quantity * r.unit_price, 2)) AS total
FROM (SELECT tenant_id, service, usage_type, sum(quantity) AS quantity FROM usage_rollups
      WHERE tenant_id LIKE 'close-%' GROUP BY 1, 2, 3) u
JOIN rates r ON r.service = u.service AND r.usage_type = u.usage_type AND r.effective_from = 'epoch'
GROUP BY 1
"""


async def _load(dsn: str, tenants: int) -> None:
    services = ", ".join(f"'{s}'" for s, _ in USAGE_TYPES)
    types = ", ".join(f"'{t}'" for _, t in USAGE_TYPES)
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})
    try:
        async with conn.transaction():
            await conn.execute(_LOAD_ROLLUPS.format(services=services, types=types), MONTH, tenants)
            # Not due yet: the close starts once everything is loaded and analyzed.
            await conn.execute(_LOAD_PROFILES, MONTH, datetime.max.replace(tzinfo=UTC), tenants)
            await conn.execute(_LOAD_PLANS, MONTH, tenants)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def _make_due(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE billing_profiles SET next_close_time = $1 WHERE tenant_id LIKE 'close-%'",
            NEXT_MONTH + timedelta(hours=1),
        )
    finally:
        await conn.close()


async def _wait_for_invoices(dsn: str, tenants: int, limit_seconds: float) -> tuple[float, int]:
    conn = await asyncpg.connect(dsn)
    began = time.perf_counter()
    try:
        while time.perf_counter() - began < limit_seconds:
            # The month loaded; later months (all in the past too) are closed after it.
            done: int = await conn.fetchval(
                "SELECT count(*) FROM invoices WHERE tenant_id LIKE 'close-%' AND status = 'finalized'"
                " AND period_start = $1",
                MONTH,
            )
            if done >= tenants:
                return time.perf_counter() - began, done
            await asyncio.sleep(0.25)
        return time.perf_counter() - began, done
    finally:
        await conn.close()


async def _check(dsn: str) -> tuple[int, int]:
    """(invoices whose total matches the independent computation, invoices)."""
    conn = await asyncpg.connect(dsn)
    try:
        expected = {r["tenant_id"]: r["total"] for r in await conn.fetch(_EXPECTED)}
        rows = await conn.fetch(
            "SELECT tenant_id, total, period_start, period_end FROM invoices WHERE tenant_id LIKE 'close-%'"
        )
        exact = sum(
            1
            for r in rows
            if r["total"] == expected[r["tenant_id"]]
            and (r["period_start"], r["period_end"]) == (MONTH, NEXT_MONTH)
        )
        return exact, len(rows)
    finally:
        await conn.close()


def scenario_close(tenants: int = TENANTS, timeout: float = 600.0) -> dict[str, Any]:
    """Scenario 6: `tenants` periods made due, closed by the server; time until all are finalized.

    Returns a row with the rate and whether every invoice total matched the SQL computation.
    Gives up after `timeout` seconds.
    """
    # The server's period-close task looks every second; the clock starts when the closes are due.
    with harness.stack(["--period-close-interval", "1"]) as stack:
        began = time.perf_counter()
        asyncio.run(_load(stack.dsn, tenants))
        print(f"  loaded {tenants} tenants in {time.perf_counter() - began:.0f} s", flush=True)
        asyncio.run(_make_due(stack.dsn))
        seconds, done = asyncio.run(_wait_for_invoices(stack.dsn, tenants, timeout))
        exact, invoices = asyncio.run(_check(stack.dsn))
    row = {
        "tenants": tenants,
        "finalized": done,
        "seconds": round(seconds, 1),
        "invoices_per_s": round(done / seconds),
        "exact": exact,
        "invoices": invoices,
    }
    print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def scenario_preview(
    sizes: list[int], run_client: Callable[..., tuple[dict[str, Any], Any]]
) -> list[dict[str, Any]]:
    """Scenario 7: PreviewInvoice latency (p50, p99) for one tenant per size in `sizes` events."""
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    rows = []
    with harness.stack() as stack:
        for events in sizes:
            tenant = f"preview-{events}"
            seconds = asyncio.run(queries.load(stack.dsn, tenant, events, start))
            asyncio.run(_profile(stack.dsn, tenant, start))
            print(f"  loaded {events} events for {tenant} in {seconds:.0f} s", flush=True)
        for events in sizes:
            result, _ = run_client(
                "query",
                "--kind",
                "preview",
                "--tenant",
                f"preview-{events}",
                "--start",
                "0",
                "--end",
                "0",
                "--count",
                "40",
                stack=stack,
            )
            row = {
                "events": events,
                "preview_p50_ms": round(result["p50_ms"], 1),
                "preview_p99_ms": round(result["p99_ms"], 1),
            }
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    return rows


async def _profile(dsn: str, tenant: str, start: datetime) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO billing_profiles (tenant_id, display_name, email, currency, anchor_day,"
            " billing_start, closed_until, next_close_time)"
            " VALUES ($1, $1, '', 'USD', 1, $2, $2, 'infinity')",
            tenant,
            start,
        )
        await conn.execute(
            "INSERT INTO tenant_plans (tenant_id, effective_from, plan_id) VALUES ($1, $2, 'default')",
            tenant,
            start,
        )
    finally:
        await conn.close()
