"""Background upkeep of the write path: fold rollup stripes, and cache time-weighted hours.

Writers add to rollup rows of their own stripe (see server.storage.usage), so the rows of
an hour multiply with the number of connections that wrote to it. Folding moves the
stripes of hours that are over (before the previous hour) into stripe 0 (and so for
meter_hourly and meter_unique_counts), each batch of rows exactly once: one statement
deletes them (returning what they held) and adds that to stripe 0. Rows that a writer
holds locked right now (a late event) are skipped, and folded on a later pass; a writer
waits for the fold only when it adds a late event to a row the fold is moving at that
moment. Summaries read every stripe, so folding never changes what they return.

The time-weighted cache summarises, per series, each closed hour (see
server.domain.aggregation.HourSummary) up to a watermark, and resummarises the hours a
late reading or a cancellation marked dirty. A hour counts as closed once it ended more
than an hour ago (by the database's clock), so that no transaction still writing
without marking it dirty can be in flight (statements time out after 60 s).

Every process runs this; an advisory lock lets one pass run at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from server.domain.aggregation import Reading, summarize_hour
from server.domain.timeutil import MICROS_PER_HOUR, to_datetime, to_micros
from server.storage.database import CONNECTION_ERRORS, RETRYABLE_ERRORS
from server.storage.usage import ADD_UNIQUE_COUNTS

log = logging.getLogger(__name__)

_LOCK_KEY = 0x7A11_0002  # advisory lock id reserved for folding

_FOLD_ROLLUPS = """
WITH moved AS (
    DELETE FROM usage_rollups
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM usage_rollups WHERE stripe <> 0 AND hour < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))
    RETURNING tenant_id, hour, service, usage_type, dimensions, quantity, event_count
)
INSERT INTO usage_rollups AS r
    (tenant_id, hour, service, usage_type, dimensions, stripe, quantity, event_count)
SELECT tenant_id, hour, service, usage_type, dimensions, 0, sum(quantity), sum(event_count)
FROM moved
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (tenant_id, hour, service, usage_type, dimensions, stripe) DO UPDATE
    SET quantity = r.quantity + excluded.quantity, event_count = r.event_count + excluded.event_count
RETURNING 1
"""
_FOLD_GAUGES = """
WITH moved AS (
    DELETE FROM meter_hourly
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM meter_hourly WHERE stripe <> 0 AND hour < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))
    RETURNING *
)
INSERT INTO meter_hourly AS h (tenant_id, meter_id, hour, group_values, stripe,
                               min_value, max_value, latest_time, latest_event_id, latest_value)
SELECT DISTINCT ON (tenant_id, meter_id, hour, group_values)
       tenant_id, meter_id, hour, group_values, 0,
       min(min_value) OVER per_hour, max(max_value) OVER per_hour, latest_time, latest_event_id, latest_value
FROM moved
WINDOW per_hour AS (PARTITION BY tenant_id, meter_id, hour, group_values)
ORDER BY tenant_id, meter_id, hour, group_values, latest_time DESC, latest_event_id COLLATE "C" DESC
ON CONFLICT (tenant_id, meter_id, hour, group_values, stripe) DO UPDATE SET
    min_value = least(h.min_value, excluded.min_value),
    max_value = greatest(h.max_value, excluded.max_value),
    latest_time = greatest(h.latest_time, excluded.latest_time),
    latest_event_id = CASE
        WHEN (excluded.latest_time, excluded.latest_event_id COLLATE "C")
             > (h.latest_time, h.latest_event_id)
        THEN excluded.latest_event_id ELSE h.latest_event_id END,
    latest_value = CASE
        WHEN (excluded.latest_time, excluded.latest_event_id COLLATE "C")
             > (h.latest_time, h.latest_event_id)
        THEN excluded.latest_value ELSE h.latest_value END
RETURNING 1
"""
# UNIQUE_COUNT's counts (migration 0054): the stripes of hours that are over into stripe 0.
# A day's or month's count is a sum over its hours, so folding an hour changes no count.
_FOLD_DISTINCT_COUNTS = f"""
WITH moved AS (
    DELETE FROM meter_unique_counts
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM meter_unique_counts WHERE stripe <> 0 AND hour < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))
    RETURNING tenant_id, meter_id, hour, group_values, hour_values, day_values, month_values
)
INSERT INTO meter_unique_counts AS n
    (tenant_id, meter_id, hour, group_values, stripe, hour_values, day_values, month_values)
SELECT tenant_id, meter_id, hour, group_values, 0, sum(hour_values), sum(day_values), sum(month_values)
FROM moved
GROUP BY 1, 2, 3, 4
{ADD_UNIQUE_COUNTS}
RETURNING 1
"""
_CLOSED_BEFORE = "SELECT date_trunc('hour', now(), 'UTC') - interval '1 hour'"
_TAKE_DIRTY = """
DELETE FROM meter_tw_dirty
WHERE (tenant_id, meter_id, group_values, hour) IN (
    SELECT tenant_id, meter_id, group_values, hour FROM meter_tw_dirty WHERE hour < $1 LIMIT $2)
RETURNING tenant_id, meter_id, group_values::text AS group_values, hour
"""
_BEHIND = """
SELECT s.tenant_id, s.meter_id, s.group_values::text AS group_values, w.cached_until
FROM meter_series AS s
LEFT JOIN meter_tw_watermarks AS w
  ON w.tenant_id = s.tenant_id AND w.meter_id = s.meter_id AND w.group_values = s.group_values
WHERE w.cached_until IS NULL OR w.cached_until < $1
LIMIT $2
"""
_FIRST_READING = """
SELECT min(event_time) FROM meter_readings WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb
"""
_READINGS = """
SELECT event_time, event_id, value::text AS value FROM meter_readings
WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb AND event_time >= $4 AND event_time < $5
"""
_CLEAR_HOURS = """
DELETE FROM meter_tw_hours
WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb AND hour >= $4 AND hour < $5
"""
_STORE_HOUR = """
INSERT INTO meter_tw_hours (tenant_id, meter_id, group_values, hour, first_time, inner_total, last_value)
VALUES ($1, $2, $3::jsonb, $4, $5, $6::numeric, $7::numeric)
"""
_SET_WATERMARK = """
INSERT INTO meter_tw_watermarks (tenant_id, meter_id, group_values, cached_until)
VALUES ($1, $2, $3::jsonb, $4)
ON CONFLICT (tenant_id, meter_id, group_values) DO UPDATE SET cached_until = excluded.cached_until
"""


@dataclass(frozen=True, slots=True)
class FoldReport:
    """What one pass of `Folder.fold_once` did.

    `rollup_rows`, `gauge_rows` and `count_rows` are the stripe-0 rows written into
    usage_rollups, meter_hourly and meter_unique_counts; `hours_cached` the
    time-weighted hours summarised.
    """

    rollup_rows: int  # stripe-0 rows written by rollup folding
    gauge_rows: int
    hours_cached: int
    count_rows: int = 0


async def _summarize(
    conn: asyncpg.Connection, tenant_id: str, meter_id: int, group_values: str, low: int, high: int
) -> int:
    """Replace the cached hours of [low, high) of one series by summaries of its readings now."""
    by_hour: dict[int, list[Reading]] = {}
    for row in await conn.fetch(
        _READINGS, tenant_id, meter_id, group_values, to_datetime(low), to_datetime(high)
    ):
        moment = to_micros(row["event_time"])
        by_hour.setdefault(moment - moment % MICROS_PER_HOUR, []).append(
            Reading(moment, row["event_id"], Decimal(row["value"]))
        )
    await conn.execute(_CLEAR_HOURS, tenant_id, meter_id, group_values, to_datetime(low), to_datetime(high))
    for hour, readings in sorted(by_hour.items()):
        summary = summarize_hour(hour, readings)
        await conn.execute(
            _STORE_HOUR,
            tenant_id,
            meter_id,
            group_values,
            to_datetime(hour),
            to_datetime(summary.first_time),
            str(summary.inner),
            str(summary.last_value),
        )
    return len(by_hour)


class Folder:
    """Runs `fold_once` every `interval_seconds` until cancelled."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        interval_seconds: float = 30.0,
        batch_rows: int = 10_000,
        closed_before: Callable[[], datetime] | None = None,
    ) -> None:
        self._pool = pool
        self._interval = interval_seconds
        self._batch = batch_rows
        # Tests pass a fixed instant; the server uses the database's clock.
        self._closed_before = closed_before

    async def run(self) -> None:
        """Fold every interval until cancelled; a pass that loses the database is skipped, not fatal."""
        while True:
            try:
                await self.fold_once()
            except (*CONNECTION_ERRORS, *RETRYABLE_ERRORS) as exc:
                log.warning("folding skipped this time: %s", type(exc).__name__)
            await asyncio.sleep(self._interval)

    async def fold_once(self) -> FoldReport:
        """One pass: fold what is due (in batches), then bring the time-weighted cache up to date."""
        cached = 0
        written = {_FOLD_ROLLUPS: 0, _FOLD_GAUGES: 0, _FOLD_DISTINCT_COUNTS: 0}
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
                return FoldReport(0, 0, 0)
            try:
                closed = self._closed_before() if self._closed_before else await conn.fetchval(_CLOSED_BEFORE)
                for statement in written:
                    while True:
                        async with conn.transaction():
                            rows = len(await conn.fetch(statement, closed, self._batch))
                        written[statement] += rows
                        if rows == 0:
                            break
                cached = await self._cache_time_weighted(conn, closed)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        return FoldReport(
            written[_FOLD_ROLLUPS], written[_FOLD_GAUGES], cached, written[_FOLD_DISTINCT_COUNTS]
        )

    async def _cache_time_weighted(self, conn: asyncpg.Connection, closed: datetime) -> int:
        cached = 0
        closed_micros = to_micros(closed)
        async with conn.transaction():
            # Deleting a mark waits for a writer that holds it (ON CONFLICT DO UPDATE); the
            # readings are then read by later statements, which see that writer's reading.
            # Every stripe of a key is deleted, and comes back: each hour is summarised once.
            taken = {
                (row["tenant_id"], row["meter_id"], row["group_values"], to_micros(row["hour"]))
                for row in await conn.fetch(_TAKE_DIRTY, closed, self._batch)
            }
            for tenant_id, meter_id, group_values, hour in sorted(taken):
                end = hour + MICROS_PER_HOUR
                cached += await _summarize(conn, tenant_id, meter_id, group_values, hour, end)
        for row in await conn.fetch(_BEHIND, closed, self._batch):
            async with conn.transaction():
                low = row["cached_until"]
                if low is None:
                    low = await conn.fetchval(
                        _FIRST_READING, row["tenant_id"], row["meter_id"], row["group_values"]
                    )
                    if low is None:
                        continue
                low_micros = to_micros(low) - to_micros(low) % MICROS_PER_HOUR
                if low_micros < closed_micros:
                    cached += await _summarize(
                        conn,
                        row["tenant_id"],
                        row["meter_id"],
                        row["group_values"],
                        low_micros,
                        closed_micros,
                    )
                await conn.execute(
                    _SET_WATERMARK, row["tenant_id"], row["meter_id"], row["group_values"], closed
                )
        return cached
