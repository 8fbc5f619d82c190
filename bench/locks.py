"""Lock waits during a run, sampled from pg_stat_activity: how long batches wait on each other's locks.

A thread polls pg_stat_activity every `interval` for client backends waiting on a heavyweight
lock (wait_event_type 'Lock': row locks of rollup upserts, tuple and transaction locks). One
wait is one (backend pid, query_start) seen waiting in consecutive samples; its length is
estimated as samples x interval, so waits shorter than the interval are mostly not seen
(resolution: the interval, 5 ms by default). Lock wait per batch is then: each observed
wait, and zero for every other batch of the run.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
from datetime import datetime
from typing import Any

import asyncpg

_WAITING = """
SELECT pid, query_start FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND wait_event_type = 'Lock'"""


class LockSampler:
    """`with LockSampler(dsn) as locks: ...`, then `locks.per_batch(batches)`."""

    def __init__(self, dsn: str, interval: float = 0.005) -> None:
        self._dsn = dsn
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()), daemon=True)
        self.waits: dict[tuple[int, datetime], int] = {}  # (pid, query_start) -> samples seen waiting
        self.samples = 0

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            while not self._stop.is_set():
                for row in await conn.fetch(_WAITING):
                    key = (row["pid"], row["query_start"])
                    self.waits[key] = self.waits.get(key, 0) + 1
                self.samples += 1
                await asyncio.sleep(self._interval)
        finally:
            await conn.close()

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def per_batch(self, batches: int) -> dict[str, Any]:
        """Median, p90, mean and total lock wait per batch in ms, over `batches` batches."""
        waits = [count * self._interval * 1000 for count in self.waits.values()]
        waits += [0.0] * max(0, batches - len(waits))
        waits.sort()
        if not waits:
            return {
                "lock_wait_p50_ms": 0.0,
                "lock_wait_p90_ms": 0.0,
                "lock_wait_mean_ms": 0.0,
                "lock_waits": 0,
            }
        return {
            "lock_wait_p50_ms": round(statistics.median(waits), 2),
            "lock_wait_p90_ms": round(waits[int(len(waits) * 0.9) - 1 if len(waits) >= 10 else -1], 2),
            "lock_wait_mean_ms": round(statistics.fmean(waits), 3),
            "lock_waits": len(self.waits),
        }
