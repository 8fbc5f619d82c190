"""Tally's one HTTP listener: `GET /metrics` (Prometheus), `GET /healthz`, `GET /readyz`.

- /healthz: 200 while the process serves (liveness: it answers at all).
- /readyz: 200 while the database answers, 503 otherwise: the same probe that drives the
  grpc.health.v1 status (server.health), so both protocols tell the same truth.
- /metrics: the OpenTelemetry instruments in the Prometheus text format. The database
  figures are refreshed first (cached, bounded: server.telemetry.figures).

Other HTTP endpoints (the Stripe webhook) mount on the same `web.Application` through
`HttpListener.app` before `start()`.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.telemetry.figures import DatabaseFigures


class HttpListener:
    """The HTTP listener: /metrics from `registry`, /healthz, and /readyz from `ready`.

    `figures`, if given, are refreshed before each scrape.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        figures: DatabaseFigures | None = None,
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._figures = figures
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (0: any free port, then `self.port` says which)."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        if self._figures is not None:
            await self._figures.refresh()
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="database unavailable\n")
