"""`meters-statement`: what the extra meters add to the batch statement, without the server.

The `meters-ingest` scenario measures the target (the whole pipeline's rate), but on the
2-core machine its variants' rates swing by 10% from one stack to the next, as much as a
change to the write path is worth. This scenario isolates the statement that records a
batch (`UsageStore.record_new_keys`) and pairs each batch with itself: two fresh
PostgreSQL instances, one with the seven default SUM meters only and one with the
`meters-ingest` scenario's three extra meters, take the same batches of 500 events (or
`--statement-events`: a write lane merges waiting batches into one transaction)
(the benchmark workload's tenants, usage types, regions and quantities, times within the
last 10 minutes) one after the other, alternating which goes first. Both see the machine
in the same state, so the median of the per-batch ratios moves 1-3% from run to run
where the rates of whole runs move by 10%.

It reports, per UNIQUE_COUNT variant ("new values", "seen values": see bench.meters),
the median batch time on each side, that median of per-batch ratios, and what matching
the batch to the meters costs the server in Python (`MeterMap.contributions`).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import asyncpg

from bench import harness, meters, workload
from server.domain.events import EventRow, columns_of
from server.domain.meters import Contributions, MeterMap
from server.storage.database import create_pool
from server.storage.meters import MeterStore
from server.storage.migrations import migrate
from server.storage.usage import UsageStore

DEFAULT_EVENTS = 500  # per batch; a write lane's transactions averaged about 800 in meters-ingest
WARMUP = 100  # batches recorded on both sides before timing starts
_VARIANTS = {"new values": meters.EXTRA_METERS, "seen values": meters.SEEN_VALUES_METERS}


def _batch(rng: random.Random, number: int, now: float, size: int) -> list[EventRow]:
    """One batch as the workload makes them (bench.workload)."""
    rows = []
    for i in range(size):
        service, usage_type = workload.USAGE_TYPES[rng.randrange(len(workload.USAGE_TYPES))]
        region = workload.REGIONS[rng.randrange(len(workload.REGIONS))]
        rows.append(
            EventRow(
                workload.TENANTS[rng.randrange(len(workload.TENANTS))],
                f"evt-{number}-{i:05d}",
                service,
                usage_type,
                f"{rng.randrange(1, 100_000) / 1000:.3f}",
                int((now - rng.random() * 600) * 1_000_000),
                f'{{"region":"{region}"}}',  # the server's form (server.domain.events)
            )
        )
    return rows


async def _open(
    dsn: str, extra: list[tuple[str, str, str, str, str, list[str]]]
) -> tuple[asyncpg.Pool, MeterMap]:
    """A migrated database with the extra meters (none for the default side): its pool and meters."""
    pool = await create_pool(dsn, min_size=1, max_size=1)
    await migrate(pool)
    await meters._create_meters(dsn, extra)
    return pool, MeterMap(await MeterStore(pool).all())


async def _variant(
    batches: int, size: int, extra: list[tuple[str, str, str, str, str, list[str]]]
) -> dict[str, Any]:
    with harness.postgres() as (plain_dsn, _), harness.postgres() as (metered_dsn, _):
        plain_pool, _ = await _open(plain_dsn, [])
        metered_pool, meter_map = await _open(metered_dsn, extra)
        try:
            plain, metered = UsageStore(plain_pool, plain_pool), UsageStore(metered_pool, metered_pool)
            rng, now = random.Random(1), time.time()
            seconds: dict[str, list[float]] = {"default": [], "metered": []}
            matching: list[float] = []
            for number in range(WARMUP + batches):
                rows = _batch(rng, number, now, size)
                columns = columns_of({row.key: row for row in rows})
                started = time.perf_counter()
                contributions: Contributions = meter_map.contributions(rows)
                matching.append(time.perf_counter() - started)
                sides = [("default", plain, None), ("metered", metered, contributions)]
                for side, store, entries in sides if number % 2 == 0 else reversed(sides):
                    started = time.perf_counter()
                    await store.record_new_keys(columns, contributions=entries)
                    if number >= WARMUP:
                        seconds[side].append(time.perf_counter() - started)
        finally:
            await plain_pool.close()
            await metered_pool.close()
        ratios = [m / d for m, d in zip(seconds["metered"], seconds["default"], strict=True)]
        return {
            "default_ms": round(statistics.median(seconds["default"]) * 1000, 2),
            "metered_ms": round(statistics.median(seconds["metered"]) * 1000, 2),
            "ratio": round(statistics.median(ratios), 3),
            "matching_ms": round(statistics.median(matching[WARMUP:]) * 1000, 2),
        }


def scenario_statement(batches: int, size: int = DEFAULT_EVENTS) -> list[dict[str, Any]]:
    """`meters-statement`: per variant, the paired per-batch cost of the statement with the extra meters."""
    rows = []
    for variant, extra in _VARIANTS.items():
        row = {
            "unique_count": variant,
            "batches": batches,
            "events": size,
            **asyncio.run(_variant(batches, size, extra)),
        }
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows
