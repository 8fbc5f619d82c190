"""Lock waits of the write path: how long batches wait for each other's locks in PostgreSQL.

`LockWaitSampler` polls pg_stat_activity every `interval_seconds` on a connection of its
own, and counts, per transaction (backend pid + xact_start), the samples in which it was
waiting for a heavyweight lock (wait_event_type 'Lock': a row or tuple lock, or
'transactionid', which is how PostgreSQL waits for another transaction that holds a row
or is inserting the same key). A transaction seen waiting in n samples waited about
n x interval; one never seen waited less than the interval. Per batch, the report spreads
that over every transaction committed meanwhile (pg_stat_database.xact_commit), so the
median is 0 unless more than half of the batches were seen waiting.

Use it around any load (the `scale` scenario calls it too):

    async with LockWaitSampler(dsn) as sampler:
        ...  # run the load
    print(sampler.report().line())
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

_WAITING = """
SELECT pid, xact_start, wait_event
FROM pg_stat_activity
WHERE wait_event_type = 'Lock' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
_COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


@dataclass(frozen=True, slots=True)
class LockWaits:
    """What the sampler saw: transactions, how many waited, and the wait per batch."""

    seconds: float
    samples: int
    interval_ms: float
    transactions: int  # committed while sampling (every batch is one)
    waiting_transactions: int
    total_wait_ms: float
    median_wait_ms: float  # per batch, counting the batches that never waited as 0
    p99_wait_ms: float
    max_wait_ms: float
    wait_events: dict[str, int]  # samples per wait_event (tuple, transactionid, relation...)

    def line(self) -> str:
        return (
            f"lock waits: {self.waiting_transactions} of {self.transactions} transactions seen waiting "
            f"({self.samples} samples every {self.interval_ms:g} ms); per batch median "
            f"{self.median_wait_ms:.2f} ms, p99 {self.p99_wait_ms:.2f} ms, max {self.max_wait_ms:.2f} ms; "
            f"total {self.total_wait_ms:.0f} ms; events {dict(self.wait_events)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class LockWaitSampler:
    def __init__(self, dsn: str, *, interval_seconds: float = 0.002) -> None:
        self._dsn = dsn
        self._interval = interval_seconds
        self._waits: Counter[tuple[int, datetime | None]] = Counter()
        self._events: Counter[str] = Counter()
        self._samples = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> LockWaitSampler:
        self._conn = await asyncpg.connect(self._dsn)
        self._commits0 = await self._conn.fetchval(_COMMITS)
        self._started = time.perf_counter()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None and self._conn is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._elapsed = time.perf_counter() - self._started
        # The sampler's own queries are transactions too.
        self._commits = await self._conn.fetchval(_COMMITS) - self._commits0 - self._samples - 1
        await self._conn.close()

    async def _sample(self) -> None:
        assert self._conn is not None
        while True:
            for row in await self._conn.fetch(_WAITING):
                self._waits[(row["pid"], row["xact_start"])] += 1
                self._events[row["wait_event"]] += 1
            self._samples += 1
            await asyncio.sleep(self._interval)

    def report(self) -> LockWaits:
        interval_ms = self._interval * 1000
        waited = sorted(n * interval_ms for n in self._waits.values())
        transactions = max(self._commits, len(waited))
        per_batch = [0.0] * (transactions - len(waited)) + waited
        return LockWaits(
            seconds=round(self._elapsed, 2),
            samples=self._samples,
            interval_ms=interval_ms,
            transactions=transactions,
            waiting_transactions=len(waited),
            total_wait_ms=sum(waited),
            median_wait_ms=statistics.median(per_batch) if per_batch else 0.0,
            p99_wait_ms=per_batch[int(0.99 * (len(per_batch) - 1))] if per_batch else 0.0,
            max_wait_ms=per_batch[-1] if per_batch else 0.0,
            wait_events=dict(self._events),
        )
