"""Group commit for single-event reports.

Each ReportUsage call costs a database round trip and a transaction if written alone.
Under load, calls that arrive while a write is in progress wait for the next write and
go together in one batch (the same one-statement batch write as bulk ingestion), so the
database work per call falls as load rises. An idle server writes a lone event at once:
nothing waits for a timer. Each caller still learns whether its own event was new.
"""

from __future__ import annotations

import asyncio

from server.domain.events import EventRow, columns_of
from server.storage.usage import UsageStore


class ReportCoalescer:
    def __init__(self, store: UsageStore, *, max_batch: int = 500, max_writes: int = 1) -> None:
        self._store = store
        self._max_batch = max_batch
        # Concurrent batch writes, each on its own connection. One is best measured: with
        # two, most calls found a free writer and went alone (1.5 events per transaction,
        # 2,500 calls/s); with one they wait for the write in progress and go together
        # (4 per transaction, 3,200 calls/s), the server's CPU being the limit either way.
        self._max_writes = max_writes
        self._pending: list[tuple[EventRow, asyncio.Future[bool]]] = []
        self._writes: set[asyncio.Task[None]] = set()

    async def submit(self, row: EventRow) -> bool:
        """Record one valid event; True if it was new. The write survives the caller's cancellation."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._start_writes()
        return await future

    async def drain(self) -> None:
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _start_writes(self) -> None:
        while self._pending and len(self._writes) < self._max_writes:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            task = asyncio.create_task(self._write(batch))
            self._writes.add(task)
            task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        self._start_writes()

    async def _write(self, batch: list[tuple[EventRow, asyncio.Future[bool]]]) -> None:
        rows: dict[tuple[str, str], EventRow] = {}
        for row, _ in batch:
            rows.setdefault((row[0], row[1]), row)
        try:
            new_keys = await self._store.record_new_keys(columns_of(rows))
        except Exception as exc:  # every waiter gets the failure; none is left hanging
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for row, future in batch:
            key = (row[0], row[1])
            recorded = key in new_keys
            new_keys.discard(key)  # a second report of the key in the same batch is a duplicate
            if not future.done():
                future.set_result(recorded)
