"""The batching ingester's rules on a scripted stream and a clock the test moves: batches, bounds, resends."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import grpc
import pytest

from tally_client import (
    AsyncIngester,
    IngesterClosedError,
    IngesterFullError,
    PermissionDeniedError,
    UsageEvent,
)
from tally_client.errors import from_rpc_error
from tally_client.retry import RetryPolicy
from tests.client.fakes import FakeClock, FakeServer, FakeStream, rpc_error, running, until


def events(count: int, prefix: str = "e") -> list[UsageEvent]:
    return [UsageEvent("acme", "analytics", "query", Decimal(1), f"{prefix}{n}") for n in range(count)]


def ids(stream: FakeStream) -> list[list[str]]:
    return [[e.event_id for e in request.events] for request in stream.written]


def ingester(server: FakeServer, clock: FakeClock, **options: int) -> AsyncIngester:
    settings: dict[str, int] = {"batch_size": 3, "max_buffered_events": 100, **options}
    return AsyncIngester(
        server.open_stream,
        flush_interval=1.0,
        retry=RetryPolicy(initial_backoff=0.5, max_backoff=4.0),
        clock=clock,
        random=lambda: 1.0,
        **settings,
    )


async def test_a_full_batch_is_sent_at_once_and_the_rest_waits_for_the_interval() -> None:
    server, clock = FakeServer(), FakeClock()
    async with running(ingester(server, clock)) as ing:
        for event in events(7):
            ing.add_nowait(event)
        await until(lambda: len(server.streams) == 1 and len(server.stream.written) == 2)
        await asyncio.sleep(0.05)  # nothing else may go out while the clock stands still
        assert ids(server.stream) == [["e0", "e1", "e2"], ["e3", "e4", "e5"]]
        clock.advance(1.0)
        await until(lambda: len(server.stream.written) == 3)
        assert ids(server.stream)[2] == ["e6"]
        assert [r.sequence for r in server.stream.written] == [1, 2, 3]
        for sequence, size in ((1, 3), (2, 3), (3, 1)):
            server.stream.ack(sequence, accepted=size)
        counts = await ing.flush()
    assert (counts.accepted, counts.pending) == (7, 0)
    assert server.stream.closed_by_client


async def test_flush_sends_a_partial_batch_and_waits_for_its_acknowledgement() -> None:
    server, clock = FakeServer(), FakeClock()
    async with running(ingester(server, clock)) as ing:
        ing.add_nowait(events(1)[0])
        flushed = asyncio.ensure_future(ing.flush())
        await until(lambda: len(server.streams) == 1 and len(server.stream.written) == 1)
        await asyncio.sleep(0.05)
        assert not flushed.done()  # written, but not acknowledged yet
        server.stream.ack(1, duplicate=1)
        counts = await flushed
    assert (counts.accepted, counts.duplicate, counts.pending) == (0, 1, 0)


async def test_a_full_buffer_refuses_add_nowait_and_makes_add_wait_for_room() -> None:
    server, clock = FakeServer(), FakeClock()
    ing = ingester(server, clock, batch_size=2, max_buffered_events=4)
    for event in events(4):
        ing.add_nowait(event)
    with pytest.raises(IngesterFullError):
        ing.add_nowait(events(1, "x")[0])
    waiting = asyncio.ensure_future(ing.add(events(1, "y")[0]))
    await until(lambda: len(server.streams) == 1 and len(server.stream.written) == 2)
    assert not waiting.done()
    server.stream.ack(1, accepted=2)  # room for two
    await asyncio.wait_for(waiting, 30)
    assert ing.counts.pending == 3
    server.stream.ack(2, accepted=2)
    clock.advance(1.0)
    await until(lambda: len(server.stream.written) == 3)
    server.stream.ack(3, accepted=1)
    counts = await ing.close()
    assert (counts.accepted, counts.pending) == (5, 0)


async def test_unacknowledged_batches_are_resent_first_in_order_after_waiting_the_retry_info_delay() -> None:
    server, clock = FakeServer(), FakeClock()
    async with running(ingester(server, clock, max_batches_in_flight=2)) as ing:
        for event in events(12):
            ing.add_nowait(event)
        await until(lambda: len(server.streams) == 1 and len(server.stream.written) == 2)
        first = server.stream
        first.ack(1, accepted=3)
        await until(lambda: len(first.written) == 3)  # batch 3 takes the freed place; batch 4 waits
        restarting = rpc_error(grpc.StatusCode.UNAVAILABLE, "restarting", retry_delay=timedelta(seconds=2.5))
        first.fail(restarting)
        await until(lambda: 2.5 in clock.sleeping())
        for event in events(3, "n"):  # arrive during the backoff
            ing.add_nowait(event)
        assert len(server.streams) == 1
        clock.advance(2.5)
        await until(lambda: len(server.streams) == 2 and len(server.stream.written) == 2)
        second = server.stream
        second.ack(2, duplicate=3)  # the lost stream had committed it
        second.ack(3, accepted=3)
        await until(lambda: len(second.written) == 4)
        resent, new = [["e3", "e4", "e5"], ["e6", "e7", "e8"]], [["e9", "e10", "e11"], ["n0", "n1", "n2"]]
        assert ids(second) == resent + new
        assert [r.sequence for r in second.written] == [2, 3, 4, 5]  # a resent batch keeps its number
        second.ack(4, accepted=3)
        second.ack(5, accepted=3)
        counts = await ing.flush()
    assert (counts.accepted, counts.duplicate, counts.rejected) == (12, 3, 0)  # each event counted once
    assert (counts.resent_batches, counts.reconnects) == (2, 1)


async def test_backoff_grows_while_the_server_stays_unreachable() -> None:
    server, clock = FakeServer(), FakeClock()
    failures = 0

    def failing_stream() -> FakeStream:
        nonlocal failures
        stream = FakeStream()
        if failures < 3:
            failures += 1
            stream.fail(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
        else:
            stream = FakeStream(auto_ack=True)
        return stream

    server = FakeServer(failing_stream)
    async with running(ingester(server, clock)) as ing:
        ing.add_nowait(events(1)[0])
        flushed = asyncio.ensure_future(ing.flush())
        for delay in (0.5, 1.0, 2.0):  # initial_backoff doubling, jitter pinned to its top
            await until(lambda delay=delay: delay in clock.sleeping())  # type: ignore[misc]
            clock.advance(delay)
        counts = await asyncio.wait_for(flushed, 30)
    assert counts.accepted == 1 and counts.reconnects == 3


async def test_an_error_that_retrying_cannot_fix_stops_the_ingester() -> None:
    server, clock = FakeServer(), FakeClock()
    ing = ingester(server, clock)
    ing.add_nowait(events(1)[0])
    flushed = asyncio.ensure_future(ing.flush())
    await until(lambda: len(server.streams) == 1 and len(server.stream.written) == 1)
    server.stream.fail(rpc_error(grpc.StatusCode.PERMISSION_DENIED, "no scope", reason="SCOPE_MISSING"))
    with pytest.raises(PermissionDeniedError) as caught:
        await asyncio.wait_for(flushed, 30)
    assert caught.value.reason == "SCOPE_MISSING"
    with pytest.raises(IngesterClosedError):
        ing.add_nowait(events(1, "later")[0])
    with pytest.raises(PermissionDeniedError):
        await ing.close()
    assert ing.counts.pending == 1  # never acknowledged: the caller knows what was not sent


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core"), True),  # gRPC's: the connection
        (rpc_error(grpc.StatusCode.INTERNAL, "bug", reason="INTERNAL_ERROR"), False),  # Tally's: a bug
        (rpc_error(grpc.StatusCode.UNAUTHENTICATED, "expired", reason="TOKEN_EXPIRED"), True),
        (rpc_error(grpc.StatusCode.UNAUTHENTICATED, "forged", reason="TOKEN_INVALID"), False),
        (rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "too many", reason="BATCH_TOO_LARGE"), False),
    ],
)
async def test_only_passing_failures_are_retried(error: grpc.aio.AioRpcError, retried: bool) -> None:
    server, clock = FakeServer(), FakeClock()
    ing = ingester(server, clock)
    ing.add_nowait(events(1)[0])
    flushed = asyncio.ensure_future(ing.flush())
    await until(lambda: len(server.streams) == 1 and len(server.stream.written) == 1)
    server.stream.fail(error)
    if retried:
        await until(lambda: ing.counts.reconnects == 1 and bool(clock.sleeping()))
        clock.advance(10.0)  # past any backoff
        await until(lambda: len(server.streams) == 2 and len(server.stream.written) == 1)
        server.stream.ack(1, accepted=1)
        assert (await asyncio.wait_for(flushed, 30)).accepted == 1
        assert (await asyncio.wait_for(ing.close(), 30)).accepted == 1
    else:
        failure = type(from_rpc_error(error))
        with pytest.raises(failure):
            await asyncio.wait_for(flushed, 30)
        with pytest.raises(failure):
            await ing.close()
        assert len(server.streams) == 1 and ing.counts.reconnects == 0


async def test_an_idle_stream_is_closed_by_the_client_and_reopened_for_new_events() -> None:
    server, clock = FakeServer(lambda: FakeStream(auto_ack=True)), FakeClock()
    async with running(ingester(server, clock)) as ing:
        ing.add_nowait(events(1)[0])
        await ing.flush()
        clock.advance(30.0)  # idle_close_seconds
        await until(lambda: server.streams[0].closed_by_client)
        ing.add_nowait(events(1, "n")[0])
        counts = await ing.flush()
    assert len(server.streams) == 2 and counts.accepted == 2 and counts.reconnects == 0


async def test_cancelled_close_stops_the_ingester_and_says_what_was_not_acknowledged() -> None:
    server, clock = FakeServer(), FakeClock()
    ing = ingester(server, clock)
    for event in events(3):
        ing.add_nowait(event)
    await until(lambda: len(server.streams) == 1 and len(server.stream.written) == 1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await ing.close()
    assert ing.counts.pending == 3
    assert server.stream.cancelled
