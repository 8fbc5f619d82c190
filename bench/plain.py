"""Scenario 2: the same rows written straight into PostgreSQL, without Tally in between.

The fastest plain methods we know, each doing the same work as Tally (dedup on the
idempotency key, the events, the hourly rollups, in one transaction per batch, with the
real schema from the migrations): COPY into a temporary staging table then one
INSERT ... SELECT from it; and INSERT ... SELECT FROM unnest(arrays), Tally's own method.
The best of them is the physical limit the server is compared with.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from bench import harness, workload
from bench.locks import LockSampler
from server.domain.timeutil import to_datetime
from server.storage.database import create_pool
from server.storage.migrations import migrate
from server.storage.usage import RECORD_FROM

_STAGING = """CREATE TEMPORARY TABLE IF NOT EXISTS staging (
    tenant_id text, event_id text, service text, usage_type text, quantity text,
    time_micros bigint, dimensions text) ON COMMIT DELETE ROWS"""
_COLUMNS = ["tenant_id", "event_id", "service", "usage_type", "quantity", "time_micros", "dimensions"]
# The same without the rollup upsert: what PostgreSQL takes when writers share no rows (keys,
# with what a cancellation needs, and events only), to tell PostgreSQL's limit from the rollups.
_WITHOUT_ROLLUPS = RECORD_FROM.split("), rolled_up AS (")[0] + ")\n{result}\n"


def _dedupe_sorted(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """What Tally does to each batch before writing it: first occurrence wins, key order."""
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    for row in rows:
        seen.setdefault((row[0], row[1]), row)
    return [seen[key] for key in sorted(seen)]


async def _write(
    dsn: str, method: str, batches: list[list[tuple[Any, ...]]], connections: int, rollups: bool = True
) -> float:
    pool = await create_pool(dsn, min_size=connections, max_size=connections)
    await migrate(pool)
    times = [row[5] for batch in batches for row in batch]
    for instant in (min(times), max(times)):  # the workload spans minutes: at most two months
        await pool.execute("SELECT tally_event_partition($1)", to_datetime(instant))
    count = "SELECT count(*) FROM new_keys"
    statement = RECORD_FROM if rollups else _WITHOUT_ROLLUPS
    copy_sql = statement.format(source="SELECT * FROM staging", meters="", result=count)
    unnest_sql = statement.format(
        source="SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
        "$6::bigint[], $7::text[]) AS t(" + ", ".join(_COLUMNS) + ")",
        meters="",
        result=count,
    )
    queue: asyncio.Queue[list[tuple[Any, ...]]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async def worker() -> None:
        async with pool.acquire() as conn:
            await conn.execute(_STAGING)
            while not queue.empty():
                batch = queue.get_nowait()
                if method == "copy":
                    async with conn.transaction():
                        await conn.copy_records_to_table("staging", records=batch, columns=_COLUMNS)
                        await conn.fetchval(copy_sql)
                else:
                    await conn.fetchval(unnest_sql, *[list(column) for column in zip(*batch, strict=True)])

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(connections)])
    elapsed = time.perf_counter() - started
    await pool.close()
    return elapsed


def scenario(events: int, batch_sizes: list[int], streams: list[int]) -> list[dict[str, Any]]:
    """Scenario 2: `events` events written straight into PostgreSQL by each plain method.

    Runs COPY and unnest over each count of connections in `streams`, in batches of the
    largest of `batch_sizes`; each row has the rate and PostgreSQL's CPU.
    """
    rows = workload.rows(events)
    results = []
    batch = max(batch_sizes)
    prepared = [_dedupe_sorted(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    for method in ("copy", "unnest"):
        for connections in streams:
            with harness.stack(with_server=False) as stack:
                with harness.Meter(stack) as meter:
                    asyncio.run(_write(stack.dsn, method, prepared, connections))
                committed = asyncio.run(_count(stack.dsn))
            row = {
                "method": "COPY + INSERT SELECT" if method == "copy" else "INSERT SELECT unnest",
                "batch": batch,
                "connections": connections,
                "committed": committed,
                "seconds": round(meter.elapsed, 2),
                "events_per_s": round(committed / meter.elapsed),
                "postgres_cpu": round(meter.postgres_cpu * 100),
            }
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            results.append(row)
    return results


def scenario_connections(events: int, batch: int, connections: list[int]) -> list[dict[str, Any]]:
    """COPY + INSERT SELECT over several connections, with and without the rollup upsert."""
    rows = workload.rows(events)
    prepared = [_dedupe_sorted(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    results = []
    for rollups in (True, False):
        for n in connections:
            with harness.stack(with_server=False) as stack:
                with harness.Meter(stack) as meter, LockSampler(stack.dsn) as locks:
                    asyncio.run(_write(stack.dsn, "copy", prepared, n, rollups))
                committed = asyncio.run(_count(stack.dsn))
            row = {
                "plain": "keys+events+rollups" if rollups else "keys+events",
                "connections": n,
                "batch": batch,
                "committed": committed,
                "events_per_s": round(committed / meter.elapsed),
                "postgres_cpu": round(meter.postgres_cpu * 100),
                **locks.per_batch(len(prepared)),
            }
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            results.append(row)
    return results


async def _count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM usage_events")
        return count
    finally:
        await conn.close()
