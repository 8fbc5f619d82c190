"""Migrations 0054 and 0055 carry the meters' rows over to their new shape.

0054: a database at 0053 is given UNIQUE_COUNT values in the old shape: rows per hour, day
and month, and counts per bucket split over two writers' stripes. After the migration,
the hour rows are as they were, each month row holds exactly the days of its hour rows,
and every hour's, day's and month's count is what it was.

0054 and 0055: group values become jsonb's text, the very string that the write path now
stores for the same group, so old rows and new ones are one group.

0056: each hour row names one of the events that carry its value there (the least event
id), and that event's own carrier row goes; the others stay.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest_asyncio

from server.storage.migrations import migrate
from tests.helpers import distinct_counts, distinct_rows, months_off_their_hours, own_database

# (value, hour, group values): across a month's end, on two days of a month, in two groups.
OLD_VALUES = [
    ("u1", datetime(2026, 1, 31, 23, tzinfo=UTC), "{}"),
    ("u1", datetime(2026, 2, 1, 0, tzinfo=UTC), "{}"),
    ("u1", datetime(2026, 2, 1, 7, tzinfo=UTC), "{}"),
    ("u2", datetime(2026, 2, 1, 7, tzinfo=UTC), "{}"),
    ("u2", datetime(2026, 2, 3, 10, tzinfo=UTC), "{}"),
    ("u1", datetime(2026, 2, 3, 10, tzinfo=UTC), '{"region": "eu"}'),
]
# What the write path of 0053 stored for them: a row per grain and bucket.
_OLD_ROWS = """
INSERT INTO meter_distinct (tenant_id, meter_id, grain, bucket, group_values, value)
SELECT DISTINCT 't', 7, g.grain, date_trunc(g.unit, v.hour, 'UTC'), v.group_values::jsonb, v.value
FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS v(value, hour, group_values)
CROSS JOIN (VALUES ('h'::"char", 'hour'), ('d', 'day'), ('m', 'month')) AS g(grain, unit)
"""
# Their counts, one row in stripe 0 and the rest in stripe 4242 (a writer's, not folded).
_OLD_COUNTS = """
INSERT INTO meter_distinct_counts (tenant_id, meter_id, grain, bucket, group_values, stripe, distinct_values)
SELECT tenant_id, meter_id, grain, bucket, group_values, s.stripe,
       CASE s.stripe WHEN 0 THEN 1 ELSE count(*) - 1 END
FROM meter_distinct CROSS JOIN (VALUES (0), (4242)) AS s(stripe)
GROUP BY 1, 2, 3, 4, 5, s.stripe
"""
# The events carrying them (one row each, keyed by group, value and hour): one per value
# and hour ("e<i>"), and a second one ("e<i>b") for the first two.
_OLD_CARRIERS = """
INSERT INTO meter_unique_values (tenant_id, meter_id, group_values, value, hour, event_id)
SELECT 't', 7, v.group_values::jsonb, v.value, v.hour, 'e' || (v.i - 1) || s.suffix
FROM unnest($1::text[], $2::timestamptz[], $3::text[]) WITH ORDINALITY AS v(value, hour, group_values, i)
CROSS JOIN (VALUES (''), ('b')) AS s(suffix)
WHERE s.suffix = '' OR v.i <= 2
"""
_OLD_BY_KEY = """
SELECT meter_id, grain::text, bucket, group_values::text, count(*) FROM meter_distinct
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
"""


@pytest_asyncio.fixture
async def pool_at_0053(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with own_database(database_url, "migrate", up_to=53) as pool:
        yield pool


async def test_migration_0054_keeps_every_distinct_value_and_count(pool_at_0053: asyncpg.Pool) -> None:
    pool = pool_at_0053
    values, hours, groups = (list(column) for column in zip(*OLD_VALUES, strict=True))
    await pool.execute(_OLD_ROWS, values, hours, groups)
    await pool.execute(_OLD_CARRIERS, values, hours, groups)
    await pool.execute(_OLD_COUNTS)
    before = [tuple(row) for row in await pool.fetch(_OLD_BY_KEY)]
    assert len(before) == 12  # 4 hours, 3 days and 2 months of "{}"; an hour, a day and a month of "eu"

    group = {"zone": "a", "region": "eu"}
    await pool.execute(
        "INSERT INTO meter_values (tenant_id, meter_id, hour, group_values, event_id, event_time, value)"
        " VALUES ('t', 8, $1, $2::jsonb, 'e1', $1, '5')",
        hours[0],
        json.dumps(group),
    )

    assert {54, 55, 56} <= set(await migrate(pool))

    # What the write path stores for the same group now (server.domain.meters writes
    # sorted keys, no spaces; the statement keys it as jsonb's text).
    canonical = json.dumps(group, sort_keys=True, separators=(",", ":"))
    written = await pool.fetchval("SELECT $1::jsonb::text", canonical)
    migrated = await pool.fetchval("SELECT group_values FROM meter_values")
    assert migrated == written == '{"zone": "a", "region": "eu"}'

    assert await distinct_rows(pool, "t") == before
    assert await distinct_counts(pool, "t") == before
    assert await months_off_their_hours(pool, "t") == []
    months = await pool.fetch(
        "SELECT month, group_values::text, value, days FROM meter_distinct_months ORDER BY 1, 2, 3"
    )
    assert [tuple(row) for row in months] == [
        (datetime(2026, 1, 1, tzinfo=UTC), "{}", "u1", 1 << 30),
        (datetime(2026, 2, 1, tzinfo=UTC), '{"region": "eu"}', "u1", 0b100),
        (datetime(2026, 2, 1, tzinfo=UTC), "{}", "u1", 0b1),
        (datetime(2026, 2, 1, tzinfo=UTC), "{}", "u2", 0b101),
    ]
    assert await pool.fetchval("SELECT to_regclass('meter_distinct_counts')") is None

    hour_carriers = await pool.fetch(
        "SELECT value, hour, group_values::text, event_id FROM meter_distinct_hours ORDER BY event_id"
    )
    assert [tuple(row) for row in hour_carriers] == [
        (value, hour, json.dumps(json.loads(group)), f"e{i}")
        for i, (value, hour, group) in enumerate(OLD_VALUES)
    ]
    others = await pool.fetch("SELECT value, hour, event_id FROM meter_unique_values ORDER BY event_id")
    assert [tuple(row) for row in others] == [("u1", hours[0], "e0b"), ("u1", hours[1], "e1b")]
