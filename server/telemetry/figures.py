"""Gauges read from the database when Prometheus scrapes.

They are total events, active tenants, invoices by state, amounts invoiced by currency.

A scrape refreshes the figures only when they are older than `max_age_seconds`, one query
at a time and within `timeout_seconds`, so scraping often or from several places costs
the database at most one short read per interval. When the database cannot answer, the
last figures stay (their age is a gauge too) and the scrape still succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import asyncpg
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from server.storage.database import CONNECTION_ERRORS
from server.storage.stats import Figures

log = logging.getLogger(__name__)


class DatabaseFigures:
    """The database figures, read through `read` at most once per `max_age_seconds`.

    See the module docstring for why and how failures are handled.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[Figures]],
        *,
        max_age_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._max_age = max_age_seconds
        self._clock = clock
        self._figures: Figures | None = None
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def figures(self) -> Figures | None:
        """The last figures read, or None before the first read succeeds."""
        return self._figures

    async def refresh(self) -> None:
        """Read the figures again if they are stale; failures keep the last ones."""
        async with self._lock:
            if self._read_at is not None and self._clock() - self._read_at < self._max_age:
                return
            try:
                self._figures = await self._read()
                self._read_at = self._clock()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("metrics: cannot read the database figures: %s", type(exc).__name__)

    def age_seconds(self) -> float | None:
        """Seconds since the figures were last read, or None if they never were."""
        return None if self._read_at is None else self._clock() - self._read_at

    def register(self, meter: Meter) -> None:
        """The observable gauges, which report the figures as last read (nothing before the first)."""

        def events(_: CallbackOptions) -> Iterable[Observation]:
            return [] if self._figures is None else [Observation(self._figures.events)]

        def tenants(_: CallbackOptions) -> Iterable[Observation]:
            return [] if self._figures is None else [Observation(self._figures.active_tenants)]

        def invoices(_: CallbackOptions) -> Iterable[Observation]:
            if self._figures is None:
                return []
            by_state: dict[str, int] = {}
            for row in self._figures.invoices:
                by_state[row.state] = by_state.get(row.state, 0) + row.count
            return [Observation(count, {"state": state}) for state, count in by_state.items()]

        def amounts(_: CallbackOptions) -> Iterable[Observation]:
            if self._figures is None:
                return []
            # A float for Prometheus: the exact amounts are the invoices' own (BillingService).
            return [
                Observation(float(row.amount), {"state": row.state, "currency": row.currency})
                for row in self._figures.invoices
            ]

        def age(_: CallbackOptions) -> Iterable[Observation]:
            seconds = self.age_seconds()
            return [] if seconds is None else [Observation(seconds)]

        meter.create_observable_gauge(
            "tally.usage.events",
            [events],
            unit="{event}",
            description="Usage events ever recorded (total records)",
        )
        meter.create_observable_gauge(
            "tally.tenants.active",
            [tenants],
            unit="{tenant}",
            description="Tenants with usage in the last 30 days (active tenants)",
        )
        meter.create_observable_gauge(
            "tally.invoices", [invoices], unit="{invoice}", description="Invoices generated, by state"
        )
        meter.create_observable_gauge(
            "tally.invoices.amount",
            [amounts],
            description="Sum of invoice totals by state and currency (revenue: the finalized states)",
        )
        meter.create_observable_gauge(
            "tally.figures.age",
            [age],
            unit="s",
            description="Age of the database figures (a scrape reads them again once they are older "
            "than the cache's maximum age)",
        )
