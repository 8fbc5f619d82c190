"""Queries on audit_events: appending an entry inside a caller's transaction, and listing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from server.domain.audit import AuditAction, AuditEntry, AuditEvent, State
from server.storage.database import run_with_retries

_APPEND = """
INSERT INTO audit_events (principal, request_id, action, tenant_id, resource, before, after)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)
"""

# $2: one tenant, or NULL for any; $3: the tenants the caller may see (plus the rate
# card's entries, tenant ''), or NULL for all; [$4, $5): the time range, each end optional.
_LIST = """
SELECT id, event_time, principal, request_id, action, tenant_id, resource,
       before::text AS before, after::text AS after
FROM audit_events
WHERE id > $1
  AND ($2::text IS NULL OR tenant_id = $2)
  AND ($3::text[] IS NULL OR tenant_id = '' OR tenant_id = ANY($3))
  AND ($4::timestamptz IS NULL OR event_time >= $4)
  AND ($5::timestamptz IS NULL OR event_time < $5)
ORDER BY id
LIMIT $6
"""


def _json(state: State | None) -> str | None:
    return None if state is None else json.dumps(state, ensure_ascii=False, sort_keys=True)


def _state(text: str | None) -> State | None:
    return None if text is None else json.loads(text)


async def append(conn: asyncpg.Connection, entry: AuditEntry) -> None:
    """Append an entry on `conn`, inside the transaction of the change it records."""
    await conn.execute(
        _APPEND,
        entry.principal,
        entry.request_id,
        entry.action,
        entry.tenant_id,
        entry.resource,
        _json(entry.before),
        _json(entry.after),
    )


class AuditStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def list(
        self,
        *,
        tenant_id: str | None,
        visible_tenants: Sequence[str] | None,
        start: datetime | None,
        end: datetime | None,
        after_id: int,
        limit: int,
    ) -> list[AuditEvent]:
        """Entries in trail order after `after_id`; visible_tenants None means every tenant."""

        async def attempt() -> list[AuditEvent]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    _LIST,
                    after_id,
                    tenant_id,
                    None if visible_tenants is None else list(visible_tenants),
                    start,
                    end,
                    limit,
                )
            return [
                AuditEvent(
                    id=row["id"],
                    time=row["event_time"],
                    entry=AuditEntry(
                        principal=row["principal"],
                        request_id=row["request_id"],
                        action=AuditAction(row["action"]),
                        tenant_id=row["tenant_id"],
                        resource=row["resource"],
                        before=_state(row["before"]),
                        after=_state(row["after"]),
                    ),
                )
                for row in rows
            ]

        return await run_with_retries(attempt)
