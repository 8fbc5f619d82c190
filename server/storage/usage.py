"""Queries on usage_events and usage_rollups: recording batches and reading summaries."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from datetime import UTC, datetime

import asyncpg

from server.domain.audit import AuditEntry
from server.domain.decimals import trim_decimal
from server.domain.events import EventColumns, EventKey
from server.domain.models import UsageAggregate
from server.domain.timeutil import to_datetime
from server.storage.audit import append as append_audit
from server.storage.database import RetryTransaction, run_with_retries

# The audit entries to write with a batch, given the keys of its events that were new.
AuditHook = Callable[[Set[EventKey]], Sequence[AuditEntry]]

# One round trip records a whole batch: claim the idempotency keys that are new, store
# exactly those events, and add exactly those to the hourly rollups, in one statement
# and so one transaction.
# {result} is the final SELECT over new_keys (a count, or the new keys themselves).
# {source} is a query yielding (tenant_id, event_id, service, usage_type, quantity text,
# time_micros bigint, dimensions text) rows: the batch's arrays here, a staging table in
# the benchmark's plain-PostgreSQL baseline (which must do exactly the same work).
# Duplicates (already stored, or stored by a concurrent batch) lose the key claim to
# ON CONFLICT DO NOTHING, so they reach neither the events nor the rollups. Rollup rows are upserted in
# key order so that concurrent batches lock them in the same order.
# Times travel as microseconds since the epoch: 'epoch' + n * 1 µs is exact for any
# time before the year 2255 (the product is computed in float8, exact below 2^53).
RECORD_FROM = """
WITH input AS ({source}),
new_keys AS (
    INSERT INTO usage_event_keys (tenant_id, event_id)
    SELECT tenant_id, event_id FROM input
    ON CONFLICT (tenant_id, event_id) DO NOTHING
    RETURNING tenant_id, event_id
), inserted AS (
    INSERT INTO usage_events (tenant_id, event_id, service, usage_type, quantity, event_time, dimensions)
    SELECT t.tenant_id, t.event_id, t.service, t.usage_type, t.quantity::numeric,
           'epoch'::timestamptz + t.time_micros * interval '1 microsecond', t.dimensions::jsonb
    FROM input AS t
    JOIN new_keys AS k ON k.tenant_id = t.tenant_id AND k.event_id = t.event_id
    RETURNING tenant_id, service, usage_type, quantity, event_time, dimensions
), rolled_up AS (
    INSERT INTO usage_rollups AS r (tenant_id, hour, service, usage_type, dimensions, quantity, event_count)
    SELECT tenant_id, date_trunc('hour', event_time, 'UTC'), service, usage_type, dimensions,
           sum(quantity), count(*)
    FROM inserted
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (tenant_id, hour, service, usage_type, dimensions) DO UPDATE
        SET quantity = r.quantity + excluded.quantity,
            event_count = r.event_count + excluded.event_count
)
{result}
"""
# The batch arrives as parallel arrays, one per column.
_UNNEST = """
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[])
    AS t(tenant_id, event_id, service, usage_type, quantity, time_micros, dimensions)"""
_RECORD_BATCH = RECORD_FROM.format(source=_UNNEST, result="SELECT tenant_id, event_id FROM new_keys")

# Totals per tenant and usage type, optionally per time bucket and per value of one
# dimension ($4). One statement per shape, chosen from these constants: a generic CASE
# would truncate every row even for hourly buckets, which are the rollup rows themselves.
# Buckets come back as epoch seconds and totals as numeric text: decoding 5,000 rows into
# datetimes and Decimals only to print them again would cost more than the query.
_BUCKET_SECONDS = {
    "": "NULL::bigint",
    "hour": "extract(epoch FROM hour)::bigint",
    "day": "extract(epoch FROM date_trunc('day', hour, 'UTC'))::bigint",
    "month": "extract(epoch FROM date_trunc('month', hour, 'UTC'))::bigint",
}
_DIMENSION_VALUE = {False: "''", True: "coalesce(dimensions ->> $4, '')"}
_SUMMARIZE_SHAPE = """
SELECT tenant_id, service, usage_type, {bucket} AS bucket_start, {dimension} AS dimension_value,
       sum(quantity)::text AS quantity, sum(event_count)::bigint AS event_count
FROM usage_rollups
WHERE tenant_id = ANY($1::text[]) AND hour >= $2 AND hour < $3 {unused_dimension}
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4, 5
"""
_SUMMARIZE = {
    (bucket, grouped): _SUMMARIZE_SHAPE.format(
        bucket=bucket_sql,
        dimension=_DIMENSION_VALUE[grouped],
        # Keeps $4 part of every statement, so that every shape takes the same arguments.
        unused_dimension="" if grouped else "AND $4::text IS NOT NULL",
    )
    for bucket, bucket_sql in _BUCKET_SECONDS.items()
    for grouped in (False, True)
}

_TENANTS_WITH_USAGE = """
SELECT DISTINCT tenant_id FROM usage_rollups
WHERE hour >= $1 AND hour < $2 AND tenant_id > $3
ORDER BY tenant_id
LIMIT $4
"""


def _month_index(micros: int) -> int:
    moment = to_datetime(micros)
    return moment.year * 12 + moment.month - 1


class UsageStore:
    """Recording of events (write pool) and reading of rollups (read pool).

    Two pools keep a flood of ingestion from queueing summaries behind it, and let reads
    be planned per call (see database.create_pool).
    """

    def __init__(self, pool: asyncpg.Pool, read_pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._read_pool = read_pool
        # Months whose events partition is known to exist (month index = year * 12 + month - 1).
        self._partitions: set[int] = set()

    async def _ensure_partitions(self, columns: EventColumns) -> None:
        """Create the monthly partitions this batch needs that this process has not seen yet.

        Only the months that hold one of its events: a backfill of 1990 and today's usage
        in one batch makes two partitions, not four hundred. (An event that turns out to be
        a duplicate may still leave its month's partition behind, empty.)
        """
        missing = sorted({_month_index(t) for t in columns.times_micros} - self._partitions)
        if not missing:
            return
        async with self._pool.acquire() as conn:
            for month in missing:
                await conn.execute(
                    "SELECT tally_event_partition($1)", datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC)
                )
        self._partitions.update(missing)

    async def record_new_keys(self, columns: EventColumns, audit: AuditHook | None = None) -> set[EventKey]:
        """Store the events that are new, in one transaction; return their (tenant_id, event_id) keys.

        With `audit`, the entries it gives for the new keys are appended in the same
        transaction (an explicit one: without audit, the single statement is its own).
        """
        if not len(columns):
            return set()
        args = (
            columns.tenant_ids,
            columns.event_ids,
            columns.services,
            columns.usage_types,
            columns.quantities,
            columns.times_micros,
            columns.dimensions_json,
        )

        async def attempt() -> set[EventKey]:
            await self._ensure_partitions(columns)
            async with self._pool.acquire() as conn:
                try:
                    if audit is None:
                        return {(row[0], row[1]) for row in await conn.fetch(_RECORD_BATCH, *args)}
                    async with conn.transaction():
                        new_keys = {(row[0], row[1]) for row in await conn.fetch(_RECORD_BATCH, *args)}
                        for entry in audit(new_keys):
                            await append_audit(conn, entry)
                    return new_keys
                except asyncpg.CheckViolationError as exc:
                    if "no partition" not in str(exc):
                        raise
                    # A partition this process knew of was dropped (tally retention) and a
                    # late event belongs in it: forget what we knew and let the retry recreate it.
                    self._partitions.clear()
                    raise RetryTransaction from exc

        return await run_with_retries(attempt)

    async def summarize(
        self,
        tenant_ids: Sequence[str],
        start: datetime,
        end: datetime,
        bucket: str,
        dimension: str,
    ) -> list[UsageAggregate]:
        """Aggregates of the tenants over [start, end), ordered by tenant, type, bucket, dimension value.

        bucket is "" (whole range), "hour", "day" or "month"; dimension is "" or a key.
        """

        sql = _SUMMARIZE[(bucket, bool(dimension))]

        async def attempt() -> list[UsageAggregate]:
            async with self._read_pool.acquire() as conn:
                rows = await conn.fetch(sql, list(tenant_ids), start, end, dimension)
            return [
                UsageAggregate(
                    tenant_id=row[0],
                    service=row[1],
                    usage_type=row[2],
                    bucket_start_seconds=row[3],
                    dimension_value=row[4],
                    quantity=trim_decimal(row[5]),
                    event_count=row[6],
                )
                for row in rows
            ]

        return await run_with_retries(attempt)

    async def tenants_with_usage(self, start: datetime, end: datetime, after: str, limit: int) -> list[str]:
        async def attempt() -> list[str]:
            async with self._read_pool.acquire() as conn:
                rows = await conn.fetch(_TENANTS_WITH_USAGE, start, end, after, limit)
                return [row["tenant_id"] for row in rows]

        return await run_with_retries(attempt)
