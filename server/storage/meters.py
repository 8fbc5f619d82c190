"""Queries on the meters table: define, read, list and archive meters."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import asyncpg

from server.domain.audit import AuditEntry
from server.domain.errors import AlreadyExists, ErrorReason, NotFound
from server.domain.meters import (
    Aggregation,
    BackfillProgress,
    Meter,
    MeterSpec,
    MeterState,
    initial_state,
    meter_name,
)
from server.domain.requests import Once, Replayed
from server.storage import audit, request_ids
from server.storage.database import run_with_retries

METER_COLUMNS = (
    "id, name, description, service, usage_type, filter::text AS filter, aggregation, value_dimension,"
    " group_by, state, create_time, archive_time, backfill_scanned_count, backfill_counted_count,"
    " backfill_end_time"
)
_INSERT = f"""
INSERT INTO meters (name, description, service, usage_type, filter, aggregation, value_dimension, group_by,
                    state)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)
ON CONFLICT (name) DO NOTHING
RETURNING {METER_COLUMNS}
"""
_GET = f"SELECT {METER_COLUMNS} FROM meters WHERE name = $1"
_LIST = f"SELECT {METER_COLUMNS} FROM meters WHERE name > $1 ORDER BY name LIMIT $2"
_ALL = f"SELECT {METER_COLUMNS} FROM meters ORDER BY id"
_ARCHIVE = f"""
UPDATE meters SET state = 'archived', archive_time = now()
WHERE name = $1 AND state <> 'archived'
RETURNING {METER_COLUMNS}
"""


async def states(conn: asyncpg.Connection, meter_ids: Sequence[str]) -> dict[str, MeterState]:
    """The state of each of the meters that exists, by meter id, in the caller's transaction.

    The rows are share-locked until the transaction ends, so that a plan version checked
    against a counting meter cannot commit beside that meter's archiving.
    """
    if not meter_ids:
        return {}
    rows = await conn.fetch(
        "SELECT name, state FROM meters WHERE name = ANY($1::text[]) ORDER BY name FOR SHARE",
        list(meter_ids),
    )
    return {row["name"]: MeterState(row["state"]) for row in rows}


async def by_ids(conn: asyncpg.Connection, meter_ids: Sequence[str]) -> dict[str, Meter]:
    """The meters that exist of `meter_ids`, by meter id, read in the caller's transaction."""
    if not meter_ids:
        return {}
    rows = await conn.fetch(
        f"SELECT {METER_COLUMNS} FROM meters WHERE name = ANY($1::text[])", list(meter_ids)
    )
    return {row["name"]: meter_of(row) for row in rows}


def meter_of(row: asyncpg.Record) -> Meter:
    """A meters row as a Meter."""
    return Meter(
        id=row["id"],
        spec=MeterSpec(
            meter_id=row["name"],
            service=row["service"],
            usage_type=row["usage_type"],
            aggregation=Aggregation(row["aggregation"]),
            filter=json.loads(row["filter"]),
            value_dimension=row["value_dimension"],
            group_by=tuple(row["group_by"]),
            description=row["description"],
        ),
        state=MeterState(row["state"]),
        create_time=row["create_time"],
        archive_time=row["archive_time"],
        backfill=BackfillProgress(
            row["backfill_scanned_count"], row["backfill_counted_count"], row["backfill_end_time"]
        ),
    )


def not_found(meter_id: str) -> NotFound:
    """NotFound (METER_NOT_FOUND) naming the meter "meters/{meter}"."""
    return NotFound(
        f"no meter named {meter_name(meter_id)!r}",
        reason=ErrorReason.METER_NOT_FOUND,
        metadata={"meter": meter_name(meter_id)},
    )


class MeterStore:
    """The MeterBook of server.domain.stores on PostgreSQL: the meters table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def all(self) -> list[Meter]:
        """Every meter, active and archived."""

        async def attempt() -> list[Meter]:
            async with self._pool.acquire() as conn:
                return [meter_of(row) for row in await conn.fetch(_ALL)]

        return await run_with_retries(attempt)

    async def get(self, meter_id: str) -> Meter:
        """One meter by id; NotFound (METER_NOT_FOUND) if there is none."""

        async def attempt() -> Meter:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(_GET, meter_id)
            if row is None:
                raise not_found(meter_id)
            return meter_of(row)

        return await run_with_retries(attempt)

    async def page(self, after: str, limit: int) -> list[Meter]:
        """Up to `limit` meters after the meter id `after`, in meter_id order."""

        async def attempt() -> list[Meter]:
            async with self._pool.acquire() as conn:
                return [meter_of(row) for row in await conn.fetch(_LIST, after, limit)]

        return await run_with_retries(attempt)

    async def create(
        self, spec: MeterSpec, audit_entry: Callable[[Meter], AuditEntry], once: Once[Meter] | None
    ) -> Meter | Replayed:
        """Store a new meter with its audit entry and request id, in one transaction."""

        async def attempt() -> Meter | Replayed:
            async with self._pool.acquire() as conn, conn.transaction():
                if once is not None and (stored := await request_ids.claim(conn, once.key)) is not None:
                    return Replayed(stored)
                row = await conn.fetchrow(
                    _INSERT,
                    spec.meter_id,
                    spec.description,
                    spec.service,
                    spec.usage_type,
                    json.dumps(dict(spec.filter), sort_keys=True),
                    spec.aggregation.value,
                    spec.value_dimension,
                    list(spec.group_by),
                    initial_state(spec.aggregation).value,
                )
                if row is None:
                    raise AlreadyExists(
                        f"a meter named {meter_name(spec.meter_id)!r} exists already",
                        reason=ErrorReason.METER_EXISTS,
                        metadata={"meter": meter_name(spec.meter_id)},
                    )
                meter = meter_of(row)
                await audit.append(conn, audit_entry(meter))
                if once is not None:
                    await request_ids.complete(conn, once.key, once.encode(meter))
                return meter

        return await run_with_retries(attempt)

    async def archive(
        self,
        meter_id: str,
        audit_entry: Callable[[Meter, Meter], AuditEntry],
        once: Once[Meter] | None,
    ) -> Meter | Replayed:
        """Archive a meter (audited; a backfill in progress stops); an archived one is returned unchanged."""

        async def attempt() -> Meter | Replayed:
            async with self._pool.acquire() as conn, conn.transaction():
                if once is not None and (stored := await request_ids.claim(conn, once.key)) is not None:
                    return Replayed(stored)
                before = await conn.fetchrow(_GET + " FOR UPDATE", meter_id)
                if before is None:
                    raise not_found(meter_id)
                row = await conn.fetchrow(_ARCHIVE, meter_id)
                meter = meter_of(before if row is None else row)
                if row is not None:
                    await audit.append(conn, audit_entry(meter_of(before), meter))
                if once is not None:
                    await request_ids.complete(conn, once.key, once.encode(meter))
                return meter

        return await run_with_retries(attempt)
