"""Health follows the database (a lost database gives UNAVAILABLE, never UNKNOWN); shutdown is graceful."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import SERVICE_NAMES, TallyServer
from server.config import Config
from server.storage.embedded import EmbeddedPostgres
from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tests.conftest import make_token
from tests.helpers import channel_with_token, event, totals

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How long health may take to follow the database (probed every 0.5 s, each probe allowed 2 s,
# PostgreSQL restarted in between): generous, since a loaded machine is slow and only a bug waits this long.
PATIENCE_SECONDS = 60


async def statuses(stub: health_pb2_grpc.HealthStub) -> set[int]:
    return {
        (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
        for name in ("", *SERVICE_NAMES)
    }


async def wait_for(stub: health_pb2_grpc.HealthStub, status: int) -> None:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while time.monotonic() < deadline:
        if await statuses(stub) == {status}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health never became {status} in {PATIENCE_SECONDS} s")


async def test_overall_and_per_service_health_is_serving(health: health_pb2_grpc.HealthStub) -> None:
    # Waited for, not asserted at once: one probe slower than its 2 s timeout on a loaded machine
    # turns the session server NOT_SERVING until the next one.
    await wait_for(health, SERVING)


async def test_unknown_service_is_not_found(health: health_pb2_grpc.HealthStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="tally.v1.NoSuchService"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_turns_not_serving_while_the_database_is_down(
    new_cluster_dir: Callable[[str], Path], server_config: Config
) -> None:
    embedded = EmbeddedPostgres(new_cluster_dir("down"))
    dsn = await asyncio.to_thread(embedded.start)
    server = TallyServer(replace(server_config, database_url=dsn))
    await server.start()
    try:
        async with channel_with_token(f"127.0.0.1:{server.port}", make_token()) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            usage = usage_service_pb2_grpc.UsageServiceStub(channel)
            await wait_for(health, SERVING)

            await asyncio.to_thread(embedded.stop)
            await wait_for(health, NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event("t-down")))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

            await asyncio.to_thread(embedded.start)
            await wait_for(health, SERVING)
            response = await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event("t-up")))
            assert response.outcome == usage_service_pb2.REPORT_OUTCOME_RECORDED
    finally:
        await server.stop()
        await asyncio.to_thread(embedded.stop)


async def test_shutdown_finishes_the_batch_in_flight(
    server_config: Config, db: asyncpg.Pool, tenant: str
) -> None:
    # A grace the batch surely fits in; the stream ends as soon as it is acknowledged.
    server = TallyServer(replace(server_config, grace_seconds=PATIENCE_SECONDS))
    await server.start()
    async with channel_with_token(f"127.0.0.1:{server.port}", make_token()) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        call = usage.StreamUsage()
        # The stream is open on the server before it stops (a call not yet seen would be refused).
        await call.write(usage_service_pb2.StreamUsageRequest(sequence=0, events=[event(tenant, "g-first")]))
        assert (await call.read()).accepted_count == 1
        await call.write(
            usage_service_pb2.StreamUsageRequest(
                sequence=1, events=[event(tenant, f"g{i}") for i in range(1, 2_000)]
            )
        )
        stopping = asyncio.create_task(server.stop())  # the batch is on its way or being written
        ack = await call.read()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        await stopping
        assert (ack.sequence, ack.accepted_count) == (1, 1_999)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant)), timeout=2)
        assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert await totals(db, tenant) == (2_000, Decimal(2_000), 2_000, Decimal(2_000))
