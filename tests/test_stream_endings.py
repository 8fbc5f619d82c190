"""Every way an ingestion stream ends, against the real server: the client gets the documented
status (if it is still there), and the stream gives back its slot and its events in flight.

To make commits lag behind reading on demand, a test holds a row lock: its own open
transaction claims the key (tenant, "blocker"), and a batch containing that event waits
in its write lane until the transaction ends. Streams then fill their window of batches
in flight, which is the state in which the old pipeline could not end. Last, the bound
that turns a database that stops answering into UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pytest

from server.app import TallyServer
from server.config import Config
from server.domain.errors import Unavailable
from server.storage.database import ATTEMPT_TIMEOUT_SECONDS, run_with_retries
from server.storage.embedded import EmbeddedPostgres
from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tests.conftest import UNLIMITED, make_token
from tests.helpers import channel_with_token, event, field_violations

BATCH = 10  # events per batch
WINDOW = 6  # batches a stream reads ahead of its commits (server.metering.pipeline)
BOUND = 60.0  # seconds: generous, for a loaded 2-core machine; a stuck stream fails instead of hanging


@contextlib.asynccontextmanager
async def lagging_commits(dsn: str, tenant: str) -> AsyncIterator[asyncpg.Connection]:
    """While inside, a batch holding the event (tenant, "blocker") cannot commit."""
    conn = await asyncpg.connect(dsn)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute("INSERT INTO usage_event_keys (tenant_id, event_id) VALUES ($1, 'blocker')", tenant)
    try:
        yield conn
    finally:
        # The database may be gone by now (one test stops it), and the connection with it.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await transaction.rollback()
        conn.terminate()


def batches(tenant: str, count: int) -> list[list[object]]:
    """`count` batches; the first holds the blocking event."""
    first = [event(tenant, "blocker"), *(event(tenant) for _ in range(BATCH - 1))]
    return [first, *([event(tenant) for _ in range(BATCH)] for _ in range(count - 1))]


async def eventually(condition: Callable[[], bool], what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what if isinstance(what, str) else what()}")
        await asyncio.sleep(0.02)


async def open_lagging_stream(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str, kind: str, **call: float
) -> grpc.aio.Call:
    """A StreamUsage or IngestUsage call that has sent more batches than its window (unless it
    ended first: a short deadline may run out on a slow machine)."""
    opened: grpc.aio.Call
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        if kind == "stream":
            opened = usage.StreamUsage(**call)
            for sequence, batch in enumerate(batches(tenant, WINDOW + 4)):
                await opened.write(usage_service_pb2.StreamUsageRequest(sequence=sequence, events=batch))
        else:
            opened = usage.IngestUsage(**call)
            for batch in batches(tenant, WINDOW + 4):
                await opened.write(usage_service_pb2.IngestUsageRequest(events=batch))
    return opened


async def status_of(call: grpc.aio.Call) -> grpc.StatusCode:
    # A write stuck on a database that is going away ends when its attempt runs out
    # (ATTEMPT_TIMEOUT_SECONDS, the documented bound), so the wait must outlast that bound, with
    # a margin for a loaded machine: waiting exactly as long made the test race the server.
    async with asyncio.timeout(ATTEMPT_TIMEOUT_SECONDS + BOUND):
        return await call.code()  # type: ignore[no-any-return]


@pytest.fixture
async def limited(server_config: Config) -> AsyncIterator[TallyServer]:
    """A server of its own (on the session's database) allowing 4 streams per principal and
    batches of 20 events (an oversized batch stays small in bytes)."""
    server = TallyServer(
        replace(server_config, max_batch_size=20, limits=replace(UNLIMITED, max_streams_per_principal=4))
    )
    await server.start()
    yield server
    await server.stop()


async def test_streams_ended_mid_flight_give_back_their_slots_and_events(
    limited: TallyServer, tenant: str
) -> None:
    token = make_token(subject=f"slots-{uuid.uuid4().hex[:8]}")
    address = f"127.0.0.1:{limited.port}"
    ended = 0
    async with lagging_commits(limited.dsn, tenant):
        # 24 streams, 4 at a time (the limit), ended in every way a client can end one.
        for how in ("cancel", "disconnect", "deadline") * 2:
            channels = [channel_with_token(address, token) for _ in range(4)]
            calls = [
                await open_lagging_stream(
                    usage_service_pb2_grpc.UsageServiceStub(channel),
                    tenant,
                    ("stream", "ingest")[i % 2],
                    **({"timeout": 5.0} if how == "deadline" else {}),
                )
                for i, channel in enumerate(channels)
            ]
            if how != "deadline":
                # The window full on every stream: the state the old pipeline could not leave.
                await eventually(lambda: limited.events_in_flight == 4 * WINDOW * BATCH, "4 full windows")
            for call, channel in zip(calls, channels, strict=True):
                if how == "cancel":
                    call.cancel()
                elif how == "disconnect":
                    await channel.close()
            for call in calls:
                assert await status_of(call) in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
            for channel in channels:
                await channel.close()
            ended += 4
            await eventually(
                lambda: limited.events_in_flight == 0, f"events given back after {ended} streams"
            )
    assert ended == 24

    async with channel_with_token(address, token) as channel:
        call = usage_service_pb2_grpc.UsageServiceStub(channel).StreamUsage(timeout=BOUND)
        await call.write(usage_service_pb2.StreamUsageRequest(sequence=1, events=[event(tenant, "after")]))
        ack = await call.read()
        assert (ack.sequence, ack.accepted_count) == (1, 1)
        await call.done_writing()
        assert await status_of(call) == grpc.StatusCode.OK


@pytest.mark.parametrize("kind", ["stream", "ingest"])
async def test_an_oversized_batch_after_good_ones_is_invalid_argument_promptly(
    limited: TallyServer, tenant: str, kind: str
) -> None:
    good = [[event(tenant) for _ in range(BATCH)] for _ in range(60)]
    held = batches(tenant, 4)  # the first cannot commit until the lock is released
    oversized = [event(tenant) for _ in range(limited.config.max_batch_size + 1)]
    more = [[event(tenant) for _ in range(BATCH)] for _ in range(5)]
    async with channel_with_token(f"127.0.0.1:{limited.port}", make_token()) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        call = usage.StreamUsage(timeout=BOUND) if kind == "stream" else usage.IngestUsage(timeout=BOUND)
        async with lagging_commits(limited.dsn, tenant):
            # Like the report, everything is written before anything is read. The lock keeps
            # the bad batch waiting behind lagging commits, and lets the client finish
            # writing before the status can come (gRPC's Python client reports INTERNAL for
            # a write that fails after the status: grpc/grpc#36066).
            for batch in [*good, *held, oversized, *more]:
                if kind == "stream":
                    await call.write(usage_service_pb2.StreamUsageRequest(events=batch))
                else:
                    await call.write(usage_service_pb2.IngestUsageRequest(events=batch))
            await call.done_writing()
            await eventually(lambda: limited.events_in_flight >= 4 * BATCH, "the held batches read")
        if kind == "stream":
            # The status comes after the acknowledgements, which the client must read first.
            acknowledged = 0
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in call:  # type: ignore[attr-defined]
                    acknowledged += 1
            assert acknowledged == 60 + 4  # every batch before the bad one, and none after it
        assert await status_of(call) == grpc.StatusCode.INVALID_ARGUMENT, await call.details()
        ended = grpc.aio.AioRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), await call.trailing_metadata()
        )
        assert "events" in field_violations(ended)
    await eventually(lambda: limited.events_in_flight == 0, "events given back")


@pytest.mark.xfail(
    strict=False,
    reason="known liveness bug, open in issue 7: under load, a stream whose commit is blocked when "
    "PostgreSQL stops sometimes gets no status (seen in 2 of about 8 full runs); it passes otherwise",
)
async def test_a_database_that_goes_away_mid_stream_answers_unavailable(
    tmp_path: Path, server_config: Config, tenant: str
) -> None:
    embedded = EmbeddedPostgres(tmp_path)
    dsn = await asyncio.to_thread(embedded.start)
    server = TallyServer(replace(server_config, database_url=dsn))
    await server.start()
    try:
        async with channel_with_token(f"127.0.0.1:{server.port}", make_token()) as channel:
            usage = usage_service_pb2_grpc.UsageServiceStub(channel)
            stream_call = usage.StreamUsage(timeout=BOUND * 2)
            await stream_call.write(usage_service_pb2.StreamUsageRequest(sequence=0, events=[event(tenant)]))
            assert (await stream_call.read()).accepted_count == 1
            ingest_call = usage.IngestUsage(timeout=BOUND * 2)
            async with lagging_commits(dsn, tenant):
                for sequence, batch in enumerate(batches(tenant, WINDOW + 4), start=1):
                    await stream_call.write(
                        usage_service_pb2.StreamUsageRequest(sequence=sequence, events=batch)
                    )
                for batch in batches(tenant, WINDOW + 4):
                    await ingest_call.write(usage_service_pb2.IngestUsageRequest(events=batch))
                await eventually(lambda: server.events_in_flight == 2 * WINDOW * BATCH, "2 full windows")
                await asyncio.to_thread(embedded.stop)  # its sessions end: every write fails
                assert await status_of(stream_call) == grpc.StatusCode.UNAVAILABLE
                assert await status_of(ingest_call) == grpc.StatusCode.UNAVAILABLE
            await eventually(lambda: server.events_in_flight == 0, "events given back")
    finally:
        async with asyncio.timeout(BOUND):
            await server.stop()
        await asyncio.to_thread(embedded.stop)


async def test_stop_with_streams_stuck_in_commits_ends_within_its_bounds(
    server_config: Config, tenant: str
) -> None:
    grace, drain, close = 1.0, 1.0, 1.0
    server = TallyServer(replace(server_config, grace_seconds=grace))
    await server.start()
    async with (
        channel_with_token(f"127.0.0.1:{server.port}", make_token()) as channel,
        lagging_commits(server.dsn, tenant),
    ):
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        calls = [await open_lagging_stream(usage, tenant, kind) for kind in ("stream", "ingest") * 2]
        await eventually(lambda: server.events_in_flight == 4 * WINDOW * BATCH, "4 full windows")
        started = time.monotonic()
        # Nothing can commit while the lock is held: grace, drain and close all run out.
        async with asyncio.timeout(grace + drain + close + BOUND):
            await server.stop(drain_seconds=drain, close_seconds=close)
        stopped_after = time.monotonic() - started
        for call in calls:
            assert await status_of(call) == grpc.StatusCode.UNAVAILABLE
    assert stopped_after >= grace  # in-flight calls did get their grace period
    await eventually(lambda: server.events_in_flight == 0, "events given back")


async def test_a_database_that_does_not_answer_is_unavailable_after_the_attempt_bound(
    db: asyncpg.Pool,
) -> None:
    async def stuck() -> None:
        async with db.acquire() as conn:
            await conn.execute("SELECT pg_sleep(600)")

    with pytest.raises(Unavailable, match=r"no answer within 0\.5 s"):
        async with asyncio.timeout(BOUND):
            await run_with_retries(stuck, seconds_per_attempt=0.5)
    assert await db.fetchval("SELECT 1") == 1  # the connection went back to the pool usable
