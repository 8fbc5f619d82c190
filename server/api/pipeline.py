"""Overlapping the batches of one stream: prepare the next while the last ones commit.

A stream handled one batch at a time leaves the server idle while PostgreSQL commits and
PostgreSQL idle while the server decodes and validates. Here a reader takes messages off
the stream and starts preparing each at once, with at most `window` batches in flight.
Prepared batches are submitted for writing in the stream's order (to one write lane,
which writes in submission order, merging batches that wait), so within a stream the
first report of an event wins exactly as without the overlap. Results come back in
order, each once its batch is committed. The bounds turn a fast client into
backpressure: the reader stops reading and gRPC flow control stops the client. Besides
the per-stream window, an EventBudget shared by every stream of the server bounds the
events held in memory at once, whatever the number of streams and the batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

M = TypeVar("M")
P = TypeVar("P")
R = TypeVar("R")


class EventBudget:
    """How many events all streams together may hold between reading and committing."""

    def __init__(self, max_events: int) -> None:
        self._max = max_events
        self._used = 0
        self._freed = asyncio.Condition()

    @property
    def in_use(self) -> int:
        """Events taken and not yet given back."""
        return self._used

    async def acquire(self, events: int) -> int:
        """Wait until `events` fit; returns what was taken (a batch larger than the whole
        budget takes all of it, once nothing else is in flight)."""
        events = min(events, self._max)
        async with self._freed:
            await self._freed.wait_for(lambda: self._used + events <= self._max)
            self._used += events
        return events

    async def release(self, events: int) -> None:
        async with self._freed:
            self._used -= events
            self._freed.notify_all()


class _EarlierBatchFailed(Exception):
    """A batch is not submitted after an earlier batch of its stream failed."""


async def pipelined(
    messages: AsyncIterator[M],
    prepare: Callable[[M], Awaitable[P]],
    submit: Callable[[P], Awaitable[R]],
    *,
    budget: EventBudget,
    size: Callable[[M], int],
    window: int = 4,
) -> AsyncIterator[tuple[M, R]]:
    """(message, result) pairs in message order; see the module docstring.

    submit(prepared) is called in message order, and the call itself must fix the order
    of the writes (it queues and returns an awaitable of the result).
    """
    in_flight: asyncio.Queue[tuple[M, asyncio.Future[R]] | None] = asyncio.Queue(maxsize=window)

    async def run(
        message: M, taken: int, previous: asyncio.Future[bool] | None, submitted: asyncio.Future[bool]
    ) -> R:
        try:
            try:
                prepared = await prepare(message)
                if previous is not None and not await previous:
                    raise _EarlierBatchFailed
                result = submit(prepared)
            except BaseException:
                submitted.set_result(False)
                raise
            submitted.set_result(True)
            return await result
        finally:
            await budget.release(taken)

    async def read() -> None:
        previous: asyncio.Future[bool] | None = None
        try:
            async for message in messages:
                taken = await budget.acquire(size(message))
                submitted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                result = asyncio.ensure_future(run(message, taken, previous, submitted))
                previous = submitted
                await in_flight.put((message, result))
        finally:
            await in_flight.put(None)

    reader = asyncio.create_task(read())
    pending: list[asyncio.Future[R]] = []
    try:
        while (item := await in_flight.get()) is not None:
            message, result = item
            pending.append(result)
            yield message, await result
            pending.remove(result)
        await reader  # re-raises a failure to read the stream
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        for result in pending:
            # Later batches see the failure and skip their commit; a commit already under
            # way finishes (writes are shielded). Nobody reads these results any more.
            result.add_done_callback(lambda f: f.cancelled() or f.exception())
