"""The stream pipeline on its own, without gRPC or a database: however a stream ends, it ends
promptly with the right outcome, gives back its share of the event budget and leaves no task.

The fakes stand for what surrounds the pipeline in the server: `Client` is the stream of
batches a client sends, `Lane` a write lane whose commits the test releases (so commits
lag behind reading as long as the test wants), and the consumer acknowledges each result
with an await, as a handler sending acknowledgements does. Everything runs on the event
loop without I/O, so `until` waits for a state by yielding to the loop, never for time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from server.domain.errors import DeadlineExceeded, ErrorReason, InvalidArgument, Unavailable
from server.metering.pipeline import EventBudget, pipelined

# How long a stream may take to end in these tests: generous, since nothing here waits
# for time; a stream that does not end at all fails the test instead of hanging it.
BOUND = 10.0
WINDOW = 4


@dataclass(frozen=True, slots=True)
class Batch:
    number: int
    events: int = 10
    valid: bool = True


class Client:
    """The batches of one stream, sent when the test says; a stream that is not closed stays open."""

    def __init__(self) -> None:
        self._next: asyncio.Queue[Batch | BaseException | None] = asyncio.Queue()
        self.read = 0

    def send(self, *batches: Batch) -> None:
        for batch in batches:
            self._next.put_nowait(batch)

    def send_good(self, numbers: range) -> None:
        self.send(*(Batch(n) for n in numbers))

    def close(self) -> None:
        self._next.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self._next.put_nowait(error)

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Batch:
        item = await self._next.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self.read += 1
        return item


class Lane:
    """A write lane that commits (or fails) what was submitted only when the test says so."""

    def __init__(self, *, commit_at_once: bool = False) -> None:
        self.submitted: list[int] = []
        self._waiting: deque[tuple[int, asyncio.Future[str]]] = deque()
        self._commit_at_once = commit_at_once

    def submit(self, batch: Batch) -> asyncio.Future[str]:
        self.submitted.append(batch.number)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self._commit_at_once:
            future.set_result(f"committed {batch.number}")
        else:
            self._waiting.append((batch.number, future))
        return future

    def commit(self) -> None:
        while self._waiting:
            number, future = self._waiting.popleft()
            if not future.done():
                future.set_result(f"committed {number}")

    def fail(self, error: Exception) -> None:
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


async def prepare(batch: Batch) -> Batch:
    if not batch.valid:
        raise InvalidArgument.single("events", "has too many events")
    return batch


def stream(
    client: Client, lane: Lane, budget: EventBudget, **options: float
) -> AsyncGenerator[tuple[Batch, str], None]:
    return pipelined(
        client, prepare, lane.submit, budget=budget, size=lambda b: b.events, window=WINDOW, **options
    )


class Consumer:
    """A handler reading results and acknowledging each (an await, as sending an ack is).

    Like the real handlers it closes the pipeline when it stops, however it stops: a
    handler cancelled while it sends an acknowledgement is not inside the pipeline, and
    only closing it reaches the pipeline's cleanup.
    """

    def __init__(self, results: AsyncGenerator[tuple[Batch, str], None]) -> None:
        self.results = results
        self.acknowledged: list[str] = []
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async with contextlib.aclosing(self.results) as results:
            async for _, result in results:
                self.acknowledged.append(result)
                await asyncio.sleep(0)

    async def ended(self) -> BaseException | None:
        """The consumer's outcome once it has ended (None, its exception, or CancelledError)."""
        async with asyncio.timeout(BOUND):
            await asyncio.wait([self.task])
        if self.task.cancelled():
            return asyncio.CancelledError()
        return self.task.exception()


def pipeline_tasks() -> set[asyncio.Task[object]]:
    """Tasks the pipeline started (its reader and one per batch) that have not ended."""
    return {
        t for t in asyncio.all_tasks() if "pipelined.<locals>" in getattr(t.get_coro(), "__qualname__", "")
    }


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the pipeline never reached the expected state")


@pytest.fixture(autouse=True)
async def no_task_outlives_its_test() -> AsyncIterator[None]:
    """A failed test must not leave its tasks to confuse the next one."""
    yield
    for task in pipeline_tasks():
        task.cancel()


def assert_nothing_held(budget: EventBudget) -> None:
    assert budget.in_use == 0
    assert pipeline_tasks() == set()


async def test_results_come_in_stream_order_once_committed() -> None:
    client, lane, budget = Client(), Lane(), EventBudget(1_000)
    client.send_good(range(3))
    client.close()
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: lane.submitted == [0, 1, 2])
    assert consumer.acknowledged == []  # nothing is answered before it is committed
    lane.commit()
    assert await consumer.ended() is None
    assert consumer.acknowledged == ["committed 0", "committed 1", "committed 2"]
    assert_nothing_held(budget)


async def test_a_stream_reads_no_further_than_its_window_while_commits_lag() -> None:
    client, lane, budget = Client(), Lane(), EventBudget(1_000)
    client.send_good(range(20))
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: client.read == WINDOW)
    for _ in range(100):
        await asyncio.sleep(0)
    assert (client.read, budget.in_use) == (WINDOW, WINDOW * 10)
    consumer.task.cancel()
    await consumer.ended()
    assert_nothing_held(budget)


async def test_a_consumer_cancelled_while_commits_lag_ends_the_stream() -> None:
    # gRPC cancels the handler when the client cancels, disconnects or runs out of
    # deadline, and when the server's grace period is over.
    client, lane, budget = Client(), Lane(), EventBudget(1_000)
    client.send_good(range(20))
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: client.read >= WINDOW and len(lane.submitted) >= WINDOW)
    for _ in range(20):
        await asyncio.sleep(0)  # the reader is now waiting for room in the window
    consumer.task.cancel()
    assert isinstance(await consumer.ended(), asyncio.CancelledError)
    assert consumer.acknowledged == []
    assert_nothing_held(budget)
    assert lane.submitted == [0, 1, 2, 3]  # handed to the lane; nothing after them


async def test_a_consumer_that_stops_iterating_while_commits_lag_ends_the_stream() -> None:
    # What StreamUsage's handler does when gRPC closes its response generator.
    client, lane, budget = Client(), Lane(), EventBudget(1_000)
    client.send_good(range(20))
    results = stream(client, lane, budget)
    reading = asyncio.ensure_future(anext(results))
    await until(lambda: len(lane.submitted) >= WINDOW)
    lane.commit()
    assert (await reading)[1] == "committed 0"
    await until(lambda: len(lane.submitted) > WINDOW)  # the batches after the first lag in the lane
    async with asyncio.timeout(BOUND):
        await results.aclose()
    assert_nothing_held(budget)


async def test_a_bad_batch_behind_lagging_commits_fails_the_stream_promptly() -> None:
    client, lane, budget = Client(), Lane(), EventBudget(10_000)
    client.send(Batch(0), Batch(1), Batch(2, events=5_000, valid=False))
    client.send_good(range(3, 20))
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: client.read >= WINDOW and lane.submitted == [0, 1])
    lane.commit()
    error = await consumer.ended()
    assert isinstance(error, InvalidArgument)
    assert error.violations[0].field == "events"
    assert consumer.acknowledged == ["committed 0", "committed 1"]
    assert lane.submitted == [0, 1]  # nothing after the bad batch is written
    assert_nothing_held(budget)


async def test_a_failed_write_fails_the_stream_promptly() -> None:
    client, lane, budget = Client(), Lane(), EventBudget(1_000)
    client.send_good(range(20))
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: client.read >= WINDOW and len(lane.submitted) >= WINDOW)
    lane.fail(Unavailable("database unavailable", reason=ErrorReason.DATABASE_UNAVAILABLE))
    assert isinstance(await consumer.ended(), Unavailable)
    assert consumer.acknowledged == []
    assert_nothing_held(budget)


async def test_a_failed_read_is_raised_after_the_batches_read_before_it() -> None:
    # How an idle stream (DEADLINE_EXCEEDED) or a malformed message (INVALID_ARGUMENT) ends.
    client, lane, budget = Client(), Lane(), EventBudget(1_000)
    client.send_good(range(2))
    client.fail(DeadlineExceeded("no message for 300 s", reason=ErrorReason.STREAM_IDLE))
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: len(lane.submitted) == 2)
    lane.commit()
    assert isinstance(await consumer.ended(), DeadlineExceeded)
    assert consumer.acknowledged == ["committed 0", "committed 1"]
    assert_nothing_held(budget)


async def test_a_stream_waiting_for_the_event_budget_can_still_end() -> None:
    client, lane, budget = Client(), Lane(), EventBudget(100)
    assert await budget.acquire(100) == 100  # other streams hold all of it
    client.send_good(range(5))
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: client.read == 1)
    consumer.task.cancel()
    await consumer.ended()
    assert pipeline_tasks() == set()
    budget.release(100)
    assert budget.in_use == 0
    assert await budget.acquire(100) == 100  # nobody is left queued for it
    budget.release(100)


async def test_a_client_that_sends_nothing_more_does_not_hold_the_stream_open_after_cancel() -> None:
    client, lane, budget = Client(), Lane(commit_at_once=True), EventBudget(1_000)
    client.send_good(range(2))
    consumer = Consumer(stream(client, lane, budget))
    await until(lambda: len(consumer.acknowledged) == 2)
    consumer.task.cancel()
    assert isinstance(await consumer.ended(), asyncio.CancelledError)
    assert_nothing_held(budget)


async def test_ending_is_bounded_even_if_a_batch_ignores_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn(batch: Batch) -> Batch:
        # A dependency that swallows cancellation: only `release` lets it end.
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        return batch

    client, lane, budget = Client(), Lane(commit_at_once=True), EventBudget(1_000)
    client.send_good(range(3))
    results = pipelined(
        client, stubborn, lane.submit, budget=budget, size=lambda b: b.events, cleanup_seconds=0.05
    )
    consumer = Consumer(results)
    await until(lambda: client.read == 3)
    consumer.task.cancel()
    assert isinstance(await consumer.ended(), asyncio.CancelledError)
    assert "still running" in caplog.text
    release.set()
    await until(lambda: not pipeline_tasks() and budget.in_use == 0)


async def test_event_budget_holds_back_what_does_not_fit_until_it_is_released() -> None:
    budget = EventBudget(100)
    assert await budget.acquire(60) == 60
    waiting = asyncio.ensure_future(budget.acquire(50))
    await until(lambda: budget.in_use == 60)
    assert not waiting.done()  # 60 + 50 > 100
    budget.release(60)
    assert await asyncio.wait_for(waiting, BOUND) == 50
    budget.release(50)
    assert await budget.acquire(500) == 100  # a batch bigger than the budget takes all of it
    budget.release(100)
    assert budget.in_use == 0


async def test_event_budget_serves_waiters_in_order_so_a_large_batch_is_not_starved() -> None:
    budget = EventBudget(100)
    await budget.acquire(50)
    large = asyncio.ensure_future(budget.acquire(100))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(budget.acquire(10))  # would fit now, but waits its turn
    await asyncio.sleep(0)
    assert not small.done()
    budget.release(50)
    assert await asyncio.wait_for(large, BOUND) == 100
    assert not small.done()
    budget.release(100)
    assert await asyncio.wait_for(small, BOUND) == 10
    budget.release(10)
    assert budget.in_use == 0


async def test_event_budget_gives_back_what_a_cancelled_waiter_was_granted() -> None:
    budget = EventBudget(100)
    await budget.acquire(100)
    first = asyncio.ensure_future(budget.acquire(60))
    second = asyncio.ensure_future(budget.acquire(40))
    await asyncio.sleep(0)
    budget.release(100)  # grants both waiters ...
    first.cancel()  # ... but the first goes away before it runs
    await asyncio.wait([first, second])
    assert first.cancelled()
    assert second.result() == 40
    assert budget.in_use == 40
    budget.release(40)
    assert budget.in_use == 0
