"""Standard grpc.health.v1 health, driven by whether PostgreSQL answers.

The probe (server.storage.probe) uses its own connection, not the pool, so a pool
saturated by ingestion does not make a busy server look dead; a database that does not
answer within the timeout turns every service NOT_SERVING until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.storage.probe import DatabaseProbe

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseHealth:
    def __init__(
        self,
        servicer: health_aio.HealthServicer,
        dsn: str,
        services: Sequence[str],
        *,
        interval_seconds: float = 2.0,
        timeout_seconds: float = 2.0,
    ) -> None:
        self._servicer = servicer
        self._probe = DatabaseProbe(dsn, timeout_seconds=timeout_seconds)
        self._services = ("", *services)  # "" is the server's overall health
        self._interval = interval_seconds
        self._serving: bool | None = None

    @property
    def serving(self) -> bool:
        """What the last probe found (False before the first and while stopping)."""
        return bool(self._serving)

    async def set_all(self, serving: bool) -> None:
        if serving != self._serving:
            log.log(
                logging.INFO if serving else logging.WARNING,
                "health: %s",
                "SERVING" if serving else "NOT_SERVING",
            )
        self._serving = serving
        for service in self._services:
            await self._servicer.set(service, SERVING if serving else NOT_SERVING)

    async def check_once(self) -> bool:
        return await self._probe.check()

    async def run(self) -> None:
        """Probe forever (until cancelled)."""
        try:
            while True:
                await self.set_all(await self.check_once())
                await asyncio.sleep(self._interval)
        finally:
            self._probe.close()
