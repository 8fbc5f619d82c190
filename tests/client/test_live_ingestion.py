"""The ingester against real servers: counts and totals agree, limits and idle streams are waited out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal

import asyncpg
import grpc
import pytest_asyncio

from server.app import TallyServer
from server.config import Config
from server.domain.access import SCOPES
from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tally_client import AsyncTallyClient, RejectionCause, TallyClient, UsageEvent
from tally_client.clock import SYSTEM_CLOCK
from tests.client.fakes import until
from tests.conftest import UNLIMITED, make_token
from tests.helpers import channel_with_token, event, totals

RETRY_AFTER_STREAM_LIMIT_SECONDS = 1.0  # the RetryInfo delay Tally gives with STREAM_LIMIT_REACHED


class RecordingClock:
    """The real clock, remembering every sleep asked of it."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def now(self) -> float:
        return SYSTEM_CLOCK.now()

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await SYSTEM_CLOCK.sleep(seconds)


async def serve(config: Config) -> AsyncIterator[TallyServer]:
    server = TallyServer(config)
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(scope="module")
async def two_streams(server_config: Config) -> AsyncIterator[TallyServer]:
    """A server on the session's database that lets a principal open two streams at once."""
    async for server in serve(replace(server_config, limits=replace(UNLIMITED, max_streams_per_principal=2))):
        yield server


@pytest_asyncio.fixture(scope="module")
async def quick_idle(server_config: Config) -> AsyncIterator[TallyServer]:
    """A server that closes an ingestion stream after half a second without a message."""
    async for server in serve(replace(server_config, limits=replace(UNLIMITED, stream_idle_seconds=0.5))):
        yield server


async def test_counts_and_database_totals_agree_with_duplicates_and_rejections(
    client: AsyncTallyClient, db: asyncpg.Pool, tenant: str
) -> None:
    fresh = [UsageEvent(tenant, "analytics", "query", Decimal("1.5"), f"q-{n}") for n in range(1_000)]
    bad = [UsageEvent(tenant, "analytics", "query", Decimal("-1"), f"bad-{n}") for n in range(3)]
    async with client.ingester(batch_size=128) as ingester:
        await ingester.add_many(fresh)
        await ingester.add_many(fresh[:50])  # sent again: duplicates
        await ingester.add_many(bad)
    counts = ingester.counts
    assert (counts.accepted, counts.duplicate, counts.rejected, counts.pending) == (1_000, 50, 3, 0)
    assert [(r.event_id, r.field, r.cause) for r in counts.rejections] == [
        (f"bad-{n}", "quantity", RejectionCause.INVALID) for n in range(3)
    ]
    assert await totals(db, tenant) == (1_000, Decimal("1500.0"), 1_000, Decimal("1500.0"))


async def test_blocking_ingester_runs_in_its_own_thread(address: str, db: asyncpg.Pool, tenant: str) -> None:
    def script() -> tuple[int, int]:
        with TallyClient(address, token=make_token([tenant], SCOPES)) as client:
            with client.ingester(batch_size=64, flush_interval=0.05) as ingester:
                for n in range(300):
                    ingester.add(UsageEvent(tenant, "storage", "gb_hour", Decimal("0.25"), f"gb-{n}"))
                flushed = ingester.flush(timeout=60)
                ingester.add_many(
                    UsageEvent(tenant, "storage", "gb_hour", Decimal(1), f"gb-{n}") for n in range(10)
                )
            return flushed.accepted, ingester.counts.duplicate

    assert await asyncio.to_thread(script) == (300, 10)
    assert await totals(db, tenant) == (300, Decimal("75.00"), 300, Decimal("75.00"))


async def test_stream_limit_is_waited_out_with_the_servers_retry_info(
    two_streams: TallyServer, db: asyncpg.Pool, tenant: str
) -> None:
    principal = f"svc-{uuid.uuid4().hex[:8]}"
    token = make_token([tenant], SCOPES, subject=principal)
    async with channel_with_token(f"127.0.0.1:{two_streams.port}", token) as channel:
        stub = usage_service_pb2_grpc.UsageServiceStub(channel)
        held = [stub.StreamUsage() for _ in range(2)]
        for sequence, call in enumerate(held, 1):  # both slots taken: each stream has its answer
            await call.write(usage_service_pb2.StreamUsageRequest(sequence=sequence, events=[event(tenant)]))
            assert (await call.read()).accepted_count == 1
        clock = RecordingClock()
        async with AsyncTallyClient(f"127.0.0.1:{two_streams.port}", token=token) as client:
            async with client.ingester(clock=clock) as ingester:
                ingester.add_nowait(UsageEvent(tenant, "analytics", "query", Decimal(2)))
                flushed = asyncio.ensure_future(ingester.flush())
                await until(lambda: RETRY_AFTER_STREAM_LIMIT_SECONDS in clock.slept)
                assert not flushed.done()
                await held[0].done_writing()
                assert await held[0].code() == grpc.StatusCode.OK
                counts = await asyncio.wait_for(flushed, 60)
        await held[1].done_writing()
        assert await held[1].code() == grpc.StatusCode.OK
    assert counts.accepted == 1 and counts.reconnects >= 1
    assert (await totals(db, tenant))[:2] == (3, Decimal(4))


async def test_stream_closed_by_the_server_when_idle_is_reopened_for_the_next_events(
    quick_idle: TallyServer, db: asyncpg.Pool, tenant: str
) -> None:
    async with AsyncTallyClient(f"127.0.0.1:{quick_idle.port}", token=make_token()) as client:
        async with client.ingester() as ingester:
            ingester.add_nowait(UsageEvent(tenant, "analytics", "query", Decimal(1)))
            await ingester.flush()
            await until(lambda: ingester.counts.reconnects == 1)  # STREAM_IDLE: not an error
            ingester.add_nowait(UsageEvent(tenant, "analytics", "query", Decimal(1)))
            counts = await ingester.flush()
    assert (counts.accepted, counts.reconnects) == (2, 1)
    assert (await totals(db, tenant))[:2] == (2, Decimal(2))
