"""Meter backfill: rebuilding a new meter from the events recorded before its creation.

A new MAX, MIN, LATEST, UNIQUE_COUNT or TIME_WEIGHTED meter starts BACKFILLING: live
batches feed it from its creation on (server.domain.meters.MeterMap matches it), and this
task adds the earlier events. (Not to be confused with a usage backfill, a batch of old
events that a client flags: those reach meters through the live path.)

It reads usage_event_keys, which keeps what a meter needs of every event (service, usage
type, quantity, time, dimensions, cancel time) and which retention never drops, in primary
key order, `batch_keys` key rows per transaction. Each transaction locks the meter's row
(FOR UPDATE SKIP LOCKED, so each meter has one reader at a time over every process), reads
the next keys, locks those the meter reads FOR SHARE (a cancellation locks its key FOR
UPDATE: the two never interleave, so a cancelled event is never added back), writes what
the live path would have written for them, and commits its position with them: a restart
resumes after the last committed batch. The batch that reads past the last key makes the
meter ACTIVE.

Exactness. The meter's stores are written so that the same event written twice changes
nothing (rows keyed by event id are inserted with ON CONFLICT DO NOTHING; minimum, maximum,
latest and distinct values are idempotent), so an event that both the backfill and a live
batch write is counted once. What must not happen is an event that neither writes: one
committed by a process whose map of meters did not hold the meter yet, at a key the scan
had already passed. So the scan starts only once every process has the meter in force:
`settle_seconds` after its creation (the catalog's reload age plus a margin for a batch that
waited in a write lane), and once no transaction begun before that instant is still open.
A cancelled event is skipped, except that a TIME_WEIGHTED meter keeps its series (with no
reading), as a live meter does when an event it counted is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from server.domain.events import EventRow
from server.domain.meters import Aggregation, Meter, MeterMap, contribution
from server.domain.timeutil import to_micros
from server.storage.database import CONNECTION_ERRORS, RETRYABLE_ERRORS
from server.storage.meters import METER_COLUMNS, meter_of
from server.storage.usage import BACKFILL_CARRIED, CONTRIB_FROM, METER_WRITES

log = logging.getLogger(__name__)

# The catalog's reload age (server.metering.meters, 2 s) plus the longest a prepared batch
# may reasonably wait in a write lane before its transaction starts.
DEFAULT_SETTLE_SECONDS = 32.0

_NEXT_METER = f"""
SELECT {METER_COLUMNS}, backfill_tenant_id, backfill_event_id FROM meters
WHERE state = 'backfilling' AND create_time <= now() - $1::float8 * interval '1 second'
  AND ($2::text[] IS NULL OR name = ANY($2::text[]))
ORDER BY id
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
# No transaction that began before the meter was in force everywhere is still open: a batch
# matched against an older map of meters has committed (or rolled back) by then.
_SETTLED = """
SELECT NOT EXISTS (
    SELECT 1 FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND xact_start < $1::timestamptz + $2::float8 * interval '1 second')
"""
# The next keys in primary key order, after ($1, $2): the last one read and how many were
# read (one row, flagged), then the keys of the meter's usage type among them.
_SCAN = """
WITH scanned AS (
    SELECT tenant_id, event_id, service, usage_type FROM usage_event_keys
    WHERE (tenant_id, event_id) > ($1, $2)
    ORDER BY tenant_id, event_id
    LIMIT $3
)
(SELECT tenant_id, event_id, (SELECT count(*) FROM scanned) AS scanned
 FROM scanned ORDER BY tenant_id DESC, event_id DESC LIMIT 1)
UNION ALL
SELECT tenant_id, event_id, NULL FROM scanned WHERE service = $4 AND usage_type = $5
"""
# Locked, and read as committed now: a cancellation that committed meanwhile is seen.
_LOCK_EVENTS = """
SELECT k.tenant_id, k.event_id, k.quantity::text AS quantity, k.event_time, k.dimensions::text AS dimensions,
       k.cancel_time
FROM usage_event_keys AS k
JOIN unnest($1::text[], $2::text[]) AS w(tenant_id, event_id)
  ON k.tenant_id = w.tenant_id AND k.event_id = w.event_id
ORDER BY k.tenant_id, k.event_id
FOR SHARE OF k
"""
# What the live path writes for a batch's new events (server.storage.usage), for these.
_WRITE = (
    "WITH "
    + CONTRIB_FROM.format(*range(1, 8), "")
    + METER_WRITES.format(keep="ON CONFLICT DO NOTHING", carried=BACKFILL_CARRIED)
    + "\nSELECT 1"
)
_KEEP_SERIES = """
INSERT INTO meter_series (tenant_id, meter_id, group_values)
SELECT DISTINCT t, $2::bigint, g::jsonb FROM unnest($1::text[], $3::text[]) AS s(t, g)
ON CONFLICT DO NOTHING
"""
_ADVANCE = """
UPDATE meters SET backfill_tenant_id = $2, backfill_event_id = $3,
    backfill_scanned_count = backfill_scanned_count + $4, backfill_counted_count = backfill_counted_count + $5
WHERE id = $1
"""
_FINISH = """
UPDATE meters SET state = 'active', backfill_end_time = now(),
    backfill_scanned_count = backfill_scanned_count + $2, backfill_counted_count = backfill_counted_count + $3
WHERE id = $1
"""


@dataclass(frozen=True, slots=True)
class BackfillStep:
    """One transaction's work; meter_id is None when no meter was due."""

    meter_id: int | None
    scanned: int = 0
    counted: int = 0
    finished: bool = False


class MeterBackfiller:
    """Runs `step` until nothing is due, every `interval_seconds`, until cancelled."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        interval_seconds: float = 5.0,
        batch_keys: int = 5_000,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    ) -> None:
        self._pool = pool
        self._interval = interval_seconds
        self._batch = batch_keys
        self._settle = settle_seconds

    async def run(self) -> None:
        """Backfill meters until cancelled: each step one bounded, committed batch; idle waits between."""
        while True:
            try:
                await self.run_until_idle()
            except (*CONNECTION_ERRORS, *RETRYABLE_ERRORS) as exc:
                log.warning("meter backfill paused this time: %s", type(exc).__name__)
            except Exception:
                # Anything else is a bug; a background task that died would stop every meter's
                # backfill until a restart, so it is logged and the next pass tries again.
                log.exception("meter backfill step failed; trying again in %g s", self._interval)
            await asyncio.sleep(self._interval)

    async def run_until_idle(self, only: Sequence[str] | None = None) -> int:
        """Steps until no meter is due (or the due ones wait for old transactions); the steps taken.

        `only` limits the work to the meters of these ids (the {meter} of "meters/{meter}").
        """
        steps = 0
        while (await self.step(only)).meter_id is not None:
            steps += 1
        return steps

    async def step(self, only: Sequence[str] | None = None) -> BackfillStep:
        """One batch of one due meter (of `only`, if given), in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_NEXT_METER, self._settle, None if only is None else list(only))
            if row is None:
                return BackfillStep(None)
            meter = meter_of(row)
            after = (row["backfill_tenant_id"], row["backfill_event_id"])
            if after[0] is None and not await conn.fetchval(_SETTLED, row["create_time"], self._settle):
                return BackfillStep(None)  # the next pass looks again
            scanned, last, wanted = 0, after, []
            for found in await conn.fetch(
                _SCAN, after[0] or "", after[1] or "", self._batch, meter.spec.service, meter.spec.usage_type
            ):
                if found["scanned"] is None:
                    wanted.append((found["tenant_id"], found["event_id"]))
                else:
                    scanned, last = found["scanned"], (found["tenant_id"], found["event_id"])
            counted = await _write(conn, meter, wanted)
            finished = scanned < self._batch
            if finished:
                await conn.execute(_FINISH, meter.id, scanned, counted)
                log.info("meter %s backfilled", meter.name)
            else:
                await conn.execute(_ADVANCE, meter.id, last[0], last[1], scanned, counted)
            return BackfillStep(meter.id, scanned, counted, finished)


async def _write(conn: asyncpg.Connection, meter: Meter, wanted: list[tuple[str, str]]) -> int:
    """Add the meter's contributions of these events; the number it counts."""
    if not wanted:
        return 0
    rows: list[EventRow] = []
    kept_tenants: list[str] = []
    kept_groups: list[str] = []
    for key in await conn.fetch(_LOCK_EVENTS, [t for t, _ in wanted], [e for _, e in wanted]):
        if key["cancel_time"] is None:
            rows.append(
                EventRow(
                    key["tenant_id"],
                    key["event_id"],
                    meter.spec.service,
                    meter.spec.usage_type,
                    key["quantity"],
                    to_micros(key["event_time"]),
                    key["dimensions"],
                )
            )
        elif meter.spec.aggregation is Aggregation.TIME_WEIGHTED:
            entry = contribution(meter, json.loads(key["dimensions"]), key["quantity"])
            if entry is not None:
                kept_tenants.append(key["tenant_id"])
                kept_groups.append(entry.group_values)
    found = MeterMap([meter]).contributions(rows)
    if len(found):
        await conn.execute(_WRITE, *found.columns())
    if kept_tenants:
        await conn.execute(_KEEP_SERIES, kept_tenants, meter.id, kept_groups)
    return len(found)
