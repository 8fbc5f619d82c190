"""Queries on request_ids: claiming a request's key inside the transaction of its change."""

from __future__ import annotations

import asyncpg

from server.domain.requests import RequestKey

_CLAIM = """
INSERT INTO request_ids (principal, method, request_id, fingerprint)
VALUES ($1, $2, $3, $4)
ON CONFLICT (principal, method, request_id) DO NOTHING
RETURNING true
"""

_FIND = (
    "SELECT fingerprint, response FROM request_ids WHERE principal = $1 AND method = $2 AND request_id = $3"
)

_COMPLETE = "UPDATE request_ids SET response = $4 WHERE principal = $1 AND method = $2 AND request_id = $3"


async def claim(conn: asyncpg.Connection, key: RequestKey) -> bytes | None:
    """Claim `key` in the caller's transaction: None if it is new, else the first call's response.

    A concurrent transaction that claimed the same key first makes the INSERT wait until it
    ends: if it committed, its response is returned; if it rolled back, this claim wins.
    A key first used for another request (another fingerprint) raises REQUEST_ID_REUSED.
    """
    if await conn.fetchval(_CLAIM, key.principal, key.method, key.request_id, key.fingerprint):
        return None
    row = await conn.fetchrow(_FIND, key.principal, key.method, key.request_id)
    if row["fingerprint"] != key.fingerprint:
        raise key.reused()
    response: bytes = row["response"]
    return response


async def complete(conn: asyncpg.Connection, key: RequestKey, response: bytes) -> None:
    """Store the response of the change that claimed `key`, in the same transaction."""
    await conn.execute(_COMPLETE, key.principal, key.method, key.request_id, response)
