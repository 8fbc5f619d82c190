"""Overlapping the batches of one stream: prepare the next while the last ones commit.

A stream handled one batch at a time leaves the server idle while PostgreSQL commits and
PostgreSQL idle while the server decodes and validates. Here a reader takes messages off
the stream and starts preparing each at once, with at most `window` batches between
being read and being answered. Prepared batches are submitted for writing in the
stream's order (to one write lane, which writes in submission order, merging batches
that wait), so within a stream the first report of an event wins exactly as without the
overlap. Results come back in order, each once its batch is committed. The bounds turn
a fast client into backpressure: the reader stops reading and gRPC flow control stops
the client. Besides the per-stream window, an EventBudget shared by every stream of the
server bounds the events held in memory at once, whatever the number of streams and the
batch size.

However the stream ends (its last result, a bad batch, a failed write, a failed read, or
the consumer going away: a client that cancels, disconnects or runs out of deadline, or
a server shutting down), the pipeline stops within `cleanup_seconds`: the reader and
every batch not yet answered are cancelled and awaited, their budget is given back and
no task is left behind. Nothing here waits on the consumer, so a consumer that stopped
listening cannot hold the cleanup up. A write already handed to the lane is not undone:
the lane finishes or fails it on its own, whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from typing import Any, TypeVar

log = logging.getLogger(__name__)

M = TypeVar("M")
P = TypeVar("P")
R = TypeVar("R")

# How long the end of a stream may take to cancel and collect its own tasks. They stop at
# their next await, in microseconds; the bound only guards against a dependency that
# swallows cancellation, which then gets logged instead of holding the handler forever.
CLEANUP_SECONDS = 5.0


class EventBudget:
    """How many events all streams together may hold between reading and committing.

    Waiters are served first come, first served, so a large batch is not starved by a
    stream of small ones. release() never waits: it is safe in any `finally`.
    """

    def __init__(self, max_events: int) -> None:
        self._max = max_events
        self._used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        """Events taken and not yet given back."""
        return self._used

    async def acquire(self, events: int) -> int:
        """Wait until `events` fit; returns what was taken (a batch larger than the whole
        budget takes all of it, once nothing else is in flight)."""
        events = min(events, self._max)
        if not self._waiters and self._used + events <= self._max:
            self._used += events
            return events
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (events, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._used -= events  # granted, but the waiter went away before using it
            else:
                self._waiters.remove(entry)
            self._grant()
            raise
        return events

    def release(self, events: int) -> None:
        self._used -= events
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            events, waiter = self._waiters[0]
            if self._used + events > self._max:
                return
            self._waiters.popleft()
            self._used += events
            waiter.set_result(None)


class _EarlierBatchFailed(Exception):
    """A batch is not submitted after an earlier batch of its stream failed."""


async def pipelined(
    messages: AsyncIterator[M],
    prepare: Callable[[M], Awaitable[P]],
    submit: Callable[[P], Awaitable[R]],
    *,
    budget: EventBudget,
    size: Callable[[M], int],
    window: int = 6,
    cleanup_seconds: float = CLEANUP_SECONDS,
) -> AsyncGenerator[tuple[M, R], None]:
    """(message, result) pairs in message order; see the module docstring.

    submit(prepared) is called in message order, and the call itself must fix the order
    of the writes (it queues and returns an awaitable of the result). A failure to
    prepare or to write a batch is raised when its turn comes; a failure to read is
    raised after the results of every batch read before it. Close the generator (or let
    it finish) to stop the pipeline: `contextlib.aclosing`.
    """
    loop = asyncio.get_running_loop()
    # Unbounded, so that putting never waits: `room` is what bounds the batches in flight.
    in_flight: asyncio.Queue[tuple[M, asyncio.Task[R]] | None] = asyncio.Queue()
    room = asyncio.Semaphore(window)

    async def run(message: M, previous: asyncio.Future[bool] | None, submitted: asyncio.Future[bool]) -> R:
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

    def start(message: M, taken: int, previous: asyncio.Future[bool] | None) -> asyncio.Future[bool]:
        submitted: asyncio.Future[bool] = loop.create_future()
        task = loop.create_task(run(message, previous, submitted))

        def finished(_: asyncio.Task[R]) -> None:
            # Also when the task was cancelled before it ran a line of `run`.
            budget.release(taken)
            if not submitted.done():
                submitted.set_result(False)

        task.add_done_callback(finished)
        in_flight.put_nowait((message, task))
        return submitted

    closed = False

    async def read() -> None:
        previous: asyncio.Future[bool] | None = None
        iterator = aiter(messages)
        try:
            # `closed` is checked after every wait as well as the reader being cancelled:
            # a cancellation lost in a dependency must not leave the reader running.
            while True:
                await room.acquire()
                if closed:
                    return
                try:
                    message = await anext(iterator)
                except StopAsyncIteration:
                    return
                if closed:
                    return
                taken = await budget.acquire(size(message))
                if closed:
                    budget.release(taken)
                    return
                previous = start(message, taken, previous)
        finally:
            in_flight.put_nowait(None)

    reader = loop.create_task(read())
    current: asyncio.Task[R] | None = None
    try:
        while (item := await in_flight.get()) is not None:
            message, current = item
            result = await current
            current = None
            room.release()
            yield message, result
        await reader  # re-raises a failure to read the stream
    finally:
        closed = True
        unanswered: list[asyncio.Task[R]] = [] if current is None else [current]
        reader.cancel()
        for _ in range(window):
            room.release()  # a reader waiting for room wakes and sees `closed`
        await _stopped([reader], cleanup_seconds)
        while not in_flight.empty():
            if (item := in_flight.get_nowait()) is not None:
                unanswered.append(item[1])
        for task in unanswered:
            task.cancel()
        await _stopped(unanswered, cleanup_seconds)


async def _stopped(tasks: Collection[asyncio.Future[Any]], seconds: float) -> None:
    """Wait for cancelled tasks to end, at most `seconds`; collect their outcomes."""
    running = [task for task in tasks if not task.done()]
    if running:
        _, late = await asyncio.wait(running, timeout=seconds)
        if late:
            log.error("%d stream task(s) still running %g s after they were cancelled", len(late), seconds)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: nobody reads these results any more
