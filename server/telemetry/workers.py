"""The HTTP listener of `tally serve --workers N`, owned by the parent: one /metrics for all workers.

The workers open no HTTP port. On a scrape the parent sums the workers' metrics files
(server.telemetry.multiprocess) and adds the database figures, read once by the parent
rather than once per worker (cached and bounded: server.telemetry.figures). /healthz
answers while the parent serves; /readyz while PostgreSQL answers the parent's probe and
the parent is not stopping. The parent never imports gRPC (server.supervisor): nothing
here does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

import asyncpg
from aiohttp import web
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

from server.storage.database import create_pool
from server.storage.probe import DatabaseProbe
from server.storage.stats import read_figures
from server.telemetry.figures import DatabaseFigures
from server.telemetry.http import HttpListener
from server.telemetry.multiprocess import MetricsDirectory
from server.telemetry.tracing import resource


class Routes(Protocol):
    """More endpoints on the listener (e.g. server.payments.receiving's Stripe webhooks)."""

    async def mount(self, app: web.Application, dsn: str, metrics: MetricsDirectory) -> None:
        """Add the routes to `app`, before it starts; counts go to files of their own in `metrics`."""

    async def close(self) -> None:
        """Give back what mount() took, once the listener has stopped."""


class WorkersHttp:
    """Start with the database's dsn once the schema is migrated; stop after the workers."""

    def __init__(self, directory: MetricsDirectory, *, probe_interval_seconds: float = 2.0) -> None:
        self.directory = directory
        self.port = 0
        self._interval = probe_interval_seconds
        self._ready = False
        self._pool: asyncpg.Pool | None = None
        self._provider: MeterProvider | None = None
        self._listener: HttpListener | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._routes: list[Routes] = []

    async def start(self, dsn: str, host: str, port: int, routes: Sequence[Routes] = ()) -> None:
        """Listen on host:port for HTTP and probe the database at `dsn`; `routes` mount more endpoints.

        ValueError if the port cannot be had.
        """
        self._routes = list(routes)
        registry = CollectorRegistry()
        self.directory.register(registry)
        # The database figures through OpenTelemetry gauges, as in one process (also target_info).
        self._provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)],
            resource=resource(),
        )
        self._pool = pool = await create_pool(dsn, min_size=1, max_size=1, custom_plans=True)
        figures = DatabaseFigures(lambda: read_figures(pool, timeout_seconds=2.0))
        figures.register(self._provider.get_meter("tally"))
        probe = DatabaseProbe(dsn)
        self._ready = await probe.check()
        self._probe_task = asyncio.create_task(self._probe(probe), name="tally-parent-probe")
        self._listener = HttpListener(registry, lambda: self._ready, figures)
        for extra in self._routes:
            await extra.mount(self._listener.app, dsn, self.directory)
        try:
            await self._listener.start(host, port)
        except OSError as exc:  # taken since the check at start: told like a port in use
            raise ValueError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}") from None
        self.port = self._listener.port

    async def _probe(self, probe: DatabaseProbe) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                self._ready = await probe.check()
        finally:
            probe.close()

    def stopping(self) -> None:
        """/readyz answers 503 from now on."""
        self._ready = False
        if self._probe_task is not None:
            self._probe_task.cancel()

    async def stop(self) -> None:
        """Answer 503 on /readyz, stop the probe and the listener, and close the database pool."""
        self.stopping()
        if self._probe_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        for extra in self._routes:
            await extra.close()
        self._routes = []
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
        self.directory.remove()
