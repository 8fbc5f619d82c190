"""Scenario 4: summary and invoice latency for one tenant holding 1M and 10M events over 30 days.

The events are loaded straight into the real tables with generate_series (through the
server it would take minutes and measure ingestion again), in exactly the shape the
server writes: idempotency keys, monthly event partitions and hourly rollups. Each event
has one of the 7 default usage types and one of 4 regions, so the month holds
720 hours x 7 types x 4 regions = 20,160 rollup rows per tenant whatever its event count.
Summaries and invoices read only those rollups, so their latency must not grow with events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench import harness
from bench.workload import USAGE_TYPES

DAYS = 30
_LOAD_KEYS = """
INSERT INTO usage_event_keys (tenant_id, event_id)
SELECT $1, 'e' || g FROM generate_series(1, $2::bigint) AS g
"""
_LOAD_EVENTS = """
INSERT INTO usage_events (tenant_id, event_id, service, usage_type, quantity, event_time, dimensions)
SELECT $1, 'e' || g,
       (ARRAY[{services}])[g % 7 + 1], (ARRAY[{types}])[g % 7 + 1],
       ((g % 1000) + 1)::numeric / 100,
       $3::timestamptz + (g * ($4::bigint / $2::bigint)) * interval '1 microsecond',
       jsonb_build_object('region', (ARRAY['eu-west-1','us-east-1','us-west-2','ap-south-1'])[g % 4 + 1])
FROM generate_series(1, $2::bigint) AS g
"""
_LOAD_ROLLUPS = """
INSERT INTO usage_rollups (tenant_id, hour, service, usage_type, dimensions, quantity, event_count)
SELECT tenant_id, date_trunc('hour', event_time, 'UTC'), service, usage_type, dimensions,
       sum(quantity), count(*)
FROM usage_events WHERE tenant_id = $1
GROUP BY 1, 2, 3, 4, 5
"""


async def load(dsn: str, tenant: str, events: int, start: datetime) -> float:
    """Load `events` events of `tenant` over DAYS days from `start` straight into the tables.

    Writes them as the server would (keys, partitions, rollups) and returns the seconds the
    load took.
    """
    services = ", ".join(f"'{s}'" for s, _ in USAGE_TYPES)
    types = ", ".join(f"'{t}'" for _, t in USAGE_TYPES)
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})
    try:
        for month in (start, start + timedelta(days=DAYS)):
            await conn.execute("SELECT tally_event_partition($1)", month)
        began = time.perf_counter()
        span_micros = DAYS * 86_400 * 1_000_000 - 1
        async with conn.transaction():
            await conn.execute(_LOAD_KEYS, tenant, events)
            await conn.execute(
                _LOAD_EVENTS.format(services=services, types=types), tenant, events, start, span_micros
            )
            await conn.execute(_LOAD_ROLLUPS, tenant)
        await conn.execute("VACUUM ANALYZE usage_rollups")
        return time.perf_counter() - began
    finally:
        await conn.close()


def scenario(sizes: list[int], run_client: Callable[..., tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
    """Scenario 4: summary (hourly, daily) and invoice latency for one tenant per size in `sizes`."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = start + timedelta(days=DAYS)
    rows = []
    with harness.stack() as stack:
        for events in sizes:
            tenant = f"bench-{events}"
            seconds = asyncio.run(load(stack.dsn, tenant, events, start))
            print(f"  loaded {events} events for {tenant} in {seconds:.0f} s", flush=True)
        for events in sizes:
            tenant = f"bench-{events}"
            row: dict[str, Any] = {"events": events}
            for kind in ("summary-hour", "summary-day", "invoice"):
                result, _ = run_client(
                    "query",
                    "--kind",
                    kind,
                    "--tenant",
                    tenant,
                    "--start",
                    str(int(start.timestamp())),
                    "--end",
                    str(int(end.timestamp())),
                    "--count",
                    "40",
                    stack=stack,
                )
                row[f"{kind}_p50_ms"] = round(result["p50_ms"], 1)
                row[f"{kind}_p99_ms"] = round(result["p99_ms"], 1)
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    return rows
