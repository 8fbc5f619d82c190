"""Retention of raw events: drop whole monthly partitions of usage_events.

Rollups, invoices and idempotency keys are kept: summaries and invoices do not change,
and an old event sent again is still recognised as a duplicate. A late event for a
month whose raw partition was dropped is still recorded (the partition comes back).
"""

from __future__ import annotations

import re

import asyncpg

_PARTITION = re.compile(r"usage_events_(\d{4})_(\d{2})")

_LIST = """
SELECT c.relname
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_events'::regclass
ORDER BY c.relname
"""


async def event_partitions(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
    """(name, year, month) of every raw-event partition, oldest first."""
    found = []
    for row in await conn.fetch(_LIST):
        match = _PARTITION.fullmatch(row["relname"])
        if match:
            found.append((row["relname"], int(match.group(1)), int(match.group(2))))
    return found


async def drop_before(conn: asyncpg.Connection, year: int, month: int, *, dry_run: bool) -> list[str]:
    """Drop the partitions of months before (year, month); return their names."""
    doomed = [name for name, y, m in await event_partitions(conn) if (y, m) < (year, month)]
    if not dry_run:
        for name in doomed:
            # The name comes from the catalog and matched _PARTITION: safe to quote as is.
            await conn.execute(f'DROP TABLE "{name}"')
    return doomed
