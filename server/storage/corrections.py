"""Cancelling a recorded event: every aggregation forgets it, in one transaction.

Everything needed is kept with the idempotency key (service, usage type, quantity, time,
dimensions), so no raw event is read. The key itself stays, marked cancelled, so that the
event sent again is still a duplicate.

- SUM and COUNT: a negative contribution in the canceller's own rollup stripe.
- MAX, MIN, LATEST: the event's value is deleted and its hour recomputed from the values
  that survive (meter_values). meter_hourly is locked against the background fold meanwhile.
- UNIQUE_COUNT: the carriers of a value in an hour are its hour row's event and its
  meter_unique_values rows (migration 0056). The event's own row goes; if it was the hour
  row's, the row passes to another carrier, or goes when there is none. Then if no hour
  row of the day carries the value, the day's bit of the month row is cleared, and the
  month row goes with its last day. The counts lose what went, in the event's hour
  (meter_unique_counts, in the canceller's stripe). meter_distinct_hours is locked in
  SHARE ROW EXCLUSIVE mode first: it waits for the batches writing it to commit and holds
  new ones back for the few milliseconds of the check, so that a batch adding the same
  value concurrently cannot be missed. Batches write a month row or a carrier only in a
  statement that writes the hour rows, so the lock covers those too; and cancellers, whom
  it serializes, never hand a row to a carrier another one is taking away.
- TIME_WEIGHTED: the reading is deleted and its hour marked dirty (the cache of that hour
  is no longer used; the background task summarises it again).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from decimal import Decimal

import asyncpg

from server.domain.aggregation import day_bit, month_bounds
from server.domain.audit import AuditEntry
from server.domain.errors import ErrorReason, NotFound
from server.domain.events import CancelledEvent
from server.domain.meters import Meter, contribution
from server.domain.requests import Once, Replayed
from server.domain.timeutil import MICROS_PER_DAY, MICROS_PER_HOUR, to_datetime, to_micros
from server.storage import audit, request_ids
from server.storage.database import run_with_retries
from server.storage.usage import ADD_UNIQUE_COUNTS

_KEY = """
SELECT service, usage_type, quantity::text AS quantity, event_time, dimensions::text AS dimensions,
       cancel_time
FROM usage_event_keys WHERE tenant_id = $1 AND event_id = $2
FOR UPDATE
"""
_MARK = """
UPDATE usage_event_keys SET cancel_time = now() WHERE tenant_id = $1 AND event_id = $2
RETURNING cancel_time
"""
_UNROLL = """
INSERT INTO usage_rollups AS r
    (tenant_id, hour, service, usage_type, dimensions, stripe, quantity, event_count)
VALUES ($1, date_trunc('hour', $2::timestamptz, 'UTC'), $3, $4, $5::jsonb, pg_backend_pid(), -$6::numeric, -1)
ON CONFLICT (tenant_id, hour, service, usage_type, dimensions, stripe) DO UPDATE
    SET quantity = r.quantity + excluded.quantity, event_count = r.event_count + excluded.event_count
"""
# The MAX/MIN/LATEST and UNIQUE_COUNT tables key their groups as jsonb's text (migrations
# 0054 and 0055): $n::jsonb::text.
_DELETE_VALUE = """
DELETE FROM meter_values
WHERE tenant_id = $1 AND meter_id = $2 AND hour = $3 AND group_values = $4::jsonb::text AND event_id = $5
RETURNING 1
"""
_CLEAR_HOUR = """
DELETE FROM meter_hourly
WHERE tenant_id = $1 AND meter_id = $2 AND hour = $3 AND group_values = $4::jsonb::text
"""
_RECOMPUTE_HOUR = """
INSERT INTO meter_hourly (tenant_id, meter_id, hour, group_values, stripe,
                          min_value, max_value, latest_time, latest_event_id, latest_value)
SELECT $1, $2, $3, $4::jsonb::text, 0, min(value::numeric) OVER (), max(value::numeric) OVER (),
       event_time, event_id, value::numeric
FROM meter_values
WHERE tenant_id = $1 AND meter_id = $2 AND hour = $3 AND group_values = $4::jsonb::text
ORDER BY event_time DESC, event_id COLLATE "C" DESC
LIMIT 1
"""
_DELETE_CARRIER = """
DELETE FROM meter_unique_values
WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb::text AND value = $4 AND hour = $5
  AND event_id = $6
"""
_HOUR_CARRIER = """
SELECT event_id FROM meter_distinct_hours
WHERE tenant_id = $1 AND meter_id = $2 AND hour = $5 AND group_values = $3::jsonb::text AND value = $4
"""
# Another carrier of the value in the hour takes over the hour row, and its own row goes.
_HAND_OVER = """
WITH heir AS (
    DELETE FROM meter_unique_values
    WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb::text AND value = $4 AND hour = $5
      AND event_id = (SELECT event_id FROM meter_unique_values
                      WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb::text
                        AND value = $4 AND hour = $5
                      LIMIT 1)
    RETURNING event_id
)
UPDATE meter_distinct_hours AS d SET event_id = heir.event_id
FROM heir
WHERE d.tenant_id = $1 AND d.meter_id = $2 AND d.hour = $5 AND d.group_values = $3::jsonb::text
  AND d.value = $4
RETURNING 1
"""
# $5: the day's 24 hours, probed one by one (a range would walk every value of the day).
_DAY_CARRIED = """
SELECT EXISTS (
    SELECT 1 FROM meter_distinct_hours
    WHERE tenant_id = $1 AND meter_id = $2 AND hour = ANY($5::timestamptz[])
      AND group_values = $3::jsonb::text AND value = $4
)
"""
_DELETE_HOUR_VALUE = """
DELETE FROM meter_distinct_hours
WHERE tenant_id = $1 AND meter_id = $2 AND hour = $5 AND group_values = $3::jsonb::text AND value = $4
"""
# $6: the day's bit. The month row keeps its other days; without them, it goes.
_CLEAR_DAY = """
UPDATE meter_distinct_months SET days = days & ~$6::integer
WHERE tenant_id = $1 AND meter_id = $2 AND month = $3 AND group_values = $4::jsonb::text AND value = $5
  AND days & $6::integer <> 0 AND days <> $6::integer
RETURNING 1
"""
_DELETE_MONTH_VALUE = """
DELETE FROM meter_distinct_months
WHERE tenant_id = $1 AND meter_id = $2 AND month = $3 AND group_values = $4::jsonb::text AND value = $5
  AND days = $6::integer
RETURNING 1
"""
# The counts lose what went, in the event's hour and the canceller's own stripe.
_UNCOUNT_DISTINCT = f"""
INSERT INTO meter_unique_counts AS n
    (tenant_id, meter_id, hour, group_values, stripe, hour_values, day_values, month_values)
VALUES ($1, $2, $3, $4::jsonb::text, pg_backend_pid(), -1, -$5::integer, -$6::integer)
{ADD_UNIQUE_COUNTS}
"""
_DELETE_READING = """
DELETE FROM meter_readings
WHERE tenant_id = $1 AND meter_id = $2 AND group_values = $3::jsonb AND event_time = $4 AND event_id = $5
RETURNING 1
"""
_MARK_DIRTY = """
INSERT INTO meter_tw_dirty AS d (tenant_id, meter_id, group_values, hour, stripe, changes)
VALUES ($1, $2, $3::jsonb, $4, pg_backend_pid(), 1)
ON CONFLICT (tenant_id, meter_id, group_values, hour, stripe) DO UPDATE SET changes = d.changes + 1
"""


def _event_not_found() -> NotFound:
    return NotFound("the tenant has no recorded event with this event_id", reason=ErrorReason.EVENT_NOT_FOUND)


class CorrectionStore:
    """Cancels recorded events, each in one transaction with its audit entry (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def cancel(
        self,
        tenant_id: str,
        event_id: str,
        meters: Callable[[str, str], Sequence[Meter]],
        audit_entry: Callable[[CancelledEvent], AuditEntry],
        once: Once[CancelledEvent] | None,
    ) -> CancelledEvent | Replayed:
        """Cancel the event (see the module docstring); a cancelled one is returned as it is.

        `meters(service, usage_type)` gives every non-additive meter of the usage type,
        archived ones included: what they counted must forget the event too.
        """

        async def attempt() -> CancelledEvent | Replayed:
            async with self._pool.acquire() as conn, conn.transaction():
                if once is not None and (stored := await request_ids.claim(conn, once.key)) is not None:
                    return Replayed(stored)
                row = await conn.fetchrow(_KEY, tenant_id, event_id)
                if row is None or row["service"] is None:
                    # (A key without its event is one recorded before meters whose raw month
                    # was dropped before the migration could copy it: nothing to correct.)
                    raise _event_not_found()
                event = CancelledEvent(
                    tenant_id,
                    event_id,
                    row["service"],
                    row["usage_type"],
                    Decimal(row["quantity"]),
                    row["event_time"],
                    json.loads(row["dimensions"]),
                    row["cancel_time"],
                )
                if row["cancel_time"] is None:
                    cancel_time = await conn.fetchval(_MARK, tenant_id, event_id)
                    event = CancelledEvent(**{**_fields(event), "cancel_time": cancel_time})
                    await _forget(conn, event, row["quantity"], row["dimensions"], meters)
                    await audit.append(conn, audit_entry(event))
                if once is not None:
                    await request_ids.complete(conn, once.key, once.encode(event))
                return event

        return await run_with_retries(attempt)


def _fields(event: CancelledEvent) -> dict[str, object]:
    return {name: getattr(event, name) for name in CancelledEvent.__slots__}


async def _forget(
    conn: asyncpg.Connection,
    event: CancelledEvent,
    quantity_text: str,
    dimensions_text: str,
    meters: Callable[[str, str], Sequence[Meter]],
) -> None:
    tenant_id, event_id = event.tenant_id, event.event_id
    await conn.execute(
        _UNROLL, tenant_id, event.event_time, event.service, event.usage_type, dimensions_text, quantity_text
    )
    moment = to_micros(event.event_time)
    hour = moment - moment % MICROS_PER_HOUR
    hour_time = to_datetime(hour)
    for meter in meters(event.service, event.usage_type):
        entry = contribution(meter, event.dimensions, quantity_text)
        if entry is None:
            continue
        if entry.kind == "v":
            if await conn.fetchval(
                _DELETE_VALUE, tenant_id, meter.id, hour_time, entry.group_values, event_id
            ):
                await conn.execute("LOCK TABLE meter_hourly IN SHARE ROW EXCLUSIVE MODE")
                await conn.execute(_CLEAR_HOUR, tenant_id, meter.id, hour_time, entry.group_values)
                await conn.execute(_RECOMPUTE_HOUR, tenant_id, meter.id, hour_time, entry.group_values)
        elif entry.kind == "u":
            await conn.execute("LOCK TABLE meter_distinct_hours IN SHARE ROW EXCLUSIVE MODE")
            await _forget_unique_value(
                conn, tenant_id, meter.id, entry.group_values, entry.value, hour, event_id
            )
        elif await conn.fetchval(
            _DELETE_READING, tenant_id, meter.id, entry.group_values, event.event_time, event_id
        ):
            await conn.execute(_MARK_DIRTY, tenant_id, meter.id, entry.group_values, hour_time)


async def _forget_unique_value(
    conn: asyncpg.Connection,
    tenant_id: str,
    meter_id: int,
    group_values: str,
    value: str,
    hour: int,
    event_id: str,
) -> None:
    """Drop the event from the value's carriers; the value from its hour, day and month where none is left."""
    key = (tenant_id, meter_id, group_values, value, to_datetime(hour))
    await conn.execute(_DELETE_CARRIER, *key, event_id)
    # Another event still carries the value in its hour (or, for an event recorded before the
    # meter existed, the event never counted): nothing else changes.
    if await conn.fetchval(_HOUR_CARRIER, *key) != event_id or await conn.fetchval(_HAND_OVER, *key):
        return
    await conn.execute(_DELETE_HOUR_VALUE, *key)
    day = hour - hour % MICROS_PER_DAY
    day_gone = month_gone = False
    day_hours = [to_datetime(day + i * MICROS_PER_HOUR) for i in range(24)]
    if not await conn.fetchval(_DAY_CARRIED, *key[:4], day_hours):
        month = month_bounds(hour)[0]
        month_key = (tenant_id, meter_id, to_datetime(month), group_values, value, day_bit(day))
        day_gone = bool(await conn.fetchval(_CLEAR_DAY, *month_key))
        if not day_gone:
            month_gone = day_gone = bool(await conn.fetchval(_DELETE_MONTH_VALUE, *month_key))
    gone = (int(day_gone), int(month_gone))
    await conn.execute(_UNCOUNT_DISTINCT, tenant_id, meter_id, to_datetime(hour), group_values, *gone)
