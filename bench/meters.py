"""Meters in the benchmark (issue 10): what extra aggregations cost ingestion, and their query latency.

`meters-ingest`: bulk ingestion (StreamUsage, batches of 500, 4 streams) with the seven
default SUM meters only, and with three more meters (MAX of compute/cpu_hour, a
UNIQUE_COUNT of analytics/query, TIME_WEIGHTED of storage/gb_hour per region),
interleaved run by run on fresh stacks, with lock waits sampled (bench.locks). The
target: with the extra meters, at least 0.85x the rate without (median of the runs).
The UNIQUE_COUNT comes in two variants, the two ends of what it can cost:
- "new values": distinct quantities per region, where nearly every event brings a value
  its hour, day and month have not seen (two rows, an hour's and a month's, and the
  counts of its hour);
- "seen values": distinct regions, where nearly every event repeats a value its hour has
  seen already (one row, a carrier's, and one probe), as active users do once they are
  active.

`meters-query`: one tenant's 30 days at 1M and 10M events, loaded straight into the
tables in the shape the server writes them (as bench.queries does for rollups), then 40
GetUsageSummary calls per aggregation (read_mask `meter_aggregates`: the meter alone), and
of the usage types' summary as the run's yardstick, with daily buckets and with one value
for the month (the calendar month; the data covers its first 30 days). UNIQUE_COUNT reads values
of up to 100,000 users: 1/7 of the events carry one.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench import harness, queries
from bench.locks import LockSampler
from server.storage.folding import Folder

EXTRA_METERS = [
    # (name, service, usage type, aggregation, value dimension, group by)
    ("peak-cpu", "compute", "cpu_hour", "max", "", ["region"]),
    ("distinct-query-sizes", "analytics", "query", "unique_count", "", ["region"]),
    ("storage-gb-hours", "storage", "gb_hour", "time_weighted", "", ["region"]),
]
# The same with a UNIQUE_COUNT whose values repeat (see the module docstring).
_REGIONS_QUERIED = ("regions-queried", "analytics", "query", "unique_count", "region", [])
SEEN_VALUES_METERS = [meter if meter[3] != "unique_count" else _REGIONS_QUERIED for meter in EXTRA_METERS]
_VARIANTS = {
    "default meters": [],
    "+MAX, UNIQUE_COUNT (new values), TIME_WEIGHTED": EXTRA_METERS,
    "+MAX, UNIQUE_COUNT (seen values), TIME_WEIGHTED": SEEN_VALUES_METERS,
}
_CREATE = """
INSERT INTO meters (name, service, usage_type, aggregation, value_dimension, group_by)
VALUES ($1, $2, $3, $4, $5, $6) RETURNING id
"""


async def _create_meters(dsn: str, meters: list[tuple[str, str, str, str, str, list[str]]]) -> dict[str, int]:
    """Meters straight into the table: the server picks them up within its 2 s cache age."""
    conn = await asyncpg.connect(dsn)
    try:
        return {m[0]: await conn.fetchval(_CREATE, *m) for m in meters}
    finally:
        await conn.close()


def scenario_ingest(
    events: int, runs: int, run_client: Callable[..., tuple[dict[str, Any], Any]]
) -> list[dict[str, Any]]:
    """`meters-ingest`: StreamUsage ingestion with the default meters only and with three more.

    The variants alternate on fresh stacks, `runs` times each (the order turns each run);
    each row has the rate, the CPU of both processes and the lock wait per batch. Prints
    each variant's ratio of the medians to the default meters'.
    """
    rows = []
    for run in range(runs):
        order = list(_VARIANTS) if run % 2 == 0 else list(reversed(_VARIANTS))
        for variant in order:
            with harness.stack() as stack:
                if _VARIANTS[variant]:
                    asyncio.run(_create_meters(stack.dsn, _VARIANTS[variant]))
                    time.sleep(2.5)  # the server's meter cache age
                with LockSampler(stack.dsn) as locks:
                    result, meter = run_client(
                        "ingest",
                        "--method",
                        "stream",
                        "--batch",
                        "500",
                        "--streams",
                        "4",
                        "--events",
                        str(events),
                        stack=stack,
                    )
                batches = -(-events // 500)
                row = {
                    "run": run,
                    "meters": variant,
                    "events_per_s": round(result["distinct"] / meter.elapsed),
                    "server_cpu": round(meter.server_cpu * 100),
                    "postgres_cpu": round(meter.postgres_cpu * 100),
                    **locks.per_batch(batches),
                }
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    base = statistics.median(r["events_per_s"] for r in rows if r["meters"] == "default meters")
    for variant in list(_VARIANTS)[1:]:
        extra = statistics.median(r["events_per_s"] for r in rows if r["meters"] == variant)
        print(f"  median {variant} / default meters: {extra} / {base} = {extra / base:.2f}", flush=True)
    return rows


_LOAD_HOURLY = """
INSERT INTO meter_hourly (tenant_id, meter_id, hour, group_values, stripe,
                          min_value, max_value, latest_time, latest_event_id, latest_value)
SELECT $1::text, $2::bigint, h, jsonb_build_object('region', r)::text, 0,
       1, 100 + (extract(hour FROM h))::int, h, 'e', 50
FROM generate_series($3::timestamptz, $3::timestamptz + interval '30 days' - interval '1 hour',
                     '1 hour') AS h,
     unnest(ARRAY['eu-west-1','us-east-1','us-west-2','ap-south-1']) AS r
"""
# One event in 7 is a query by one of 100,000 users, spread over the 30 days: their
# values per hour, each with the event that brought it there (migrations 0054 and 0056),
# and per month with the days they appeared in.
_LOAD_DISTINCT = """
INSERT INTO meter_distinct_hours (tenant_id, meter_id, hour, group_values, value, event_id)
SELECT DISTINCT ON (3, 5) $1::text, $2::bigint, date_trunc('hour', t, 'UTC'), '{}',
       'user-' || (n * 7919 % 100000), 'q' || n
FROM (SELECT n, $3::timestamptz + (n * ($4::bigint / $5::bigint)) * interval '1 microsecond' AS t
      FROM generate_series(1, $5::bigint) AS n) AS e
ORDER BY 3, 5, n
ON CONFLICT DO NOTHING
"""
_LOAD_DISTINCT_MONTHS = """
INSERT INTO meter_distinct_months (tenant_id, meter_id, month, group_values, value, days, days_before)
SELECT tenant_id, meter_id, date_trunc('month', hour, 'UTC'), group_values, value,
       bit_or(1 << (extract(day FROM hour AT TIME ZONE 'UTC')::int - 1)), 0
FROM meter_distinct_hours WHERE tenant_id = $1 AND meter_id = $2
GROUP BY 1, 2, 3, 4, 5
"""
# The counts kept beside them, as the write path keeps them: each value's 1 for its day
# and its month in the first hour it appeared there.
_LOAD_DISTINCT_COUNTS = """
INSERT INTO meter_unique_counts
    (tenant_id, meter_id, hour, group_values, stripe, hour_values, day_values, month_values)
SELECT tenant_id, meter_id, hour, group_values, 0, count(*),
       count(*) FILTER (WHERE hour = first_in_day), count(*) FILTER (WHERE hour = first_in_month)
FROM (SELECT tenant_id, meter_id, hour, group_values,
             min(hour) OVER (PARTITION BY value, date_trunc('day', hour, 'UTC')) AS first_in_day,
             min(hour) OVER (PARTITION BY value, date_trunc('month', hour, 'UTC')) AS first_in_month
      FROM meter_distinct_hours WHERE tenant_id = $1 AND meter_id = $2) AS h
GROUP BY 1, 2, 3, 4
"""
_LOAD_READINGS = """
INSERT INTO meter_readings (tenant_id, meter_id, group_values, event_time, event_id, value)
SELECT $1::text, $2::bigint,
       jsonb_build_object('region', (ARRAY['eu-west-1','us-east-1','us-west-2','ap-south-1'])[n % 4 + 1]),
       $3::timestamptz + (n * ($4::bigint / $5::bigint)) * interval '1 microsecond', 'r' || n,
       (n % 500)::numeric / 10
FROM generate_series(1, $5::bigint) AS n
"""
_LOAD_SERIES = """
INSERT INTO meter_series (tenant_id, meter_id, group_values)
SELECT DISTINCT tenant_id, meter_id, group_values FROM meter_readings WHERE tenant_id = $1 AND meter_id = $2
"""


async def _load_meters(dsn: str, tenant: str, events: int, start: datetime, ids: dict[str, int]) -> float:
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})
    began = time.perf_counter()
    span = queries.DAYS * 86_400 * 1_000_000 - 1
    try:
        await conn.execute(_LOAD_HOURLY, tenant, ids["peak-cpu"], start)
        await conn.execute(_LOAD_DISTINCT, tenant, ids["distinct-users"], start, span, events // 7)
        await conn.execute(_LOAD_DISTINCT_MONTHS, tenant, ids["distinct-users"])
        await conn.execute(_LOAD_DISTINCT_COUNTS, tenant, ids["distinct-users"])
        await conn.execute(_LOAD_READINGS, tenant, ids["storage-gb-hours"], start, span, events // 7)
        await conn.execute(_LOAD_SERIES, tenant, ids["storage-gb-hours"])
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    # The time-weighted cache of the closed hours, as the server's background task builds it.
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, server_settings={"timezone": "UTC"})
    try:
        await Folder(
            pool, batch_rows=100_000, closed_before=lambda: start + timedelta(days=queries.DAYS)
        ).fold_once()
    finally:
        await pool.close()
    return time.perf_counter() - began


QUERY_METERS = [
    ("sum", "meters/compute-cpu-hour", ""),
    ("max", "meters/peak-cpu", ""),
    ("unique_count", "meters/distinct-users", "user_id"),
    ("time_weighted", "meters/storage-gb-hours", ""),
]


def scenario_query(
    sizes: list[int], run_client: Callable[..., tuple[dict[str, Any], Any]]
) -> list[dict[str, Any]]:
    """`meters-query`: GetUsageSummary latency per aggregation, daily and monthly, per size."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    # The calendar month (the data covers its first 30 days): billing periods are months, and
    # a UNIQUE_COUNT over a whole month reads the month's distinct values, not 31 days' worth.
    end = datetime(2026, 2, 1, tzinfo=UTC)
    rows = []
    with harness.stack() as stack:
        ids = asyncio.run(
            _create_meters(
                stack.dsn,
                [
                    ("peak-cpu", "compute", "cpu_hour", "max", "", ["region"]),
                    ("distinct-users", "analytics", "query", "unique_count", "user_id", []),
                    ("storage-gb-hours", "storage", "gb_hour", "time_weighted", "", ["region"]),
                ],
            )
        )
        time.sleep(2.5)
        for events in sizes:
            tenant = f"bench-{events}"
            seconds = asyncio.run(queries.load(stack.dsn, tenant, events, start))
            seconds += asyncio.run(_load_meters(stack.dsn, tenant, events, start, ids))
            print(f"  loaded {events} events and their meters for {tenant} in {seconds:.0f} s", flush=True)
        print(
            "  read_mask: paths [meter_aggregates] for each meter; none (every field) for usage_types",
            flush=True,
        )
        for events in sizes:
            tenant = f"bench-{events}"
            row: dict[str, Any] = {"events": events}
            # The usage types' summary (no meter) first, as this run's yardstick; then each
            # meter alone (read_mask meter_aggregates: the usage types' rollups are not read).
            for aggregation, name, _ in [("usage_types", "", ""), *QUERY_METERS]:
                for kind in ("summary-day", "summary-month"):
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
                        "--meters",
                        name,
                        "--fields",
                        "meter_aggregates" if name else "",
                        stack=stack,
                    )
                    row[f"{aggregation}_{kind.split('-')[1]}_p50_ms"] = round(result["p50_ms"], 1)
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    return rows
