"""Reading meters: one query shape per aggregation, none of which reads raw events.

- SUM and COUNT: the hourly rollups (every stripe), filtered by the meter's dimensions.
- MAX, MIN, LATEST: meter_hourly (every stripe).
- UNIQUE_COUNT: the range of each bucket decomposed into whole months, whole days and
  edge hours (server.domain.aggregation.decompose), their values counted as one union
  (meter_distinct_hours, meter_distinct_months); a bucket that is one piece, of one group,
  reads its count (meter_unique_counts).
- TIME_WEIGHTED: per series, the cached summaries of closed hours plus the readings of
  the hours not cached (recent or dirty), composed hour by hour in Python.

Buckets come back as epoch seconds and values as canonical decimal text. Invoices read
the same values, one per meter charge and priced window (`meter_totals`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import asyncpg

from server.domain.aggregation import (
    HourSummary,
    Reading,
    Span,
    TimeBucket,
    decompose,
    hour_integral,
    integrate,
    spans,
    unit_hours,
)
from server.domain.decimals import format_quantity, trim_decimal
from server.domain.meters import Aggregation, Meter
from server.domain.models import MeterValue
from server.domain.stores import MeterWindow
from server.domain.timeutil import MICROS_PER_HOUR, MICROS_PER_SECOND, to_datetime, to_micros
from server.storage import meters as meter_store

# Each bucket's start in epoch seconds, from an hourly row's `hour` (usage_rollups' too).
BUCKET_SECONDS = {
    TimeBucket.NONE: "NULL::bigint",
    TimeBucket.HOUR: "extract(epoch FROM hour)::bigint",
    TimeBucket.DAY: "extract(epoch FROM date_trunc('day', hour, 'UTC'))::bigint",
    TimeBucket.MONTH: "extract(epoch FROM date_trunc('month', hour, 'UTC'))::bigint",
}


def _group_dimension(param: int) -> str:
    """SQL for a row's value of the group-by dimension in parameter $param ('' for none).

    The meter tables key their groups as jsonb's text (migrations 0054 and 0055): the text
    is parsed only when a summary groups by a dimension, which the CASE spares the others.
    """
    return f"CASE ${param} WHEN '' THEN '' ELSE coalesce(group_values::jsonb ->> ${param}, '') END"


# $1 tenants, [$2, $3) range, $4 group-by dimension ('' for none), $5 service,
# $6 usage type, $7 filter (jsonb containment; '{}' matches every event).
_ADDITIVE = """
SELECT tenant_id, {bucket} AS bucket_start, coalesce(dimensions ->> nullif($4, ''), '') AS dimension_value,
       sum(quantity)::text AS total, sum(event_count)::text AS events
FROM usage_rollups
WHERE tenant_id = ANY($1::text[]) AND hour >= $2 AND hour < $3
  AND service = $5 AND usage_type = $6 AND dimensions @> $7::jsonb
GROUP BY 1, 2, 3
HAVING sum(event_count) <> 0
ORDER BY 1, 2, 3
"""
# $5: the meter's id.
# The meter's dimension is $4 here; the templates are filled in by `_shape`.
_EXTREMES = """
SELECT tenant_id, {bucket} AS bucket_start, {dimension} AS dimension_value,
       min(min_value)::text AS low, max(max_value)::text AS high
FROM meter_hourly
WHERE tenant_id = ANY($1::text[]) AND meter_id = $5 AND hour >= $2 AND hour < $3
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3
"""
_LATEST = """
SELECT DISTINCT ON (1, 2, 3)
       tenant_id, {bucket} AS bucket_start, {dimension} AS dimension_value, latest_value::text AS latest
FROM meter_hourly
WHERE tenant_id = ANY($1::text[]) AND meter_id = $5 AND hour >= $2 AND hour < $3
ORDER BY 1, 2, 3, latest_time DESC, latest_event_id COLLATE "C" DESC
"""
_GROUP_DIMENSION = _group_dimension(5)
# $2, $3, $4: each piece's label, grain and start. Edge hours read their values
# (meter_distinct_hours); whole days and months read the values of their month whose days
# meet the label's mask of days in that month (meter_distinct_months, migration 0054).
_UNIQUE = f"""
WITH pieces AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::timestamptz[]) AS p(label, grain, bucket)
), masks AS (
    SELECT label, date_trunc('month', bucket, 'UTC') AS month,
           bit_or(CASE grain WHEN 'm' THEN -1
                             ELSE 1 << (extract(day FROM bucket AT TIME ZONE 'UTC')::int - 1) END) AS days
    FROM pieces WHERE grain <> 'h'
    GROUP BY 1, 2
), found AS (
    SELECT d.tenant_id, p.label, d.group_values, d.value
    FROM pieces AS p
    JOIN meter_distinct_hours AS d
      ON d.tenant_id = ANY($1::text[]) AND d.meter_id = $6 AND d.hour = p.bucket
    WHERE p.grain = 'h'
    UNION ALL
    SELECT m.tenant_id, p.label, m.group_values, m.value
    FROM masks AS p
    JOIN meter_distinct_months AS m
      ON m.tenant_id = ANY($1::text[]) AND m.meter_id = $6 AND m.month = p.month AND m.days & p.days <> 0
)
SELECT tenant_id, label, {_GROUP_DIMENSION} AS dimension_value, count(DISTINCT value) AS distinct_values
FROM found
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3
"""
# The same from the counts (meter_unique_counts, summed over hours and stripes) when every
# label is one piece [$4, $7) and each group is one dimension value: a few numbers per
# bucket instead of every distinct value (a daily summary of a month with 100,000 users
# read a million index entries and took 0.6 s). Each group comes back on its own: two
# groups with the same label (no `region`, and `region` ""), whose values may overlap,
# send the caller back to counting values.
_UNIQUE_COUNTS = f"""
WITH pieces AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::timestamptz[], $7::timestamptz[])
        AS p(label, grain, bucket, until)
)
SELECT tenant_id, label, {_GROUP_DIMENSION} AS dimension_value,
       sum(distinct_values)::bigint AS distinct_values
FROM (
    SELECT n.tenant_id, p.label, n.group_values,
           CASE p.grain WHEN 'h' THEN n.hour_values WHEN 'd' THEN n.day_values ELSE n.month_values END
               AS distinct_values
    FROM pieces AS p
    JOIN meter_unique_counts AS n
      ON n.tenant_id = ANY($1::text[]) AND n.meter_id = $6 AND n.hour >= p.bucket AND n.hour < p.until
) AS c
GROUP BY tenant_id, label, group_values
HAVING sum(distinct_values) <> 0
ORDER BY 1, 2, 3
"""
# Time-weighted: each series with its watermark and the last reading before $3.
_SERIES = """
SELECT s.group_values::text AS group_values, w.cached_until, c.value::text AS carried
FROM meter_series AS s
LEFT JOIN meter_tw_watermarks AS w
  ON w.tenant_id = s.tenant_id AND w.meter_id = s.meter_id AND w.group_values = s.group_values
LEFT JOIN LATERAL (
    SELECT r.value FROM meter_readings AS r
    WHERE r.tenant_id = s.tenant_id AND r.meter_id = s.meter_id AND r.group_values = s.group_values
      AND r.event_time < $3
    ORDER BY r.event_time DESC, r.event_id DESC
    LIMIT 1
) AS c ON true
WHERE s.tenant_id = $1 AND s.meter_id = $2
"""
# Times as epoch microseconds and values as numeric (decoded by asyncpg): a month is 720
# rows per series, and converting each row's datetimes and decimal text in Python cost
# about a third of the summary.
_CACHED_HOURS = """
SELECT group_values::text AS group_values, (extract(epoch FROM hour) * 1000000)::bigint AS hour,
       (extract(epoch FROM first_time) * 1000000)::bigint AS first_time, inner_total, last_value
FROM meter_tw_hours
WHERE tenant_id = $1 AND meter_id = $2 AND hour >= $3 AND hour < $4
"""
_DIRTY_HOURS = """
SELECT group_values::text AS group_values, hour FROM meter_tw_dirty
WHERE tenant_id = $1 AND meter_id = $2 AND hour >= $3 AND hour < $4
"""
# The readings of one series from $4 to $5.
_READINGS = """
SELECT event_time, event_id, value::text AS value FROM meter_readings
WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb AND event_time >= $4 AND event_time < $5
ORDER BY event_time, event_id
"""


# (tenant, label, meter id, start, end): one meter's aggregate wanted over [start, end).


async def meter_totals(
    conn: asyncpg.Connection, windows: Sequence[MeterWindow]
) -> dict[tuple[str, str, str], Decimal]:
    """Each window's meter aggregate, by (tenant, label, meter id), in the caller's transaction.

    The value a summary without buckets or grouping reports (summarize_meter with
    TimeBucket.NONE): the meter's aggregation over the whole window and over all of its
    groups, from the aggregates the meter keeps, never a scan of raw events. A window
    without a value is left out (its value is 0 to a price). Windows of the same meter
    and bounds are read together, so a period close's block costs one read per meter
    and window, not per tenant (but TIME_WEIGHTED, which summarize_meter reads per tenant).
    """
    found: dict[tuple[str, str, str], Decimal] = {}
    if not windows:
        return found
    meters = await meter_store.by_ids(conn, sorted({meter_id for _, _, meter_id, _, _ in windows}))
    wanted: dict[tuple[str, datetime, datetime], list[tuple[str, str]]] = {}
    for tenant_id, label, meter_id, start, end in windows:
        wanted.setdefault((meter_id, start, end), []).append((tenant_id, label))
    for (meter_id, start, end), labels in sorted(wanted.items()):
        meter = meters.get(meter_id)
        if meter is None:  # meters are never deleted: a plan only names meters that existed
            continue
        tenants = sorted({tenant_id for tenant_id, _ in labels})
        values = await summarize_meter(conn, meter, tenants, start, end, TimeBucket.NONE, "")
        by_tenant = {value.tenant_id: Decimal(value.value) for value in values}
        for tenant_id, label in labels:
            if tenant_id in by_tenant:
                found[(tenant_id, label, meter_id)] = by_tenant[tenant_id]
    return found


def _shape(template: str, bucket: TimeBucket) -> str:
    return template.format(bucket=BUCKET_SECONDS[bucket], dimension=_group_dimension(4))


def _seconds(micros: int | None) -> int | None:
    return None if micros is None else micros // MICROS_PER_SECOND


async def summarize_meter(
    conn: asyncpg.Connection,
    meter: Meter,
    tenant_ids: Sequence[str],
    start: datetime,
    end: datetime,
    bucket: TimeBucket,
    dimension: str,
) -> list[MeterValue]:
    """The meter's values for each tenant over [start, end), ordered by tenant, bucket, dimension value."""
    aggregation = meter.spec.aggregation
    tenants = list(tenant_ids)
    if aggregation.additive:
        rows = await conn.fetch(
            _ADDITIVE.format(bucket=BUCKET_SECONDS[bucket]),
            tenants,
            start,
            end,
            dimension,
            meter.spec.service,
            meter.spec.usage_type,
            json.dumps(dict(meter.spec.filter)),
        )
        column = "total" if aggregation is Aggregation.SUM else "events"
        return [MeterValue(r[0], meter, r[1], r[2], trim_decimal(r[column])) for r in rows]
    if aggregation in (Aggregation.MAX, Aggregation.MIN):
        rows = await conn.fetch(_shape(_EXTREMES, bucket), tenants, start, end, dimension, meter.id)
        column = "high" if aggregation is Aggregation.MAX else "low"
        return [MeterValue(r[0], meter, r[1], r[2], trim_decimal(r[column])) for r in rows]
    if aggregation is Aggregation.LATEST:
        rows = await conn.fetch(_shape(_LATEST, bucket), tenants, start, end, dimension, meter.id)
        return [MeterValue(r[0], meter, r[1], r[2], trim_decimal(r["latest"])) for r in rows]
    if aggregation is Aggregation.UNIQUE_COUNT:
        return await _unique_count(conn, meter, tenants, start, end, bucket, dimension)
    found: list[MeterValue] = []
    for tenant_id in tenants:
        found.extend(await _time_weighted(conn, meter, tenant_id, start, end, bucket, dimension))
    return found


async def _unique_count(
    conn: asyncpg.Connection,
    meter: Meter,
    tenants: list[str],
    start: datetime,
    end: datetime,
    bucket: TimeBucket,
    dimension: str,
) -> list[MeterValue]:
    labels: list[int | None] = []
    grains: list[str] = []
    buckets: list[datetime] = []
    ends: list[datetime] = []
    for part in spans(to_micros(start), to_micros(end), bucket):
        for piece in decompose(part.start, part.end):
            labels.append(_seconds(part.label))
            grains.append(piece.grain)
            buckets.append(to_datetime(piece.start))
            ends.append(to_datetime(piece.end))
    one_group_per_value = not meter.spec.group_by or tuple(meter.spec.group_by) == (dimension,)
    if one_group_per_value and len(set(labels)) == len(labels):
        rows = await conn.fetch(_UNIQUE_COUNTS, tenants, labels, grains, buckets, dimension, meter.id, ends)
        keys = [(r[0], r[1], r[2]) for r in rows]
        if len(set(keys)) == len(keys):
            return [MeterValue(r[0], meter, r[1], r[2], str(r[3])) for r in rows]
    # A value may be in several pieces of a label, or in several groups: count distinct values.
    rows = await conn.fetch(_UNIQUE, tenants, labels, grains, buckets, dimension, meter.id)
    return [MeterValue(r[0], meter, r[1], r[2], str(r[3])) for r in rows]


async def _time_weighted(
    conn: asyncpg.Connection,
    meter: Meter,
    tenant_id: str,
    start: datetime,
    end: datetime,
    bucket: TimeBucket,
    dimension: str,
) -> list[MeterValue]:
    series = await conn.fetch(_SERIES, tenant_id, meter.id, start)
    if not series:
        return []
    start_micros, end_micros = to_micros(start), to_micros(end)
    parts = spans(start_micros, end_micros, bucket)
    cached: dict[tuple[str, int], HourSummary] = {}
    for row in await conn.fetch(_CACHED_HOURS, tenant_id, meter.id, start, end):
        series_key, hour, first_time, inner_total, last_value = row
        cached[(series_key, hour)] = HourSummary(hour, first_time, inner_total, last_value)
    dirty = {
        (row["group_values"], to_micros(row["hour"]))
        for row in await conn.fetch(_DIRTY_HOURS, tenant_id, meter.id, start, end)
    }
    totals: dict[tuple[int | None, str], Decimal] = {}
    for entry in series:
        group_values: str = entry["group_values"]
        watermark = start_micros if entry["cached_until"] is None else to_micros(entry["cached_until"])
        # Readings are read for the hours past the watermark, and for dirty hours before it.
        uncached_from = max(start_micros, min(watermark, end_micros))
        readings: dict[int, list[Reading]] = {}
        windows = [(uncached_from, end_micros)] if uncached_from < end_micros else []
        windows += [(hour, hour + MICROS_PER_HOUR) for (g, hour) in sorted(dirty) if g == group_values]
        for low, high in windows:
            for row in await conn.fetch(
                _READINGS, tenant_id, meter.id, group_values, to_datetime(low), to_datetime(high)
            ):
                moment = to_micros(row["event_time"])
                hour = moment - moment % MICROS_PER_HOUR
                readings.setdefault(hour, []).append(Reading(moment, row["event_id"], Decimal(row["value"])))
        carried = None if entry["carried"] is None else Decimal(entry["carried"])
        per_part = _integrate_hours(group_values, carried, parts, uncached_from, dirty, cached, readings)
        label = json.loads(group_values).get(dimension, "") if dimension else ""
        for part, total in zip(parts, per_part, strict=True):
            key = (part.label, label)
            totals[key] = totals.get(key, Decimal(0)) + total
    return [
        MeterValue(tenant_id, meter, _seconds(label), value, format_quantity(unit_hours(total)))
        for (label, value), total in sorted(totals.items(), key=lambda item: (item[0][0] or 0, item[0][1]))
    ]


def _integrate_hours(
    group_values: str,
    carried: Decimal | None,
    parts: list[Span],
    uncached_from: int,
    dirty: set[tuple[str, int]],
    cached: dict[tuple[str, int], HourSummary],
    readings: dict[int, list[Reading]],
) -> list[Decimal]:
    """One series' integral over each span, hour by hour, from the cache where it is valid."""
    results = []
    value = carried
    for part in parts:
        total = Decimal(0)
        for hour in range(part.start, part.end, MICROS_PER_HOUR):
            summary = None
            if hour < uncached_from and (group_values, hour) not in dirty:
                summary = cached.get((group_values, hour))
                if summary is None:  # a summarised hour without a row had no reading
                    total += (value or Decimal(0)) * MICROS_PER_HOUR
                    continue
            if summary is not None:
                total += hour_integral(value, summary)
                value = summary.last_value
                continue
            hour_readings = readings.get(hour, [])
            total += integrate(value, hour_readings, [Span(None, hour, hour + MICROS_PER_HOUR)])[0]
            if hour_readings:
                value = max(hour_readings).value
        results.append(total)
    return results
