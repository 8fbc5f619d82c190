"""Queries on usage_events and usage_rollups: recording batches and reading summaries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from server.domain.events import EventColumns
from server.domain.models import UsageAggregate
from server.storage.database import run_with_retries

# One round trip records a whole batch: insert the events that are new, then add
# exactly those to the hourly rollups, in one statement and so one transaction.
# Duplicates (already stored, or stored by a concurrent batch) are skipped by ON
# CONFLICT DO NOTHING, so they never reach the rollups. Rollup rows are upserted in
# key order so that concurrent batches lock them in the same order.
# Times travel as microseconds since the epoch: 'epoch' + n * 1 µs is exact for any
# time before the year 2255 (the product is computed in float8, exact below 2^53).
_RECORD_BATCH = """
WITH inserted AS (
    INSERT INTO usage_events (tenant_id, event_id, service, usage_type, quantity, event_time, dimensions)
    SELECT t.tenant_id, t.event_id, t.service, t.usage_type, t.quantity::numeric,
           'epoch'::timestamptz + t.time_micros * interval '1 microsecond', t.dimensions::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[])
         AS t(tenant_id, event_id, service, usage_type, quantity, time_micros, dimensions)
    ON CONFLICT (tenant_id, event_id) DO NOTHING
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
SELECT count(*) FROM inserted
"""

# Totals per tenant and usage type, optionally per bucket ($4: '' or a date_trunc
# field) and per value of one dimension ($5: '' for none).
_SUMMARIZE = """
SELECT tenant_id, service, usage_type,
       CASE WHEN $4 = '' THEN NULL ELSE date_trunc($4, hour, 'UTC') END AS bucket_start,
       CASE WHEN $5 = '' THEN '' ELSE coalesce(dimensions ->> $5, '') END AS dimension_value,
       sum(quantity) AS quantity,
       sum(event_count)::bigint AS event_count
FROM usage_rollups
WHERE tenant_id = ANY($1::text[]) AND hour >= $2 AND hour < $3
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4, 5
"""

_TENANTS_WITH_USAGE = """
SELECT DISTINCT tenant_id FROM usage_rollups
WHERE hour >= $1 AND hour < $2 AND tenant_id > $3
ORDER BY tenant_id
LIMIT $4
"""


class UsageStore:
    """Recording of events and reading of rollups, over one connection pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record_batch(self, columns: EventColumns) -> int:
        """Store the events that are new; return how many were (the rest were duplicates)."""
        if not len(columns):
            return 0

        async def attempt() -> int:
            async with self._pool.acquire() as conn:
                count: int = await conn.fetchval(
                    _RECORD_BATCH,
                    columns.tenant_ids,
                    columns.event_ids,
                    columns.services,
                    columns.usage_types,
                    columns.quantities,
                    columns.times_micros,
                    columns.dimensions_json,
                )
                return count

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

        async def attempt() -> list[UsageAggregate]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_SUMMARIZE, list(tenant_ids), start, end, bucket, dimension)
            return [
                UsageAggregate(
                    tenant_id=row["tenant_id"],
                    service=row["service"],
                    usage_type=row["usage_type"],
                    bucket_start=row["bucket_start"],
                    dimension_value=row["dimension_value"],
                    quantity=row["quantity"],
                    event_count=row["event_count"],
                )
                for row in rows
            ]

        return await run_with_retries(attempt)

    async def tenants_with_usage(self, start: datetime, end: datetime, after: str, limit: int) -> list[str]:
        async def attempt() -> list[str]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_TENANTS_WITH_USAGE, start, end, after, limit)
                return [row["tenant_id"] for row in rows]

        return await run_with_retries(attempt)
