"""Limits: rate limits per tenant and per principal, stream slots, idle streams and message size.

A server of its own (on the session's database) runs with low limits; each test uses its
own tenants and principals, so buckets never carry over between tests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2, status_pb2

from server.app import TallyServer
from server.auth.limits import Charge, TokenBuckets, take, try_take
from server.config import Config, LimitSettings
from server.domain.access import SCOPES
from server.domain.errors import ResourceExhausted
from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tests.conftest import make_token, new_tenant
from tests.helpers import channel_with_token, event, totals

LIMITS = LimitSettings(
    tenant_events_per_second=1_000,
    principal_events_per_second=5_000,
    tenant_requests_per_second=20,
    principal_requests_per_second=40,
    max_streams_per_principal=2,
    stream_idle_seconds=0.5,
)
MAX_MESSAGE_BYTES = 64 * 1024


@pytest_asyncio.fixture(scope="module")
async def limited(server_config: Config) -> AsyncIterator[TallyServer]:
    server = TallyServer(replace(server_config, limits=LIMITS, max_message_bytes=MAX_MESSAGE_BYTES))
    await server.start()
    yield server
    await server.stop()


def stub(
    server: TallyServer, tenants: list[str], subject: str | None = None
) -> tuple[grpc.aio.Channel, usage_service_pb2_grpc.UsageServiceStub]:
    channel = channel_with_token(
        f"127.0.0.1:{server.port}",
        make_token(tenants, SCOPES, subject=subject or f"svc-{uuid.uuid4().hex[:8]}"),
    )
    return channel, usage_service_pb2_grpc.UsageServiceStub(channel)


def details(error: grpc.aio.AioRpcError) -> tuple[float, list[str]]:
    """(RetryInfo delay in seconds, QuotaFailure subjects) of a failed call."""
    delay, subjects = -1.0, []
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                retry, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
                if detail.Unpack(retry):
                    delay = retry.retry_delay.ToNanoseconds() / 1e9
                elif detail.Unpack(quota):
                    subjects += [v.subject for v in quota.violations]
    return delay, subjects


# --- token buckets, on a fake clock ----------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_of_one_second_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets("requests", 10, clock)
    for _ in range(10):
        try_take([Charge(buckets, "t", 1)])
    with pytest.raises(ResourceExhausted) as raised:
        try_take([Charge(buckets, "t", 1)])
    assert raised.value.retry_after_seconds == pytest.approx(0.1)
    try_take([Charge(buckets, "other", 1)])  # another key has its own bucket
    clock.now = 0.1
    try_take([Charge(buckets, "t", 1)])


def test_refused_charge_takes_nothing_from_any_bucket() -> None:
    clock = FakeClock()
    small, large = TokenBuckets("events", 5, clock), TokenBuckets("events", 100, clock)
    try_take([Charge(small, "t", 1)])
    with pytest.raises(ResourceExhausted):
        try_take([Charge(large, "p", 10), Charge(small, "t", 5)])
    assert large.wait_for("p", 100) == 0 and small.wait_for("t", 4) == 0


def test_stream_charges_run_into_debt_and_say_how_long_to_wait() -> None:
    clock = FakeClock()
    buckets = TokenBuckets("events", 100, clock)
    assert take([Charge(buckets, "t", 100)]) == 0
    assert take([Charge(buckets, "t", 250)]) == pytest.approx(2.5)
    clock.now = 2.5
    assert take([Charge(buckets, "t", 0)]) == 0


def test_zero_rate_is_unlimited() -> None:
    buckets = TokenBuckets("events", 0, FakeClock())
    try_take([Charge(buckets, "t", 10**9)])
    assert take([Charge(buckets, "t", 10**9)]) == 0


# --- against a server ---------------------------------------------------------------------------


async def test_unary_calls_over_the_tenant_rate_get_resource_exhausted_with_retry_info(
    limited: TallyServer,
) -> None:
    noisy, quiet = new_tenant(), new_tenant()
    channel, usage = stub(limited, [noisy, quiet])
    async with channel:
        codes = []
        for _ in range(25):
            try:
                await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(noisy)))
                codes.append("OK")
            except grpc.aio.AioRpcError as error:
                codes.append(error.code().name)
                last = error
        assert codes.count("OK") >= 20 and "RESOURCE_EXHAUSTED" in codes
        delay, subjects = details(last)
        assert 0 < delay <= 1 and subjects == [f"tenant:{noisy}"]
        # The same principal's calls for another tenant still pass (the principal allows 40/s).
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(quiet)))


async def test_principal_rate_covers_all_its_tenants(limited: TallyServer) -> None:
    tenants = [new_tenant() for _ in range(5)]
    channel, usage = stub(limited, tenants)
    async with channel:
        refused = 0
        for i in range(50):
            try:
                await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenants[i % 5])))
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert details(error)[1][0].startswith("principal:")
                refused += 1
        assert refused >= 5


async def test_noisy_tenant_is_slowed_while_the_quiet_one_keeps_its_throughput(
    limited: TallyServer, db: asyncpg.Pool
) -> None:
    noisy, quiet = new_tenant(), new_tenant()
    noisy_channel, noisy_usage = stub(limited, [noisy])
    quiet_channel, quiet_usage = stub(limited, [quiet])
    duration = 1.5

    async def flood() -> int:
        call = noisy_usage.StreamUsage()
        sent, start = 0, time.monotonic()
        while time.monotonic() - start < duration:
            await call.write(
                usage_service_pb2.StreamUsageRequest(sequence=sent, events=[event(noisy) for _ in range(250)])
            )
            await call.read()
            sent += 1
        await call.done_writing()
        return sent * 250

    async def trickle() -> list[float]:
        call = quiet_usage.StreamUsage()
        latencies = []
        for sequence in range(15):  # 50 events every 0.1 s: half of the tenant's rate
            started = time.monotonic()
            await call.write(
                usage_service_pb2.StreamUsageRequest(
                    sequence=sequence, events=[event(quiet) for _ in range(50)]
                )
            )
            ack = await call.read()
            assert ack.accepted_count == 50
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(max(0.0, 0.1 - latencies[-1]))
        await call.done_writing()
        return latencies

    async with noisy_channel, quiet_channel:
        started = time.monotonic()
        flooded, latencies = await asyncio.gather(flood(), trickle())
        elapsed = time.monotonic() - started
    noisy_stored = (await totals(db, noisy))[0]
    # The flood was slowed (never failed) to about the tenant's rate: one second's burst plus the refill.
    assert noisy_stored == flooded
    assert noisy_stored <= LIMITS.tenant_events_per_second * (1 + elapsed) + 250
    # The quiet tenant got every event through, each batch promptly.
    assert (await totals(db, quiet))[0] == 750
    assert max(latencies) < 0.5, latencies


async def test_concurrent_streams_per_principal_are_limited(limited: TallyServer) -> None:
    tenant = new_tenant()
    channel, usage = stub(limited, [tenant])
    async with channel:
        open_calls = [usage.StreamUsage() for _ in range(2)]
        for call in open_calls:
            await call.write(usage_service_pb2.StreamUsageRequest(sequence=1, events=[event(tenant)]))
            await call.read()
        third = usage.StreamUsage()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await third.read()
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrent streams" in (raised.value.details() or "")
        for call in open_calls:
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        again = usage.StreamUsage()
        await again.write(usage_service_pb2.StreamUsageRequest(sequence=2, events=[event(tenant)]))
        assert (await again.read()).accepted_count == 1
        await again.done_writing()


async def test_idle_stream_is_closed_with_deadline_exceeded_after_committing_what_came(
    limited: TallyServer, db: asyncpg.Pool
) -> None:
    tenant = new_tenant()
    channel, usage = stub(limited, [tenant])
    async with channel:
        call = usage.IngestUsage()
        await call.write(usage_service_pb2.IngestUsageRequest(events=[event(tenant) for _ in range(3)]))
        await asyncio.sleep(LIMITS.stream_idle_seconds * 2)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await totals(db, tenant))[0] == 3


async def test_message_over_the_size_limit_is_resource_exhausted(limited: TallyServer) -> None:
    tenant = new_tenant()
    channel, usage = stub(limited, [tenant])
    async with channel:
        big = event(tenant, dimensions={f"k{i}": "x" * 250 for i in range(300)})
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=big))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
