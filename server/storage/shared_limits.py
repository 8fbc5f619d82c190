"""Queries on rate_limit_buckets and stream_slots: the limits every Tally process on one database shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

# Each process adds what it spent since it last settled and reads back the shared balance.
# A row holds the balance as of `updated`. The spending is subtracted as of when it began
# ($4, the writer's clock: greatest() keeps a clock slightly behind from un-refilling, and
# tests can drive it), after the refill up to then; the balance returned is refilled from
# there to now ($5). Rows are locked in key order, so concurrent settlements cannot deadlock.
_SETTLE = """
INSERT INTO rate_limit_buckets AS b (key, rate, tokens, updated)
SELECT key, rate, rate - spent, spent_at
  FROM unnest($1::text[], $2::float8[], $3::float8[], $4::float8[]) AS s(key, rate, spent, spent_at)
 ORDER BY key
ON CONFLICT (key) DO UPDATE SET
    rate = excluded.rate,
    tokens = least(excluded.rate, b.tokens + greatest(0, excluded.updated - b.updated) * excluded.rate)
             - (excluded.rate - excluded.tokens),
    updated = greatest(b.updated, excluded.updated)
RETURNING key, least(b.rate, b.tokens + greatest(0, $5 - b.updated) * b.rate) AS tokens
"""
# A bucket that has refilled is the same as no row; dropping those keeps the table small.
_FORGET_FULL = "DELETE FROM rate_limit_buckets WHERE tokens + ($1 - updated) * rate >= rate"

_CLEAR_STREAMS = "DELETE FROM stream_slots WHERE worker = $1"
_WRITE_STREAMS = """
INSERT INTO stream_slots (worker, principal, open, seen)
SELECT $1, principal, open, $4 FROM unnest($2::text[], $3::int[]) AS s(principal, open)
"""
_OTHERS_STREAMS = """
SELECT principal, sum(open)::int AS open FROM stream_slots
 WHERE worker <> $1 AND seen > $2 GROUP BY principal
"""
_FORGET_STALE_STREAMS = "DELETE FROM stream_slots WHERE seen <= $1"


class SharedLimitStore:
    """The rate-limit buckets and stream counts that every Tally process on one database shares."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def settle(self, spent: Sequence[tuple[str, float, float, float]], now: float) -> dict[str, float]:
        """Subtract each (key, rate, spent, spent_at) from its shared bucket as of spent_at.

        Returns every key's balance at `now`.
        """
        keys, rates, amounts, times = (list(column) for column in zip(*spent, strict=True))
        rows = await self._pool.fetch(_SETTLE, keys, rates, amounts, times, now)
        return {row["key"]: row["tokens"] for row in rows}

    async def forget_full(self, now: float) -> None:
        """Delete the buckets that have refilled by `now`: a full bucket is the same as none."""
        await self._pool.execute(_FORGET_FULL, now)

    async def streams_elsewhere(
        self, worker: str, open_here: Mapping[str, int] | None, now: float, stale_seconds: float
    ) -> dict[str, int]:
        """Record this process's open streams per principal (unless None).

        Returns the other live processes' sums.
        """
        if open_here is None:
            rows = await self._pool.fetch(_OTHERS_STREAMS, worker, now - stale_seconds)
            return {row["principal"]: row["open"] for row in rows}
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_CLEAR_STREAMS, worker)
            if open_here:
                await conn.execute(_WRITE_STREAMS, worker, list(open_here), list(open_here.values()), now)
            rows = await conn.fetch(_OTHERS_STREAMS, worker, now - stale_seconds)
        return {row["principal"]: row["open"] for row in rows}

    async def forget_streams(self, worker: str | None, now: float, stale_seconds: float) -> None:
        """Drop a stopping process's rows (worker), and rows of processes gone without a word."""
        if worker is not None:
            await self._pool.execute(_CLEAR_STREAMS, worker)
        await self._pool.execute(_FORGET_STALE_STREAMS, now - stale_seconds)
