"""The batching ingester: events in one by one, batches out over StreamUsage, none lost or counted twice.

`add()` puts an event in a bounded buffer and returns at once; a background task
cuts the buffer into batches (when `batch_size` events wait, or the oldest has
waited `flush_interval` seconds, or on `flush()`), writes them on one StreamUsage
stream with increasing sequence numbers, and forgets a batch only when the server
acknowledges it, which it does after the batch is committed.

When the stream fails with a passing error (server restarted, connection lost,
stream limit, expired token), the batches without an acknowledgement are sent
again, first and in their order, on a new stream after a backoff that honours the
server's RetryInfo. Events are keyed by (tenant_id, event_id), so an event whose
batch was committed but not acknowledged comes back as a duplicate and is never
counted twice. Each event is acknowledged exactly once, so at the end
accepted + duplicate + rejected is the number of events added; "duplicate" then
includes events of a resent batch that the lost stream had already committed.

Memory is bounded: at most `max_buffered_events` events are held (waiting or
unacknowledged). When that many are held, `add()` waits for room (bound it with
`asyncio.timeout`) and `add_nowait()` raises IngesterFullError at once.
An error that retrying cannot fix (a bad token, a missing scope, an oversized
batch) stops the ingester: every later call raises it.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tally.v1 import resources_pb2, usage_service_pb2
from tally_client.clock import SYSTEM_CLOCK, Clock
from tally_client.convert import event_message, rejection
from tally_client.errors import (
    CallCancelledError,
    DeadlineExceededError,
    IngesterClosedError,
    IngesterFullError,
    TallyError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from tally_client.models import EventRejection, UsageEvent
from tally_client.retry import RetryPolicy, is_transient

MAX_REJECTIONS_KEPT = 1_000
STREAM_IDLE = "STREAM_IDLE"
# Streams are retried for as long as the ingester is open (max_attempts is not used):
# the buffer bounds what waits meanwhile.
STREAM_RETRY = RetryPolicy(initial_backoff=0.2, max_backoff=10.0)

# Opens a StreamUsage call (a grpc.aio StreamStreamCall) with the caller's metadata.
StreamOpener = Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class IngestCounts:
    """What the server said of the events acknowledged so far.

    `pending` events are held and not yet acknowledged, `in_flight` of them written
    on the stream and waiting for their acknowledgement; `resent_batches` counts the
    batches sent again after a lost stream; `rejections` are the first 1,000.
    """

    accepted: int
    duplicate: int
    rejected: int
    pending: int
    in_flight: int
    resent_batches: int
    reconnects: int
    rejections: tuple[EventRejection, ...]


@dataclass(slots=True)
class _Batch:
    sequence: int
    events: list[resources_pb2.UsageEvent]
    sent: int = 0  # times written on a stream

    def request(self) -> usage_service_pb2.StreamUsageRequest:
        return usage_service_pb2.StreamUsageRequest(sequence=self.sequence, events=self.events)


class _StreamEnded(UnavailableError):
    """The server ended the stream with batches still unacknowledged."""


@dataclass(slots=True)
class _Counters:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    resent_batches: int = 0
    reconnects: int = 0
    rejections: list[EventRejection] = field(default_factory=list)


async def _until(event: asyncio.Event, clock: Clock, seconds: float | None) -> bool:
    """Wait for `event` at most `seconds` of `clock` (None: no limit); True if it was set."""
    if event.is_set():
        return True
    if seconds is None:
        await event.wait()
        return True
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep(max(0.0, seconds)))
    try:
        await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        sleeper.cancel()
    return event.is_set()


class AsyncIngester:
    """Batches events onto StreamUsage with acknowledgements, resends and back-pressure (see module doc).

    Use it as an async context manager (or call `start()` and `close()`); `close()`
    waits until every event added is acknowledged.
    """

    def __init__(
        self,
        open_stream: StreamOpener,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_buffered_events: int = 50_000,
        max_batches_in_flight: int = 8,
        idle_close_seconds: float = 30.0,
        retry: RetryPolicy = STREAM_RETRY,
        on_token_expired: Callable[[], None] = lambda: None,
        clock: Clock = SYSTEM_CLOCK,
        random: Callable[[], float] = random.random,
    ) -> None:
        if batch_size < 1 or max_buffered_events < batch_size or max_batches_in_flight < 1:
            raise ValueError("need 1 <= batch_size <= max_buffered_events and max_batches_in_flight >= 1")
        self._open_stream = open_stream
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._capacity = max_buffered_events
        self._max_in_flight = max_batches_in_flight
        self._idle_close = idle_close_seconds
        self._retry = retry
        self._on_token_expired = on_token_expired
        self._clock = clock
        self._random = random

        self._pending: list[resources_pb2.UsageEvent] = []
        self._pending_since: float | None = None
        self._queued: deque[_Batch] = deque()  # cut, not written on the current stream
        self._in_flight: deque[_Batch] = deque()  # written, waiting for their acknowledgement
        self._held = 0  # events in the three above: what the memory bound counts
        self._added = 0
        self._acknowledged = 0
        self._next_sequence = 1
        self._flush_requested = False
        self._closing = False
        self._failure: TallyError | None = None
        self._counters = _Counters()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # the sender has something to do
        self._progress = asyncio.Event()  # replaced after each acknowledgement or failure

    # -- the caller's side ------------------------------------------------------------

    @property
    def counts(self) -> IngestCounts:
        """What the server said so far, and what is held: a snapshot, never blocks."""
        c = self._counters
        return IngestCounts(
            accepted=c.accepted,
            duplicate=c.duplicate,
            rejected=c.rejected,
            pending=self._held,
            in_flight=sum(len(batch.events) for batch in self._in_flight),
            resent_batches=c.resent_batches,
            reconnects=c.reconnects,
            rejections=tuple(c.rejections),
        )

    def start(self) -> None:
        """Start the background sender, if it has not started (adding an event starts it too)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tally-ingester")

    async def __aenter__(self) -> AsyncIngester:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise IngesterClosedError(f"the ingester stopped: {self._failure}") from self._failure
        if self._closing:
            raise IngesterClosedError("the ingester is closed")

    def add_nowait(self, event: UsageEvent) -> None:
        """Buffer one event; IngesterFullError at once if the buffer is full."""
        self._check_open()
        message = event_message(event)  # a bad value fails here, in the caller's hands
        if self._held >= self._capacity:
            raise IngesterFullError(
                f"the ingester holds {self._held} events (max_buffered_events); the server is not keeping up"
            )
        self.start()
        self._pending.append(message)
        self._held += 1
        self._added += 1
        if self._pending_since is None:
            self._pending_since = self._clock.now()
            self._wake.set()  # starts the flush timer (and the stream)
        elif len(self._pending) >= self._batch_size:
            self._wake.set()

    async def add(self, event: UsageEvent) -> None:
        """Buffer one event, waiting for room while the buffer is full (back-pressure)."""
        while True:
            self._check_open()
            if self._held < self._capacity:
                self.add_nowait(event)
                return
            await self._progress.wait()

    async def add_many(self, events: Iterable[UsageEvent]) -> None:
        """Buffer events in order, waiting for room as `add` does."""
        for event in events:
            await self.add(event)

    async def flush(self) -> IngestCounts:
        """Send what is buffered now and wait until every event added so far is acknowledged.

        Raises the error that stopped the ingester, if one did. Cancelling the wait (e.g.
        with `asyncio.timeout`) is safe: the events stay buffered and keep being sent.
        """
        target = self._added
        self._flush_requested = True
        self._wake.set()
        while self._acknowledged < target:
            if self._failure is not None:
                raise self._failure
            await self._progress.wait()
        return self.counts

    async def close(self) -> IngestCounts:
        """Send the rest, wait for every acknowledgement, then end the stream and the background task.

        If the wait is cancelled (e.g. by `asyncio.timeout`), the ingester stops at once
        and `counts.pending` says how many events were not acknowledged: they may or may
        not be recorded, and resending them (with another ingester) is safe.
        """
        self._closing = True
        self._flush_requested = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.shield(self._task)
            except asyncio.CancelledError:
                self.abort()
                # Let it end its stream before the caller goes on.
                await asyncio.gather(self._task, return_exceptions=True)
                raise
        if self._failure is not None:
            raise self._failure
        return self.counts

    def abort(self) -> IngestCounts:
        """Stop now, without waiting for acknowledgements; `pending` counts the events left."""
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        return self.counts

    # -- the background task ----------------------------------------------------------

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _cut_batches(self) -> None:
        """Move due events from the buffer into batches."""
        now = self._clock.now()
        due = self._flush_requested or (
            self._pending_since is not None and now - self._pending_since >= self._flush_interval
        )
        while len(self._pending) >= self._batch_size or (due and self._pending):
            events, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
            self._queued.append(_Batch(self._next_sequence, events))
            self._next_sequence += 1
            # The rest arrived after the events just cut, so this only ever flushes them later.
            self._pending_since = now
        self._flush_requested = False
        if not self._pending:
            self._pending_since = None

    def _acknowledge(self, response: usage_service_pb2.StreamUsageResponse) -> None:
        if not self._in_flight or self._in_flight[0].sequence != response.sequence:
            raise _StreamEnded(f"acknowledgement of unknown batch {response.sequence}")
        batch = self._in_flight.popleft()
        c = self._counters
        c.accepted += response.accepted_count
        c.duplicate += response.duplicate_count
        c.rejected += response.rejected_count
        room = MAX_REJECTIONS_KEPT - len(c.rejections)
        c.rejections.extend(rejection(r) for r in response.rejections[: max(0, room)])
        self._held -= len(batch.events)
        self._acknowledged += len(batch.events)
        self._notify()
        self._wake.set()  # room for another batch in flight, or the stream may now be idle

    async def _read_acknowledgements(self, call: Any) -> None:
        async for response in call:
            self._acknowledge(response)

    def _idle(self) -> bool:
        return not self._pending and not self._queued and not self._in_flight

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                self._wake.clear()
                if self._idle():
                    if self._closing:
                        return
                    await self._wake.wait()
                    continue
                acknowledged_before = self._acknowledged
                try:
                    await self._stream()
                    attempt = 0
                    continue
                except grpc.aio.AioRpcError as exc:
                    error: TallyError = from_rpc_error(exc)
                except asyncio.InvalidStateError:
                    error = _StreamEnded("the stream ended before the batches were acknowledged")
                except TallyError as exc:
                    error = exc
                # What the lost stream did not acknowledge goes again, first and in order.
                self._queued.extendleft(reversed(self._in_flight))
                self._in_flight.clear()
                if not self._retryable(error):
                    self._failure = error
                    return
                if self._acknowledged > acknowledged_before:
                    attempt = 0
                if isinstance(error, UnauthenticatedError):
                    self._on_token_expired()
                self._counters.reconnects += 1
                if not (isinstance(error, DeadlineExceededError) and error.reason == STREAM_IDLE):
                    await self._clock.sleep(self._retry.delay(attempt, error, self._random))
                attempt += 1
        except Exception as exc:
            # A bug or a failing token provider: stop, and say so to every waiting caller.
            self._failure = IngesterClosedError(f"the ingester failed: {exc!r}")
            self._failure.__cause__ = exc
            raise
        finally:
            self._notify()

    def _retryable(self, error: TallyError) -> bool:
        if isinstance(error, DeadlineExceededError):
            return error.reason == STREAM_IDLE  # the server closed a stream we left idle
        # CANCELLED without our asking: the server is shutting down.
        return is_transient(error) or isinstance(error, CallCancelledError)

    async def _stream(self) -> None:
        """One StreamUsage call: returns after closing it cleanly, raises if it fails."""
        call = await self._open_stream()
        reader = asyncio.ensure_future(self._read_acknowledgements(call))
        reader.add_done_callback(lambda _: self._wake.set())
        last_activity = self._clock.now()
        try:
            while True:
                self._wake.clear()
                self._cut_batches()
                while self._queued and len(self._in_flight) < self._max_in_flight:
                    batch = self._queued.popleft()
                    self._in_flight.append(batch)
                    if batch.sent:
                        self._counters.resent_batches += 1
                    batch.sent += 1
                    await call.write(batch.request())
                    last_activity = self._clock.now()
                if reader.done():
                    reader.result()  # the stream's error, if it failed
                    if self._in_flight:
                        raise _StreamEnded("the server ended the stream before acknowledging every batch")
                    return
                now = self._clock.now()
                if self._idle() and (self._closing or now - last_activity >= self._idle_close):
                    await call.done_writing()
                    await reader
                    return
                if self._in_flight:
                    last_activity = now
                deadline: float | None = None
                if self._pending_since is not None:
                    deadline = self._pending_since + self._flush_interval
                elif self._idle():
                    deadline = last_activity + self._idle_close
                await _until(self._wake, self._clock, None if deadline is None else deadline - now)
        finally:
            if not reader.done():
                reader.cancel()
                call.cancel()
                await asyncio.gather(reader, return_exceptions=True)
