"""Queries on shared_keys: secrets created once per database and read by every server process."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import asyncpg

PAGE_TOKEN_KEY = "page_token"
KEY_BYTES = 32

# Concurrent first starts race on the primary key: one insert wins, the others do nothing,
# and all of them read back the winner's key.
_CREATE = "INSERT INTO shared_keys (name, key) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
_READ = "SELECT key FROM shared_keys WHERE name = $1"


async def shared_key(
    pool: asyncpg.Pool, name: str, new_key: Callable[[], bytes] = lambda: secrets.token_bytes(KEY_BYTES)
) -> bytes:
    """The database's key called `name`, created (with `new_key()`) if it has none yet."""
    async with pool.acquire() as conn:
        await conn.execute(_CREATE, name, new_key())
        key: bytes = await conn.fetchval(_READ, name)
    return key
