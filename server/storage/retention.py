"""Retention of raw events: drop whole monthly partitions of usage_events.

Rollups, invoices and idempotency keys are kept: summaries and invoices do not change,
and an old event sent again is still recognised as a duplicate. A late event for a
month whose raw partition was dropped is still recorded (the partition comes back).

The raw events of the current and the previous month are never dropped: an open billing
period may still need them (to audit a late correction) until its invoice is finalized.
Nothing else reads them back: invoices read the rollups, and cancellations and meter
backfills read the idempotency keys, which keep what they need of each event. (Once
invoices can be finalized, the cutoff becomes the oldest month of a period not yet
finalized.)
"""

from __future__ import annotations

import re
from datetime import date

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


def check_cutoff(year: int, month: int, today: date) -> None:
    """ValueError if dropping the months before (year, month) would drop an open period's month."""
    index = today.year * 12 + today.month - 1 - 1  # the previous month
    latest = (index // 12, index % 12 + 1)
    if (year, month) > latest:
        raise ValueError(
            f"refusing to drop raw events of {latest[0]:04d}-{latest[1]:02d} or later: the current and the "
            "previous month may still be needed by an open billing period"
        )


async def drop_before(conn: asyncpg.Connection, year: int, month: int, *, dry_run: bool) -> list[str]:
    """Drop the partitions of months before (year, month); return their names."""
    doomed = [name for name, y, m in await event_partitions(conn) if (y, m) < (year, month)]
    if not dry_run:
        for name in doomed:
            # The name comes from the catalog and matched _PARTITION: safe to quote as is.
            await conn.execute(f'DROP TABLE "{name}"')
    return doomed
