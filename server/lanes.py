"""Write lanes: group commit for everything that records events.

A transaction has a fixed cost (a round trip, a WAL flush) that a small batch or a single
reported event cannot amortize. A lane writes one transaction at a time; whatever is
submitted while it writes waits and goes into the next transaction together, up to
`max_events`. An idle lane writes a submission at once: nothing waits for a timer.

Submissions are written in the order they were submitted, and the first report of an
event wins in that order, so a stream that keeps to one lane keeps its own order even when
its batches share a transaction. Several lanes write concurrently, each on its own
connection, which is what lets PostgreSQL use more than one core.

Each submission learns how many of its events were new. Writes run in the lane's own task:
a caller that goes away does not cancel a write, and `drain()` waits for them at shutdown.

A submission with audit entries (a backfill) is written in a transaction of its own, in
its place in the order, so that its entries count exactly its own new events.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from typing import NamedTuple

from opentelemetry.context import Context

from server.domain.events import EventKey, EventRow, columns_of
from server.domain.meters import MeterMap
from server.domain.stores import AuditHook, EventWriter
from server.telemetry.ingest import OFF, IngestTelemetry

# The active meters at the moment a transaction is written (see server.metering.meters).
MeterSource = Callable[[], MeterMap]
_NO_METERS = MeterMap(())


def _no_meters() -> MeterMap:
    return _NO_METERS


class _Submission(NamedTuple):
    rows: Mapping[EventKey, EventRow]
    future: asyncio.Future[int]
    audit: AuditHook | None
    trace: Context | None  # the submitter's trace context, which parents the commit span


class Lane:
    def __init__(
        self,
        store: EventWriter,
        max_events: int,
        telemetry: IngestTelemetry = OFF,
        meters: MeterSource = _no_meters,
    ) -> None:
        self._store = store
        self._meters = meters
        self._max_events = max_events
        self._telemetry = telemetry
        self._pending: deque[_Submission] = deque()
        self._writer: asyncio.Task[None] | None = None

    def submit(
        self, rows: Mapping[EventKey, EventRow], audit: AuditHook | None = None
    ) -> asyncio.Future[int]:
        """Queue distinct rows for writing; the future gives how many of them were new.

        The call itself is the ordering point: rows submitted earlier win over rows
        submitted later with the same key. `audit` gives the audit entries to write in the
        same transaction, from the keys that were new.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_Submission(rows, future, audit, self._telemetry.trace_context()))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending())
        return future

    async def drain(self) -> None:
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                taken = [self._pending.popleft()]
                size = len(taken[0].rows)
                while (
                    taken[0].audit is None
                    and self._pending
                    and self._pending[0].audit is None
                    and size + len(self._pending[0].rows) <= self._max_events
                ):
                    taken.append(self._pending.popleft())
                    size += len(taken[-1].rows)
                await self._write(taken)
        finally:
            self._writer = None

    async def _write(self, taken: list[_Submission]) -> None:
        merged: dict[EventKey, EventRow] = {}
        for rows, _, _, _ in taken:
            for key, row in rows.items():
                merged.setdefault(key, row)
        try:
            with self._telemetry.committing([s.trace for s in taken], len(merged)):
                # An audited submission is always taken alone (see _write_pending).
                # Meters are matched here, on the merged rows, so that a meter created while a
                # batch waited counts it: the map in force when the transaction is written.
                columns = columns_of(merged)
                contributions = self._meters().contributions(list(merged.values()))
                if len(contributions):
                    new_keys = await self._store.record_new_keys(columns, taken[0].audit, contributions)
                else:
                    new_keys = await self._store.record_new_keys(columns, taken[0].audit)
        except Exception as exc:  # every waiter gets the failure; none is left hanging
            for _, future, _, _ in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        for rows, future, _, _ in taken:
            accepted = 0
            for key in rows:
                if key in new_keys:
                    accepted += 1
                    new_keys.discard(key)  # a later submission of the key is a duplicate
            if not future.done():
                future.set_result(accepted)


class WriteLanes:
    """A fixed set of lanes. Single reports share lane 0 (they merge best on one lane);
    streams are spread over all lanes, one lane for the whole stream."""

    def __init__(
        self,
        store: EventWriter,
        *,
        lanes: int,
        max_events: int = 5_000,
        telemetry: IngestTelemetry = OFF,
        meters: MeterSource = _no_meters,
    ) -> None:
        self._lanes = [Lane(store, max_events, telemetry, meters) for _ in range(max(1, lanes))]
        self._next = itertools.cycle(self._lanes)

    @property
    def reports(self) -> Lane:
        return self._lanes[0]

    def for_stream(self) -> Lane:
        return next(self._next)

    async def drain(self) -> None:
        for lane in self._lanes:
            await lane.drain()
