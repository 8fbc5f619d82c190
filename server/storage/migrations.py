"""Versioned schema migrations: numbered SQL files applied in order at start-up.

Each file runs in its own transaction and is recorded in schema_migrations. A
PostgreSQL advisory lock makes concurrent start-ups of several Tally processes apply
each migration once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

_LOCK_KEY = 0x7A11_0001  # advisory lock id reserved for migrations
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file of server/storage/migrations (NNNN_name.sql)."""

    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """The packaged migrations in version order; RuntimeError if two share a version."""
    found = []
    for entry in resources.files("server.storage").joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


async def migrate(pool: asyncpg.Pool, up_to: int | None = None) -> list[int]:
    """Apply the migrations not yet applied (to version `up_to`, if given); return those applied now.

    `up_to` serves the tests of a migration, which need a database as the one before it left it.
    """
    applied_now: list[int] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in available_migrations():
                if migration.version in done or (up_to is not None and migration.version > up_to):
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                log.info("applied migration %04d_%s", migration.version, migration.name)
                applied_now.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
