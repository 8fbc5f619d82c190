"""Overlapping the batches of one stream: prepare the next while the last one commits.

A stream handled one batch at a time leaves the server idle while PostgreSQL commits and
PostgreSQL idle while the server decodes and validates. Here a reader takes messages off
the stream and starts preparing each at once, with at most `window` batches in flight.
Commits still happen one at a time and in the stream's order, so within a stream the
first report of an event wins exactly as without the overlap; results come back in order,
each once its batch is committed. The bound turns a fast client into backpressure: the
reader stops reading and gRPC flow control stops the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

M = TypeVar("M")
P = TypeVar("P")
R = TypeVar("R")


class _EarlierBatchFailed(Exception):
    """A batch is not committed after an earlier batch of its stream failed."""


async def pipelined(
    messages: AsyncIterator[M],
    prepare: Callable[[M], Awaitable[P]],
    commit: Callable[[P], Awaitable[R]],
    *,
    window: int = 2,
) -> AsyncIterator[tuple[M, R]]:
    """(message, commit result) pairs in message order; see the module docstring."""
    in_flight: asyncio.Queue[tuple[M, asyncio.Future[R]] | None] = asyncio.Queue(maxsize=window)

    async def run(message: M, previous: asyncio.Future[R] | None) -> R:
        prepared = await prepare(message)
        if previous is not None:
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                raise _EarlierBatchFailed
        return await commit(prepared)

    async def read() -> None:
        previous: asyncio.Future[R] | None = None
        try:
            async for message in messages:
                previous = asyncio.ensure_future(run(message, previous))
                await in_flight.put((message, previous))
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
