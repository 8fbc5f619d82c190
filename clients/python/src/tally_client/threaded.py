"""The batching ingester for code without an event loop: an AsyncIngester run by a background thread.

The thread owns an event loop, an asyncio channel and the AsyncIngester; the caller's
methods hand work to it and wait for the answer. `add()` returns as soon as the event
is buffered, and waits for room at most `timeout` seconds when the buffer is full.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from tally_client.clock import SYSTEM_CLOCK, Clock
from tally_client.connection import Connection
from tally_client.errors import IngesterClosedError, IngesterFullError
from tally_client.ingester import STREAM_RETRY, AsyncIngester, IngestCounts
from tally_client.models import UsageEvent
from tally_client.retry import RetryPolicy

T = TypeVar("T")


class Ingester:
    """Batches events onto StreamUsage from any thread (see tally_client.ingester for the guarantees).

    Use it as a context manager, or call `close()`: it waits for every acknowledgement.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_buffered_events: int = 50_000,
        max_batches_in_flight: int = 8,
        retry: RetryPolicy = STREAM_RETRY,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        from tally_client.aio import AsyncTallyClient  # the async client imports nothing of this module

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tally-ingester", daemon=True)
        self._thread.start()
        self._final: IngestCounts | None = None  # set by close()

        async def build() -> tuple[AsyncTallyClient, AsyncIngester]:
            client = AsyncTallyClient(connection)
            ingester = client.ingester(
                batch_size=batch_size,
                flush_interval=flush_interval,
                max_buffered_events=max_buffered_events,
                max_batches_in_flight=max_batches_in_flight,
                retry=retry,
                clock=clock,
            )
            ingester.start()
            return client, ingester

        self._client, self._ingester = self._run(build())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _within(self, seconds: float | None, coroutine: Coroutine[Any, Any, T]) -> T:
        # The limit is applied on the loop, so an event is either buffered or refused, never both.
        async with asyncio.timeout(seconds):
            return await coroutine

    def add(self, event: UsageEvent, *, timeout: float | None = 10.0) -> None:
        """Buffer one event; if the buffer is full, wait at most `timeout` seconds, then IngesterFullError."""
        try:
            self._run(self._within(timeout, self._ingester.add(event)))
        except TimeoutError:
            raise IngesterFullError(
                f"no room in the ingester's buffer after {timeout} s: the server is not keeping up"
            ) from None

    def add_many(self, events: Iterable[UsageEvent], *, timeout: float | None = 10.0) -> None:
        """Buffer events in one hand-over to the background thread (cheaper than many `add` calls)."""
        try:
            self._run(self._within(timeout, self._ingester.add_many(list(events))))
        except TimeoutError:
            raise IngesterFullError(
                f"no room in the ingester's buffer after {timeout} s: the server is not keeping up"
            ) from None

    def flush(self, *, timeout: float | None = None) -> IngestCounts:
        """Send what is buffered and wait until every event added so far is acknowledged.

        TimeoutError after `timeout` seconds (the events stay buffered and keep being sent).
        """
        return self._run(self._within(timeout, self._ingester.flush()))

    @property
    def counts(self) -> IngestCounts:
        """What the server said so far, and what is held; after close, the final counts."""
        if self._final is not None:
            return self._final

        async def read() -> IngestCounts:
            return self._ingester.counts

        return self._run(read())

    def close(self, *, timeout: float | None = None) -> IngestCounts:
        """Send the rest, wait for every acknowledgement, then stop the thread.

        After `timeout` seconds it stops anyway and raises IngesterClosedError with the
        number of events not acknowledged (resending them is safe).
        """
        if self._final is not None:
            return self._final
        try:
            return self._run(self._within(timeout, self._ingester.close()))
        except TimeoutError:
            raise IngesterClosedError(
                f"closed after {timeout} s with {self._ingester.counts.pending} events not acknowledged"
            ) from None
        finally:
            self._final = self.counts
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Ingester:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
