"""Queries on usage_events and usage_rollups: recording batches and reading summaries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from itertools import combinations

import asyncpg

from server.domain.aggregation import TimeBucket
from server.domain.decimals import trim_decimal
from server.domain.events import EventColumns, EventKey
from server.domain.meters import Contributions, Meter
from server.domain.models import MeterValue, UsageAggregate
from server.domain.stores import AuditHook
from server.domain.timeutil import to_datetime
from server.storage.audit import append as append_audit
from server.storage.database import RetryTransaction, run_with_retries
from server.storage.meter_summaries import BUCKET_SECONDS, summarize_meter

# One round trip records a whole batch: claim the idempotency keys that are new (with what
# a later cancellation needs of each event), store exactly those events, and add exactly
# those to the hourly rollups, in one statement and so one transaction.
# {result} is the final SELECT over new_keys (a count, or the new keys themselves).
# {source} is a query yielding (tenant_id, event_id, service, usage_type, quantity text,
# time_micros bigint, dimensions text) rows: the batch's arrays here, a staging table in
# the benchmark's plain-PostgreSQL baseline (which must do exactly the same work).
# Duplicates (already stored, or stored by a concurrent batch) lose the key claim to
# ON CONFLICT DO NOTHING, so they reach neither the events nor the rollups.
# No hot rows: every connection adds to rollup rows of its own stripe (its backend pid,
# unique among open connections), so concurrent batches of any number of processes never
# wait for each other's row locks; reads sum the stripes and a background task folds past
# hours into stripe 0 (server.storage.folding). A concurrent batch waits only for a key
# that another uncommitted batch is claiming: a resend racing its original.
# Times travel as microseconds since the epoch: 'epoch' + n * 1 µs is exact for any
# time before the year 2255 (the product is computed in float8, exact below 2^53).
RECORD_FROM = """
WITH input AS ({source}),
new_keys AS (
    INSERT INTO usage_event_keys AS k
        (tenant_id, event_id, service, usage_type, quantity, event_time, dimensions)
    SELECT t.tenant_id, t.event_id, t.service, t.usage_type, t.quantity::numeric,
           'epoch'::timestamptz + t.time_micros * interval '1 microsecond', t.dimensions::jsonb
    FROM input AS t
    ON CONFLICT (tenant_id, event_id) DO NOTHING
    RETURNING k.tenant_id, k.event_id, k.service, k.usage_type, k.quantity, k.event_time, k.dimensions
), inserted AS (
    INSERT INTO usage_events (tenant_id, event_id, service, usage_type, quantity, event_time, dimensions)
    SELECT tenant_id, event_id, service, usage_type, quantity, event_time, dimensions FROM new_keys
), rolled_up AS (
    INSERT INTO usage_rollups AS r
        (tenant_id, hour, service, usage_type, dimensions, stripe, quantity, event_count)
    SELECT tenant_id, date_trunc('hour', event_time, 'UTC'), service, usage_type, dimensions,
           pg_backend_pid(), sum(quantity), count(*)
    FROM new_keys
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (tenant_id, hour, service, usage_type, dimensions, stripe) DO UPDATE
        SET quantity = r.quantity + excluded.quantity,
            event_count = r.event_count + excluded.event_count
){meters}
{result}
"""
# What the batch's new events add to the non-additive meters (server.domain.meters
# .Contributions: one entry per event and meter, matched in Python), in the same statement.
# Group values are keyed as jsonb's text in the MAX/MIN/LATEST and UNIQUE_COUNT tables
# (migrations 0054 and 0055), cast where each is written: one text column computed in
# contrib would parse every group's jsonb twice. The TIME_WEIGHTED tables keep jsonb.
# Every table is either appended to, inserted into with ON CONFLICT DO NOTHING (a writer
# waits only for another that is inserting the very same new key), or striped per writer;
# but a UNIQUE_COUNT's month row, which only the writer of a new hour row touches (its
# first event in an hour, not each one).
# Event ids compare byte-wise (COLLATE "C"), as they do in Python, to break LATEST's ties.
# CONTRIB_FROM: the entries as parallel arrays, from parameter ${first} on.
CONTRIB_FROM = """contrib AS (
    SELECT c.tenant_id, c.event_id, c.meter_id, c.kind, c.value, c.group_values::jsonb AS group_values,
           'epoch'::timestamptz + c.time_micros * interval '1 microsecond' AS event_time
    FROM unnest(${0}::text[], ${1}::text[], ${2}::bigint[], ${3}::text[], ${4}::text[], ${5}::text[],
                ${6}::bigint[])
        AS c(tenant_id, event_id, meter_id, kind, value, group_values, time_micros)
    {7}
)"""
# How every writer of meter_unique_counts (this statement, a cancellation, the fold) adds
# to a row: the counts are sums, so each adds its part to the row of its stripe. The
# target table is aliased n.
ADD_UNIQUE_COUNTS = """ON CONFLICT (tenant_id, meter_id, hour, group_values, stripe) DO UPDATE
    SET hour_values = n.hour_values + excluded.hour_values,
        day_values = n.day_values + excluded.day_values,
        month_values = n.month_values + excluded.month_values"""
# The write CTEs below follow a contrib CTE, one group per kind of entry. {keep}: "" on
# the live path (the events are new, so their rows are too); "ON CONFLICT DO NOTHING" for
# a meter backfill (server.storage.meter_backfill), whose events a live batch may have
# stored already. Every other write is an upsert that the same event written twice leaves
# as it is. {carried}: "" on the live path; for a backfill, BACKFILL_CARRIED, which leaves
# out an event that a live batch made its hour row's carrier already (committed: the
# backfill reads only committed keys), so that every event is carried once.
# MAX, MIN and LATEST (kind "v"): each event's value, and its hour's extremes and latest.
_EXTREME_WRITES = """, gauge_values AS (
    INSERT INTO meter_values (tenant_id, meter_id, hour, group_values, event_id, event_time, value)
    SELECT tenant_id, meter_id, date_trunc('hour', event_time, 'UTC'), group_values::text, event_id,
           event_time, value
    FROM contrib WHERE kind = 'v'
    {keep}
), gauge_hours AS (
    INSERT INTO meter_hourly AS h (tenant_id, meter_id, hour, group_values, stripe,
                                   min_value, max_value, latest_time, latest_event_id, latest_value)
    SELECT DISTINCT ON (tenant_id, meter_id, hour, group_values)
           tenant_id, meter_id, hour, group_values, pg_backend_pid(),
           min(quantity) OVER per_hour, max(quantity) OVER per_hour, event_time, event_id, quantity
    FROM (SELECT tenant_id, meter_id, date_trunc('hour', event_time, 'UTC') AS hour,
                 group_values::text AS group_values, event_time, event_id, value::numeric AS quantity
          FROM contrib WHERE kind = 'v') AS v
    WINDOW per_hour AS (PARTITION BY tenant_id, meter_id, hour, group_values)
    ORDER BY tenant_id, meter_id, hour, group_values, event_time DESC, event_id COLLATE "C" DESC
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
)"""
# UNIQUE_COUNT (kind "u").
_UNIQUE_WRITES = """, distinct_hours AS (
    -- The values new to their hour (migration 0054; groups keyed as jsonb's text), each
    -- with the event that brought it (migration 0056: the statement's first carrier, by
    -- event id). A value some batch wrote already stops here: it is new to neither its day
    -- nor its month.
    INSERT INTO meter_distinct_hours (tenant_id, meter_id, hour, group_values, value, event_id)
    SELECT DISTINCT ON (tenant_id, meter_id, hour, group_values, value)
           tenant_id, meter_id, hour, group_values, value, event_id
    FROM (SELECT tenant_id, meter_id, date_trunc('hour', event_time, 'UTC') AS hour,
                 group_values::text AS group_values, value, event_id
          FROM contrib WHERE kind = 'u') AS u
    ORDER BY tenant_id, meter_id, hour, group_values, value, event_id COLLATE "C"
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, meter_id, hour, group_values, value, event_id
), unique_values AS (
    -- The other carriers: every event that is not its hour row's. Keyed so that a
    -- cancellation finds one of a value's hour at once.
    INSERT INTO meter_unique_values (tenant_id, meter_id, group_values, value, hour, event_id)
    SELECT c.tenant_id, c.meter_id, c.group_values::text, c.value, date_trunc('hour', c.event_time, 'UTC'),
           c.event_id
    FROM contrib AS c
    WHERE c.kind = 'u'
      AND (c.tenant_id, c.meter_id, c.event_id) NOT IN (
          SELECT tenant_id, meter_id, event_id FROM distinct_hours)
      {carried}
    {keep}
), distinct_months AS (
    -- Their month rows: inserted (new to the month), or given the days they were not in
    -- yet. A row whose days were all set already is neither updated nor returned. Rows
    -- are taken in key order, so that two writers updating the same ones cannot deadlock.
    INSERT INTO meter_distinct_months AS m
        (tenant_id, meter_id, month, group_values, value, days, days_before)
    SELECT tenant_id, meter_id, date_trunc('month', hour, 'UTC'), group_values, value,
           bit_or(1 << (extract(day FROM hour AT TIME ZONE 'UTC')::int - 1)), 0
    FROM distinct_hours
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (tenant_id, meter_id, month, group_values, value) DO UPDATE
        SET days = m.days | excluded.days, days_before = m.days
        WHERE m.days & excluded.days <> excluded.days
    RETURNING tenant_id, meter_id, month, group_values, value,
              days & ~days_before AS new_days, days_before = 0 AS new_month
), distinct_firsts AS (
    -- Each new hour row, with whether it is the first hour (of this statement) of a day
    -- or a month that is new to its value: that hour holds the day's or month's 1. The
    -- month rows' news reach their hour rows through windows over both (sorts), not a
    -- join: the CTEs' row counts are unknown to the planner, which would loop over every
    -- pair of rows, and a write lane's transaction may hold thousands.
    SELECT tenant_id, meter_id, hour, group_values,
           (hour = min(hour) OVER same_day
            AND coalesce(max(new_days) OVER same_month
                         & (1 << (extract(day FROM hour AT TIME ZONE 'UTC')::int - 1)) <> 0, false))::int
               AS new_to_day,
           (hour = min(hour) OVER same_month AND coalesce(bool_or(new_month) OVER same_month, false))::int
               AS new_to_month,
           kept
    FROM (SELECT tenant_id, meter_id, group_values, value, date_trunc('month', hour, 'UTC') AS month, hour,
                 NULL::integer AS new_days, NULL::boolean AS new_month, true AS kept
          FROM distinct_hours
          UNION ALL
          SELECT tenant_id, meter_id, group_values, value, month, NULL, new_days, new_month, false
          FROM distinct_months) AS both_rows
    WINDOW same_day AS (PARTITION BY tenant_id, meter_id, group_values, value,
                                     date_trunc('day', hour, 'UTC')),
           same_month AS (PARTITION BY tenant_id, meter_id, group_values, value, month)
), distinct_counts AS (
    -- Exactly what this statement made new (a row a concurrent batch inserted first does
    -- not come back), counted into the writer's own stripe: one row per hour and group.
    INSERT INTO meter_unique_counts AS n
        (tenant_id, meter_id, hour, group_values, stripe, hour_values, day_values, month_values)
    SELECT tenant_id, meter_id, hour, group_values, pg_backend_pid(), count(*), sum(new_to_day),
           sum(new_to_month)
    FROM distinct_firsts
    WHERE kept
    GROUP BY 1, 2, 3, 4
    {add_unique_counts}
)"""
# TIME_WEIGHTED (kind "r").
_READING_WRITES = """, readings AS (
    INSERT INTO meter_readings (tenant_id, meter_id, group_values, event_time, event_id, value)
    SELECT tenant_id, meter_id, group_values, event_time, event_id, value::numeric
    FROM contrib WHERE kind = 'r'
    {keep}
), series AS (
    INSERT INTO meter_series (tenant_id, meter_id, group_values)
    SELECT DISTINCT tenant_id, meter_id, group_values FROM contrib WHERE kind = 'r'
    ON CONFLICT DO NOTHING
), late_readings AS (
    -- A reading for an hour that the time-weighted cache may already hold (any hour before
    -- the current one) marks that hour dirty, in the writer's own stripe (migration 0053);
    -- live readings write nothing here.
    INSERT INTO meter_tw_dirty AS d (tenant_id, meter_id, group_values, hour, stripe, changes)
    SELECT tenant_id, meter_id, group_values, date_trunc('hour', event_time, 'UTC'), pg_backend_pid(),
           count(*)
    FROM contrib WHERE kind = 'r' AND event_time < date_trunc('hour', now(), 'UTC')
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, meter_id, group_values, hour, stripe) DO UPDATE
        SET changes = d.changes + excluded.changes
)"""
_WRITES_BY_KIND = {
    "v": _EXTREME_WRITES,
    "u": _UNIQUE_WRITES.replace("{add_unique_counts}", ADD_UNIQUE_COUNTS),
    "r": _READING_WRITES,
}
KINDS = frozenset(_WRITES_BY_KIND)


def meter_writes(kinds: Iterable[str] = KINDS) -> str:
    """The writes of the contributions of `kinds` (all by default), to follow a contrib CTE.

    A statement holds only the kinds its batch has: a write CTE costs its set-up
    (relations, indexes, sorts) even with no row to write. For a one-event batch of one
    kind, the other kinds' CTEs cost 0.07-0.2 ms, a fifth of the statement (measured in
    docs/performance.md).
    """
    return "".join(_WRITES_BY_KIND[kind] for kind in "vur" if kind in kinds)


METER_WRITES = meter_writes()
BACKFILL_CARRIED = """AND NOT EXISTS (
          SELECT FROM meter_distinct_hours AS d
          WHERE d.tenant_id = c.tenant_id AND d.meter_id = c.meter_id
            AND d.hour = date_trunc('hour', c.event_time, 'UTC') AND d.group_values = c.group_values::text
            AND d.value = c.value AND d.event_id = c.event_id)"""


def _meter_ctes(kinds: frozenset[str]) -> str:
    contrib = CONTRIB_FROM.format(
        *range(8, 15), "JOIN new_keys AS k ON k.tenant_id = c.tenant_id AND k.event_id = c.event_id"
    )
    return ", " + contrib + meter_writes(kinds).format(keep="", carried="")


# The batch arrives as parallel arrays, one per column.
_UNNEST = """
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[])
    AS t(tenant_id, event_id, service, usage_type, quantity, time_micros, dimensions)"""
_NEW_KEYS = "SELECT tenant_id, event_id FROM new_keys"
_RECORD_BATCH = RECORD_FROM.format(source=_UNNEST, meters="", result=_NEW_KEYS)
# One statement per set of kinds a batch may hold (seven), each prepared once per connection.
_RECORD_BATCH_WITH_METERS = {
    kinds: RECORD_FROM.format(source=_UNNEST, meters=_meter_ctes(kinds), result=_NEW_KEYS)
    for kinds in (frozenset(chosen) for size in (1, 2, 3) for chosen in combinations(sorted(KINDS), size))
}

# Totals per tenant and usage type, optionally per time bucket and per value of one
# dimension ($4). One statement per shape, chosen from these constants: a generic CASE
# would truncate every row even for hourly buckets, which are the rollup rows themselves.
# Buckets come back as epoch seconds and totals as numeric text: decoding 5,000 rows into
# datetimes and Decimals only to print them again would cost more than the query.
_DIMENSION_VALUE = {False: "''", True: "coalesce(dimensions ->> $4, '')"}
_SUMMARIZE_SHAPE = """
SELECT tenant_id, service, usage_type, {bucket} AS bucket_start, {dimension} AS dimension_value,
       sum(quantity)::text AS quantity, sum(event_count)::bigint AS event_count
FROM usage_rollups
WHERE tenant_id = ANY($1::text[]) AND hour >= $2 AND hour < $3 {unused_dimension}
GROUP BY 1, 2, 3, 4, 5
HAVING sum(event_count) <> 0
ORDER BY 1, 2, 3, 4, 5
"""
_SUMMARIZE = {
    (bucket, grouped): _SUMMARIZE_SHAPE.format(
        bucket=bucket_sql,
        dimension=_DIMENSION_VALUE[grouped],
        # Keeps $4 part of every statement, so that every shape takes the same arguments.
        unused_dimension="" if grouped else "AND $4::text IS NOT NULL",
    )
    for bucket, bucket_sql in BUCKET_SECONDS.items()
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

    async def record_new_keys(
        self,
        columns: EventColumns,
        audit: AuditHook | None = None,
        contributions: Contributions | None = None,
    ) -> set[EventKey]:
        """Store the events that are new, in one transaction; return their (tenant_id, event_id) keys.

        With `audit`, the entries it gives for the new keys are appended in the same
        transaction (an explicit one: without audit, the single statement is its own).
        `contributions` are the batch's entries for non-additive meters; those of new
        events are stored in the same statement.
        """
        if not len(columns):
            return set()
        args: tuple[list[str] | list[int], ...] = (
            columns.tenant_ids,
            columns.event_ids,
            columns.services,
            columns.usage_types,
            columns.quantities,
            columns.times_micros,
            columns.dimensions_json,
        )
        statement = _RECORD_BATCH
        if contributions is not None and len(contributions):
            statement = _RECORD_BATCH_WITH_METERS[frozenset(contributions.kinds)]
            args += contributions.columns()

        async def attempt() -> set[EventKey]:
            await self._ensure_partitions(columns)
            async with self._pool.acquire() as conn:
                try:
                    if audit is None:
                        return {(row[0], row[1]) for row in await conn.fetch(statement, *args)}
                    async with conn.transaction():
                        new_keys = {(row[0], row[1]) for row in await conn.fetch(statement, *args)}
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
        bucket: TimeBucket,
        dimension: str,
    ) -> list[UsageAggregate]:
        """Aggregates of the tenants over [start, end), ordered by tenant, type, bucket, dimension value.

        dimension is "" or a key.
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

    async def summarize_meters(
        self,
        meters: Sequence[Meter],
        tenant_ids: Sequence[str],
        start: datetime,
        end: datetime,
        bucket: TimeBucket,
        dimension: str,
    ) -> list[MeterValue]:
        """The meters' values per tenant, in meter name order, then tenant, bucket and dimension value."""
        if not meters:
            return []

        async def attempt() -> list[MeterValue]:
            found: list[MeterValue] = []
            async with self._read_pool.acquire() as conn:
                for meter in sorted(meters, key=lambda m: m.spec.meter_id):
                    found.extend(
                        await summarize_meter(conn, meter, tenant_ids, start, end, bucket, dimension)
                    )
            return found

        return await run_with_retries(attempt)

    async def tenants_with_usage(self, start: datetime, end: datetime, after: str, limit: int) -> list[str]:
        """Up to `limit` tenants with usage in [start, end), after `after`, in tenant_id order."""

        async def attempt() -> list[str]:
            async with self._read_pool.acquire() as conn:
                rows = await conn.fetch(_TENANTS_WITH_USAGE, start, end, after, limit)
                return [row["tenant_id"] for row in rows]

        return await run_with_retries(attempt)
