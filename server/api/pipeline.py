"""Overlapping the batches of one stream: prepare the next while the last ones commit.

A stream handled one batch at a time leaves the server idle while PostgreSQL commits and
PostgreSQL idle while the server decodes and validates. Here a reader takes messages off
the stream and starts preparing each at once, with at most `window` batches in flight.
Prepared batches are submitted for writing in the stream's order (to one write lane,
which writes in submission order, merging batches that wait), so within a stream the
first report of an event wins exactly as without the overlap. Results come back in
order, each once its batch is committed. The bound turns a fast client into
backpressure: the reader stops reading and gRPC flow control stops the client.
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
    """A batch is not submitted after an earlier batch of its stream failed."""


async def pipelined(
    messages: AsyncIterator[M],
    prepare: Callable[[M], Awaitable[P]],
    submit: Callable[[P], Awaitable[R]],
    *,
    window: int = 4,
) -> AsyncIterator[tuple[M, R]]:
    """(message, result) pairs in message order; see the module docstring.

    submit(prepared) is called in message order, and the call itself must fix the order
    of the writes (it queues and returns an awaitable of the result).
    """
    in_flight: asyncio.Queue[tuple[M, asyncio.Future[R]] | None] = asyncio.Queue(maxsize=window)

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

    async def read() -> None:
        previous: asyncio.Future[bool] | None = None
        try:
            async for message in messages:
                submitted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                result = asyncio.ensure_future(run(message, previous, submitted))
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
