"""Whether PostgreSQL answers: one `SELECT 1` on a connection of the probe's own.

Its own connection, not a pool's, so a pool saturated by ingestion does not make a busy
server look dead. It drives grpc.health.v1 (server.health) and the /readyz of the parent
of `tally serve --workers N` (server.telemetry.workers), which has no gRPC.
"""

from __future__ import annotations

import asyncpg

from server.storage.database import CONNECTION_ERRORS


class DatabaseProbe:
    def __init__(self, dsn: str, *, timeout_seconds: float = 2.0) -> None:
        self._dsn = dsn
        self._timeout = timeout_seconds
        self._conn: asyncpg.Connection | None = None

    async def check(self) -> bool:
        """True if the database answered within the timeout (connecting again if it must)."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
            await self._conn.fetchval("SELECT 1", timeout=self._timeout)
            return True
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
