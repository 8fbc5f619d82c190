"""Limits that hold for every Tally process on one database together: settled through PostgreSQL.

Each process admits or refuses a call at once from its own buckets (server.auth.limits):
no database round trip on the path of a call. Every `interval` (0.1 s by default) it
settles: in one statement it adds what it took from each bucket since the last settlement
to that key's shared bucket (rate_limit_buckets, refilled at the key's rate), as of when it
began taking it, and reads the shared balance back, which becomes its own. Open streams per
principal are settled the same way (stream_slots: each process's counts, summed over the
live ones).

What that guarantees, with N processes (workers or hosts) and a settlement interval t:
- Over any window longer than a few intervals, a key gets its rate, whichever processes
  its calls reach and however unevenly: a process serving all of a key's load gets all of
  its rate (dividing the rate by N, the simpler design, is wrong exactly there, because
  the kernel spreads connections over workers, not load).
- Within one interval, processes that have not yet seen each other's spending may each
  admit up to their bucket's balance: a burst can exceed one second's worth by what the
  other processes admit in one interval (at most one second's worth each), and is then
  paid back as debt, which holds the key's next calls back. Stream slots likewise: a
  principal may open up to N-1 streams too many within one interval.
- If the database does not answer, each process goes on with its own buckets (limits
  per process) and settles again once it answers.

Keys that no process has asked about for `active_seconds` are not settled: their shared
bucket refills by itself and their rows are dropped once full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

import asyncpg

from server.auth.limits import Limiter
from server.storage.database import CONNECTION_ERRORS

log = logging.getLogger(__name__)


class SharedLimitStore(Protocol):
    """Where the shared buckets and stream counts are kept (server.storage.shared_limits)."""

    async def settle(self, spent: Sequence[tuple[str, float, float, float]], now: float) -> dict[str, float]:
        """Subtract each (key, rate, spent, spent_at) from its shared bucket; every key's balance at `now`."""
        ...

    async def forget_full(self, now: float) -> None:
        """Drop the shared buckets that have refilled by `now`."""
        ...

    async def streams_elsewhere(
        self, worker: str, open_here: Mapping[str, int] | None, now: float, stale_seconds: float
    ) -> dict[str, int]:
        """Record this process's open streams (unless None); the other live processes' sums."""
        ...

    async def forget_streams(self, worker: str | None, now: float, stale_seconds: float) -> None:
        """Drop a stopping process's stream counts, and those of processes gone silent."""
        ...


class LimitSharing:
    """Settles one process's Limiter with the shared buckets: run() in the background, settle() once."""

    def __init__(
        self,
        limiter: Limiter,
        store: SharedLimitStore,
        *,
        interval: float = 0.1,
        active_seconds: float = 5.0,
    ) -> None:
        self._limiter = limiter
        self._store = store
        self._interval = interval
        self._active = active_seconds
        # The limiter's own clock, never another: its monotonic reading is compared with the
        # times its buckets were asked about, and the shared buckets must refill by the wall
        # time that moves with it (a fake clock's too, or real time would refill a test's buckets).
        self._clock = limiter.clock
        self.worker = uuid.uuid4().hex  # this process, in stream_slots
        self._had_streams = False
        self._last_cleanup = 0.0
        # A process that has not refreshed its stream counts for this long is taken for gone.
        self._stale = max(10 * interval, 2.0)

    async def settle(self) -> None:
        """One settlement of every active bucket and of the stream counts."""
        now_wall, now = self._clock.wall(), self._clock()
        spent: list[tuple[str, float, float, float]] = []
        owners = {}
        for buckets in self._limiter.buckets:
            if buckets.unlimited:
                continue
            for key, asked in list(buckets.asked.items()):
                if now - asked > self._active and key not in buckets.unsettled:
                    del buckets.asked[key]
                    continue
                shared_key = f"{buckets.name}:{key}"
                # What was spent goes to the shared bucket as of when the first of it was
                # taken (in wall-clock time), not as of now: refilled up to now first, a full
                # bucket would swallow the refill since then under its cap (up to an interval's
                # worth per settlement; a fake clock stepped in between lost the whole step, and
                # a stream waited for it for ever). Spending later in the interval is counted as
                # that early: at most an interval's refill too generous, and only at the cap.
                since = buckets.unsettled_since.pop(key, now)
                amount = buckets.unsettled.pop(key, 0.0)
                spent.append((shared_key, buckets.rate, amount, now_wall - (now - since)))
                owners[shared_key] = (buckets, key, since)
        if spent:
            try:
                balances = await self._store.settle(spent, now_wall)
            except BaseException:
                for shared_key, _, amount, _ in spent:  # not settled: settled next time
                    buckets, key, since = owners[shared_key]
                    buckets.unsettled[key] = buckets.unsettled.get(key, 0.0) + amount
                    if amount:
                        buckets.unsettled_since[key] = min(since, buckets.unsettled_since.get(key, since))
                raise
            for shared_key, tokens in balances.items():
                buckets, key, _ = owners[shared_key]
                buckets.settled(key, tokens)
        slots = self._limiter.streams
        if slots.limit > 0:
            # Read every time (any principal may open a stream here next); written when this
            # process has streams open or just closed its last, which also says it is alive.
            open_here = slots.open
            write = bool(open_here) or self._had_streams
            slots.elsewhere = await self._store.streams_elsewhere(
                self.worker, open_here if write else None, now_wall, self._stale
            )
            self._had_streams = bool(open_here)
        if now - self._last_cleanup > 60:
            self._last_cleanup = now
            await self._store.forget_full(now_wall)
            await self._store.forget_streams(None, now_wall, self._stale)

    async def run(self) -> None:
        """Settle every interval until cancelled; a database that does not answer is retried."""
        failing = False
        try:
            while True:
                await asyncio.sleep(self._interval)
                try:
                    await self.settle()
                    if failing:
                        log.info("shared limits: settling again")
                    failing = False
                except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    if not failing:
                        log.warning("shared limits: cannot settle (%s); per process meanwhile", exc)
                    failing = True
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                await self._store.forget_streams(self.worker, self._clock.wall(), self._stale)
