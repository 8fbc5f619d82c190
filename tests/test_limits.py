"""Limits: rate limits per tenant and per principal, stream slots, idle streams and message size.

A server of its own (on the session's database) runs with low limits on a fake clock that the
tests step, so no outcome depends on how fast this machine makes the calls; each test uses its
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
    # Real time (asyncio's timer): long enough that no pause of a loaded machine trips it.
    stream_idle_seconds=120,
)
# The idle test's own server: the test waits this long, and the stream's first message must
# arrive within it (it is sent at once, so a loaded machine has a wide margin).
IDLE_SECONDS = 2.0
MAX_MESSAGE_BYTES = 64 * 1024
# A call that should get an answer at once gets one within this, even on a loaded machine.
PATIENCE_SECONDS = 60


class FakeClock:
    """A clock that moves only when a test moves it (server.auth.limits.LimitClock)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._epoch = time.time()  # shared rows are in wall-clock seconds: near the real ones

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        # Moves with the fake clock, never with real time: the server settles its buckets
        # through the database, and a shared bucket refilled in real time would refill them.
        return self._epoch + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture(scope="module")
async def limited(server_config: Config, clock: FakeClock) -> AsyncIterator[TallyServer]:
    """The limits of one process, on the fake clock. Settlement with other processes is off:
    it runs in the background on real time, and its rounds would land at arbitrary points of
    these step-by-step tests (it has a server and a test of its own below)."""
    server = TallyServer(
        replace(server_config, limits=LIMITS, max_message_bytes=MAX_MESSAGE_BYTES, limit_sync_seconds=0),
        clock=clock,
    )
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(scope="module")
async def shared(server_config: Config, clock: FakeClock) -> AsyncIterator[TallyServer]:
    """The same limits, settled with the other processes on the database."""
    server = TallyServer(
        replace(server_config, limits=LIMITS, max_message_bytes=MAX_MESSAGE_BYTES), clock=clock
    )
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


# --- against a server, on its fake clock -----------------------------------------------------


async def report(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> tuple[str, grpc.aio.AioRpcError | None]:
    """ReportUsage of one event: ("OK", None) or (status name, the error)."""
    try:
        await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(event=event(tenant)), timeout=PATIENCE_SECONDS
        )
        return "OK", None
    except grpc.aio.AioRpcError as error:
        return error.code().name, error


async def test_unary_calls_over_the_tenant_rate_get_resource_exhausted_with_retry_info(
    limited: TallyServer, clock: FakeClock
) -> None:
    noisy, quiet = new_tenant(), new_tenant()
    channel, usage = stub(limited, [noisy, quiet])
    async with channel:
        outcomes = [await report(usage, noisy) for _ in range(25)]
        # One second's burst (20) passes, then every call is refused until the clock moves.
        assert [code for code, _ in outcomes] == ["OK"] * 20 + ["RESOURCE_EXHAUSTED"] * 5
        last = outcomes[-1][1]
        assert last is not None
        delay, subjects = details(last)
        assert delay == pytest.approx(1 / 20) and subjects == [f"tenant:{noisy}"]
        # The same principal's calls for another tenant still pass (the principal allows 40/s).
        assert (await report(usage, quiet))[0] == "OK"
        # After the advertised delay, one more call of the noisy tenant fits, and only one.
        clock.advance(delay)
        assert [(await report(usage, noisy))[0] for _ in range(2)] == ["OK", "RESOURCE_EXHAUSTED"]


async def test_principal_rate_covers_all_its_tenants(limited: TallyServer) -> None:
    tenants = [new_tenant() for _ in range(5)]
    subject = f"svc-{uuid.uuid4().hex[:8]}"
    channel, usage = stub(limited, tenants, subject)
    async with channel:
        # 10 calls per tenant stay under the tenant rate (20/s); the principal's 40/s is the limit.
        outcomes = [await report(usage, tenants[i % 5]) for i in range(50)]
    assert [code for code, _ in outcomes] == ["OK"] * 40 + ["RESOURCE_EXHAUSTED"] * 10
    for _, error in outcomes[40:]:
        assert error is not None and details(error)[1] == [f"principal:{subject}"]


async def test_noisy_tenant_is_slowed_while_the_quiet_one_keeps_its_throughput(
    limited: TallyServer, clock: FakeClock, db: asyncpg.Pool
) -> None:
    noisy, quiet = new_tenant(), new_tenant()
    noisy_channel, noisy_usage = stub(limited, [noisy])
    quiet_channel, quiet_usage = stub(limited, [quiet])
    async with noisy_channel, quiet_channel:
        # 2,000 events in 8 batches against a tenant rate of 1,000/s: the first second's burst
        # (4 batches) is acknowledged, the rest waits for the clock, never fails.
        flood = noisy_usage.StreamUsage(timeout=PATIENCE_SECONDS)
        for sequence in range(8):
            await flood.write(
                usage_service_pb2.StreamUsageRequest(
                    sequence=sequence, events=[event(noisy) for _ in range(250)]
                )
            )
        assert [(await flood.read()).sequence for _ in range(4)] == [0, 1, 2, 3]
        fifth = asyncio.ensure_future(flood.read())

        # Meanwhile the quiet tenant gets every batch through (half of its rate, all at once).
        trickle = quiet_usage.StreamUsage(timeout=PATIENCE_SECONDS)
        for sequence in range(15):
            await trickle.write(
                usage_service_pb2.StreamUsageRequest(
                    sequence=sequence, events=[event(quiet) for _ in range(50)]
                )
            )
            assert (await trickle.read()).accepted_count == 50
        await trickle.done_writing()
        assert await trickle.read() == grpc.aio.EOF
        assert (await totals(db, quiet))[0] == 750

        # The flood is still held where the clock stopped: nothing beyond the burst is stored.
        assert not fifth.done()
        assert (await totals(db, noisy))[0] == 1_000

        # One second of refill repays the debt of the four waiting batches: all are recorded.
        clock.advance(1.0)
        acks = [await fifth] + [await flood.read() for _ in range(3)]
        assert [(a.sequence, a.accepted_count) for a in acks] == [(4, 250), (5, 250), (6, 250), (7, 250)]
        await flood.done_writing()
        assert await flood.read() == grpc.aio.EOF
    assert (await totals(db, noisy))[0] == 2_000


async def test_server_settles_its_shared_buckets_on_its_own_clock(
    shared: TallyServer, clock: FakeClock, db: asyncpg.Pool
) -> None:
    tenant = new_tenant()
    channel, usage = stub(shared, [tenant])
    async with channel:
        assert [(await report(usage, tenant))[0] for _ in range(20)] == ["OK"] * 20
        # The server settles the burst through the database in the background; the shared
        # bucket is stamped with the fake clock's wall time (not the real one, by which it
        # would refill behind the test's back) and, that clock standing still, ends empty.
        deadline = time.monotonic() + PATIENCE_SECONDS
        while (row := await shared_bucket(db, f"requests:tenant:{tenant}")) is None or row[0] != 0:
            assert row is None or row[1] == clock.wall(), (row, clock.wall())
            assert time.monotonic() < deadline, f"the burst was not settled in {PATIENCE_SECONDS} s: {row}"
            await asyncio.sleep(0.05)
        assert row[1] == clock.wall()
        assert (await report(usage, tenant))[0] == "RESOURCE_EXHAUSTED"


async def shared_bucket(db: asyncpg.Pool, key: str) -> tuple[float, float] | None:
    """(tokens, updated) of a shared rate-limit bucket, if it has a row."""
    row = await db.fetchrow("SELECT tokens, updated FROM rate_limit_buckets WHERE key = $1", key)
    return None if row is None else (row["tokens"], row["updated"])


async def test_concurrent_streams_per_principal_are_limited(limited: TallyServer) -> None:
    tenant = new_tenant()
    channel, usage = stub(limited, [tenant])
    async with channel:
        open_calls = [usage.StreamUsage(timeout=PATIENCE_SECONDS) for _ in range(2)]
        for call in open_calls:
            await call.write(usage_service_pb2.StreamUsageRequest(sequence=1, events=[event(tenant)]))
            await call.read()
        third = usage.StreamUsage(timeout=PATIENCE_SECONDS)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await third.read()
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrent streams" in (raised.value.details() or "")
        for call in open_calls:
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        again = usage.StreamUsage(timeout=PATIENCE_SECONDS)
        await again.write(usage_service_pb2.StreamUsageRequest(sequence=2, events=[event(tenant)]))
        assert (await again.read()).accepted_count == 1
        await again.done_writing()


async def test_idle_stream_is_closed_with_deadline_exceeded_after_committing_what_came(
    server_config: Config, db: asyncpg.Pool
) -> None:
    server = TallyServer(replace(server_config, limits=replace(LIMITS, stream_idle_seconds=IDLE_SECONDS)))
    await server.start()
    try:
        tenant = new_tenant()
        channel, usage = stub(server, [tenant])
        async with channel:
            call = usage.IngestUsage(timeout=PATIENCE_SECONDS)
            await call.write(usage_service_pb2.IngestUsageRequest(events=[event(tenant) for _ in range(3)]))
            # No sleep: the server answers once the stream has been idle for IDLE_SECONDS.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no message for" in (raised.value.details() or "")
    finally:
        await server.stop()
    assert (await totals(db, tenant))[0] == 3


async def test_message_over_the_size_limit_is_resource_exhausted(limited: TallyServer) -> None:
    tenant = new_tenant()
    channel, usage = stub(limited, [tenant])
    async with channel:
        big = event(tenant, dimensions={f"k{i}": "x" * 250 for i in range(300)})
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=big), timeout=PATIENCE_SECONDS)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
