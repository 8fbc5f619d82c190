"""`tally serve --workers N`: worker processes on one port, restarted when they die, stopped together.

The server runs as a real `tally serve --workers 2` process on the session's database. Which
worker holds a client's connection is read from the kernel (psutil lists each worker's sockets),
so the test kills exactly the worker that serves its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import psutil  # type: ignore[import-untyped]
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import TallyServer
from server.auth.limits import Limiter, LimitSettings, take
from server.auth.sharing import LimitSharing
from server.domain.errors import ResourceExhausted
from server.ports import PortUnavailable, check_port_free, reserve_port
from server.storage.shared_limits import SharedLimitStore
from tally.v1 import billing_service_pb2, resources_pb2, usage_service_pb2, usage_service_pb2_grpc
from tests.conftest import AUDIENCE, ISSUER, TEST_SECRET, make_token, new_tenant
from tests.fake_stripe import FakeStripe
from tests.helpers import bearer_interceptors, event, hour_start, totals, ts
from tests.test_telemetry import scrape, status_of, value

TALLY = str(Path(sys.executable).parent / "tally")
GRACE_SECONDS = 2
# The parent waits the grace period plus server.supervisor.STOP_MARGIN_SECONDS (5 s) for its
# workers; the rest is margin for a loaded 2-core machine.
STOP_BOUND_SECONDS = GRACE_SECONDS + 5 + 20


@dataclass
class Workers:
    process: subprocess.Popen[str]
    port: int
    http_port: int = 0  # the parent's /metrics, with --http-port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> set[int]:
        """The worker processes now running (children started by multiprocessing's spawn)."""
        found = set()
        for child in psutil.Process(self.process.pid).children():
            try:
                if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return found

    def serving(self, client_port: int) -> int | None:
        """The worker holding the connection that comes from client_port, if any."""
        for pid in self.pids():
            try:
                connections = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            for conn in connections:
                if (
                    conn.laddr
                    and conn.raddr
                    and conn.laddr.port == self.port
                    and conn.raddr.port == client_port
                ):
                    return pid
        return None


def flags(tmp_path: Path) -> list[str]:
    secret = tmp_path / "secret"
    secret.write_bytes(TEST_SECRET)
    limits = []
    for limit in ("tenant-events", "principal-events", "tenant-requests", "principal-requests"):
        limits += [f"--{limit}-per-second", "0"]
    return [
        "--data-dir",
        str(tmp_path),
        "--jwt-secret-file",
        str(secret),
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--grace-seconds",
        str(GRACE_SECONDS),
        "--log-level",
        "WARNING",
        *limits,
    ]


@contextlib.contextmanager
def serving_workers(dsn: str, tmp_path: Path, *extra: str) -> Iterator[Workers]:
    """A real `tally serve --workers 2` on the session's database, stopped (SIGTERM) at the end."""
    process = subprocess.Popen(
        [TALLY, "serve", "--workers", "2", "--port", "0", *flags(tmp_path), *extra],
        env={**os.environ, "DATABASE_URL": dsn},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    try:
        assert line.startswith("tally listening on ") and "(2 workers" in line, line
        workers = Workers(process, int(line.split()[3].rsplit(":", 1)[1]))
        if "--http-port" in extra:
            line = process.stdout.readline()
            assert line.startswith("tally metrics and probes on http://"), line
            workers.http_port = int(line.split()[5].split("/")[2].rsplit(":", 1)[1])
        yield workers
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_BOUND_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


@pytest.fixture
def workers(tally: TallyServer, tmp_path: Path) -> Iterator[Workers]:
    with serving_workers(tally.dsn, tmp_path) as running:
        yield running


def own_channel(address: str) -> grpc.aio.Channel:
    """A channel with a connection of its own (gRPC otherwise shares one per target in a process)."""
    return grpc.aio.insecure_channel(
        address,
        options=[("grpc.use_local_subchannel_pool", 1)],
        interceptors=bearer_interceptors(make_token()),
    )


def client_ports(server_port: int) -> set[int]:
    """Local ports of this process's connections to the server."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server_port and c.status == psutil.CONN_ESTABLISHED
    }


async def wait_until(condition: object, what: str, seconds: float = 60) -> None:
    """Poll a condition (a callable) until true; a margin that holds on a loaded machine."""
    assert callable(condition)
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def send_with_resend(
    workers: Workers, batches: list[list[resources_pb2.UsageEvent]], kill_after_acks: int
) -> int:
    """Stream every batch, two in flight; kill the serving worker after some acknowledgements;
    on UNAVAILABLE resend what was not acknowledged on a new call. Returns UNAVAILABLEs seen."""
    pending = dict(enumerate(batches))
    unavailable = acks = 0
    killed: int | None = None
    async with own_channel(workers.address) as channel:
        stub = usage_service_pb2_grpc.UsageServiceStub(channel)
        for _attempt in range(5):
            if not pending:
                break
            # wait_for_ready: after the kill the channel is in TRANSIENT_FAILURE until it reconnects
            # (backoff from 1 s); without it a resend fails at once, and five of them burned in well
            # under a second on a loaded machine (seen in a full run).
            call = stub.StreamUsage(wait_for_ready=True)
            try:
                in_flight = 0
                for sequence in sorted(pending):
                    await call.write(
                        usage_service_pb2.StreamUsageRequest(sequence=sequence, events=pending[sequence])
                    )
                    in_flight += 1
                    if in_flight == 2:
                        pending.pop((await call.read()).sequence)
                        in_flight -= 1
                        acks += 1
                        if acks == kill_after_acks and killed is None:
                            (port,) = client_ports(workers.port)
                            killed = workers.serving(port)
                            assert killed is not None
                            os.kill(killed, signal.SIGKILL)
                await call.done_writing()
                while (ack := await call.read()) != grpc.aio.EOF:
                    pending.pop(ack.sequence)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                assert await call.code() == grpc.StatusCode.UNAVAILABLE, await call.details()
                unavailable += 1
    assert killed is not None and not pending
    return unavailable


async def test_killed_worker_is_restarted_and_its_stream_resent_counts_each_event_once(
    workers: Workers, db: object
) -> None:
    await wait_until(lambda: len(workers.pids()) == 2, "two workers")
    before = workers.pids()
    tenant = new_tenant()
    batches = [[event(tenant, f"e{b}-{i}", quantity="0.05") for i in range(100)] for b in range(30)]

    unavailable = await send_with_resend(workers, batches, kill_after_acks=10)

    # At least the killed stream fails. A resend can fail too: its new connection may land on the
    # dying worker's listening socket, still in the port's SO_REUSEPORT group for a moment after
    # SIGKILL (seen in CI). What must hold is that every event counts once, whatever the resends.
    assert 1 <= unavailable <= 5
    assert await totals(db, tenant) == (3_000, Decimal("150.00"), 3_000, Decimal("150.00"))  # type: ignore[arg-type]

    # The parent started a new worker in place of the killed one, and it serves.
    await wait_until(lambda: len(workers.pids()) == 2 and workers.pids() != before, "a restarted worker")
    (restarted,) = workers.pids() - before
    for _ in range(64):  # the kernel picks a worker per connection; 64 misses has odds of 2**-64
        earlier = client_ports(workers.port)
        async with own_channel(workers.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            (port,) = client_ports(workers.port) - earlier
            if workers.serving(port) == restarted:
                break
    else:
        pytest.fail("no connection reached the restarted worker")

    # SIGTERM to the parent stops every worker within the bound.
    pids = workers.pids()
    started = time.monotonic()
    workers.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(workers.process.wait, STOP_BOUND_SECONDS) == 0
    assert time.monotonic() - started < STOP_BOUND_SECONDS
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


async def report_on_both_workers(workers: Workers, tenant: str) -> tuple[int, set[int]]:
    """ReportUsage on new connections until both workers have served one; (calls made, pids seen)."""
    served: set[int] = set()
    calls = 0
    while len(served) < 2:
        assert calls < 64, "the kernel never picked the second worker"  # odds of 2**-63
        earlier = client_ports(workers.port)
        async with own_channel(workers.address) as channel:
            stub = usage_service_pb2_grpc.UsageServiceStub(channel)
            await stub.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant)))
            calls += 1
            (port,) = client_ports(workers.port) - earlier
            pid = workers.serving(port)
            assert pid is not None
            served.add(pid)
    return calls, served


async def test_one_scrape_of_the_parent_sums_both_workers_and_keeps_a_killed_workers_counts(
    tally: TallyServer, db: object, tmp_path: Path
) -> None:
    tenant = new_tenant()
    with serving_workers(tally.dsn, tmp_path, "--http-port", "0") as workers:
        await wait_until(lambda: len(workers.pids()) == 2, "two workers")
        async with own_channel(workers.address) as streaming:
            # A stream held open on one worker: the open-streams gauge, and a batch counted there.
            stream = usage_service_pb2_grpc.UsageServiceStub(streaming).StreamUsage()
            await stream.write(
                usage_service_pb2.StreamUsageRequest(sequence=1, events=[event(tenant) for _ in range(5)])
            )
            assert (await stream.read()).sequence == 1
            (port,) = client_ports(workers.port)
            streamed_on = workers.serving(port)
            calls, served = await report_on_both_workers(workers, tenant)
            assert served == workers.pids()

            samples = await scrape(workers.http_port)
            # One series per metric (no worker or pid label), the sum of both workers.
            assert value(samples, "tally_events_total", outcome="accepted") == calls + 5
            assert value(samples, "tally_rpc_calls_total", method="ReportUsage", code="OK") == calls
            assert value(samples, "tally_streams_open", method="StreamUsage") == 1
            assert value(samples, "tally_batch_events_count") == 1  # streamed batches (not unary reports)
            assert value(samples, "tally_batch_events_sum") == 5
            assert value(samples, "tally_usage_events") >= calls + 5  # the parent's database figures
            assert not [key for key in samples if any(label in ("pid", "worker") for label, _ in key[1])]

            assert streamed_on is not None
            os.kill(streamed_on, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError):
                await stream.read()
        await wait_until(
            lambda: len(workers.pids()) == 2 and streamed_on not in workers.pids(), "a restarted worker"
        )
        # The killed worker's finished counts stay, once; its stream no longer counts as open.
        samples = await scrape(workers.http_port)
        assert value(samples, "tally_events_total", outcome="accepted") == calls + 5
        assert value(samples, "tally_rpc_calls_total", method="ReportUsage", code="OK") == calls
        assert value(samples, "tally_streams_open", method="StreamUsage") == 0
        assert value(samples, "tally_batch_events_bucket", le="10.0") == 1

        # The restarted worker adds to the same series.
        more, _ = await report_on_both_workers(workers, tenant)
        samples = await scrape(workers.http_port)
        assert value(samples, "tally_events_total", outcome="accepted") == calls + more + 5
        assert value(samples, "tally_rpc_calls_total", method="ReportUsage", code="OK") == calls + more
        assert await status_of(workers.http_port, "/healthz") == 200
        assert await status_of(workers.http_port, "/readyz") == 200
    assert (await totals(db, tenant))[0] == calls + more + 5  # type: ignore[arg-type]


async def test_the_parent_of_workers_receives_stripe_webhooks_and_applies_them(
    tally: TallyServer, db: asyncpg.Pool, usage: Any, billing: Any, tmp_path: Path
) -> None:
    tenant = new_tenant()
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="5", time=hour_start(-2)))
    )
    draft = (
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-3)),
                period_end_time=ts(hour_start(0)),
            )
        )
    ).invoice
    await billing.FinalizeInvoice(billing_service_pb2.FinalizeInvoiceRequest(name=draft.name))
    invoice_id = draft.name.rsplit("/", 1)[1]
    secret = "whsec_workers_0123456789abcdef"
    (tmp_path / "webhook-secret").write_text(secret + "\n")
    with FakeStripe() as fake:
        client = fake.client()
        customer = client.v1.customers.create(params={"name": tenant})
        remote = client.v1.invoices.create(
            params={
                "customer": customer.id,
                "auto_advance": False,
                "metadata": {"tally_invoice_id": invoice_id},
            }
        )
        # What the push stores once Stripe's invoice is open (the session server is in simulation mode).
        await db.execute(
            "UPDATE invoice_payments SET state = 'open', stripe_invoice_id = $2 WHERE invoice_id = $1",
            invoice_id,
            remote.id,
        )
        paid = fake.event("invoice.paid", remote.id, status="paid")
        body, header = fake.sign(paid, secret, timestamp=int(time.time()))
    flag = ("--http-port", "0", "--stripe-webhook-secret-file", str(tmp_path / "webhook-secret"))
    with serving_workers(tally.dsn, tmp_path, *flag) as workers:
        url = f"http://127.0.0.1:{workers.http_port}/webhooks/stripe"
        async with aiohttp.ClientSession() as session:
            for expected in ("applied", "duplicate"):  # Stripe redelivers: applied once
                async with session.post(url, data=body, headers={"Stripe-Signature": header}) as answer:
                    assert (answer.status, (await answer.json())["outcome"]) == (200, expected)
            async with session.post(url, data=body, headers={"Stripe-Signature": "t=1,v1=00"}) as answer:
                assert answer.status == 400  # a forged delivery is refused
        samples = await scrape(workers.http_port)  # counted by the parent, on the one /metrics
        for outcome in ("applied", "duplicate", "refused"):
            assert value(samples, "tally_stripe_webhooks_total", outcome=outcome) == 1, outcome
    row = await db.fetchrow(
        "SELECT i.status, p.state FROM invoices i JOIN invoice_payments p ON p.invoice_id = i.id"
        " WHERE i.id = $1",
        invoice_id,
    )
    assert (row["status"], row["state"]) == ("paid", "paid")
    audited = await db.fetch(
        "SELECT principal FROM audit_events WHERE resource = $1 AND action = 'invoice_paid'",
        f"invoices/{invoice_id}",
    )
    assert [a["principal"] for a in audited] == ["stripe-webhook"]


async def test_another_server_on_the_port_of_workers_is_refused(workers: Workers, tmp_path: Path) -> None:
    foreign = await asyncio.to_thread(
        subprocess.run,
        [TALLY, "serve", "--port", str(workers.port), *flags(tmp_path)],
        env={**os.environ, "DATABASE_URL": "postgresql://unused.invalid/never"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert foreign.returncode == 1 and "already in use" in foreign.stderr, foreign.stderr


def test_workers_refuse_a_port_that_a_foreign_program_listens_on(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [TALLY, "serve", "--workers", "2", "--port", str(port), *flags(tmp_path)],
            env={**os.environ, "DATABASE_URL": "postgresql://unused.invalid/never"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1 and "already in use" in result.stderr, result.stderr


def test_held_port_admits_workers_and_refuses_others() -> None:
    held = reserve_port("127.0.0.1", 0)
    try:
        # Another server's check fails although nothing listens yet ...
        with pytest.raises(PortUnavailable):
            check_port_free("127.0.0.1", held.port)
        # ... while a worker's listening socket (SO_REUSEPORT, as gRPC binds) joins it and is reached.
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", held.port))
            worker.listen()
            with socket.create_connection(("127.0.0.1", held.port), timeout=10):
                accepted, _ = worker.accept()
                accepted.close()
    finally:
        held.close()


# --- limits shared by processes, on a fake clock ------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._epoch = time.time()  # shared rows are in wall-clock seconds: near the real ones

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self._epoch + self.now


class Process:
    """One server process's limiter and its settlement, on the session database."""

    def __init__(self, db: asyncpg.Pool, clock: FakeClock, settings: LimitSettings) -> None:
        self.limiter = Limiter(settings, clock)
        self.sharing = LimitSharing(self.limiter, SharedLimitStore(db), interval=0.1)

    def call(self, subject: str, tenant: str) -> bool:
        try:
            self.limiter.request(subject, tenant)
            return True
        except ResourceExhausted:
            return False


RATES = LimitSettings(
    tenant_events_per_second=10,
    principal_events_per_second=0,
    tenant_requests_per_second=10,
    principal_requests_per_second=0,
    max_streams_per_principal=2,
)


def subject() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


async def test_a_burst_spent_on_one_process_is_refused_on_the_other(db: asyncpg.Pool) -> None:
    clock, tenant = FakeClock(), new_tenant()
    a, b = Process(db, clock, RATES), Process(db, clock, RATES)
    assert all(a.call(subject(), tenant) for _ in range(10))
    # b has not settled since: it admits from its own full bucket (the documented overshoot
    # within one interval), then learns the shared balance, which is now in debt.
    assert b.call(subject(), tenant)
    await a.sharing.settle()
    await b.sharing.settle()
    assert not b.call(subject(), tenant) and not a.call(subject(), tenant)
    clock.now = 0.45  # 4.5 tokens refilled, less the debt of 1: three calls pass over both
    await a.sharing.settle()
    await b.sharing.settle()
    assert [b.call(subject(), tenant), a.call(subject(), tenant), b.call(subject(), tenant)] == [True] * 3
    await b.sharing.settle()
    await a.sharing.settle()
    assert not a.call(subject(), tenant)
    await b.sharing.settle()
    assert not b.call(subject(), tenant)


async def test_a_process_serving_all_of_a_tenants_calls_gets_all_of_its_rate(db: asyncpg.Pool) -> None:
    clock, tenant = FakeClock(), new_tenant()
    busy, idle = Process(db, clock, RATES), Process(db, clock, RATES)
    admitted = 0
    for step in range(30):  # three seconds, settling every 0.1 s
        clock.now = step * 0.1
        admitted += sum(busy.call(subject(), tenant) for _ in range(5))
        await busy.sharing.settle()
        await idle.sharing.settle()
    # One second's burst and then the whole rate: 10 + 29 steps of 0.1 s at 10/s (not 10/s / 2).
    assert 38 <= admitted <= 39


async def test_stream_debt_on_one_process_holds_back_streams_on_the_other(db: asyncpg.Pool) -> None:
    clock, tenant = FakeClock(), new_tenant()
    a, b = Process(db, clock, RATES), Process(db, clock, RATES)
    assert take(b.limiter.event_charges("svc", 1, {tenant: 1})) == 0
    assert take(a.limiter.event_charges("svc", 25, {tenant: 25})) == pytest.approx(1.5)
    await a.sharing.settle()
    await b.sharing.settle()
    # b's next batch waits for the debt a ran up (26 taken of 10: 1.6 s) and its own 4 (0.4 s).
    assert take(b.limiter.event_charges("svc", 4, {tenant: 4})) == pytest.approx(2.0)


async def test_refill_after_a_burst_is_kept_when_the_burst_is_settled_later(db: asyncpg.Pool) -> None:
    clock, tenant = FakeClock(), new_tenant()
    a = Process(db, clock, RATES)
    assert take(a.limiter.event_charges("svc", 15, {tenant: 15})) == pytest.approx(0.5)
    clock.now = 1.0  # the debt of 5 repaid and 5 refilled, before any settlement
    await a.sharing.settle()
    # The burst is settled as of when it was taken, so the shared bucket holds the same 5
    # (refilled to now before subtracting, its cap of 10 would have swallowed the second: -5).
    assert take(a.limiter.event_charges("svc", 5, {tenant: 5})) == 0
    assert take(a.limiter.event_charges("svc", 1, {tenant: 1})) == pytest.approx(0.1)


async def test_a_call_retried_after_the_advertised_delay_passes_once_the_balance_is_settled(
    db: asyncpg.Pool,
) -> None:
    clock, tenant = FakeClock(), new_tenant()
    a = Process(db, clock, RATES)
    assert all(a.call(subject(), tenant) for _ in range(10))
    await a.sharing.settle()
    with pytest.raises(ResourceExhausted) as raised:
        a.limiter.request(subject(), tenant)
    clock.now += raised.value.retry_after_seconds  # 0.1 s: one call's worth
    # The shared bucket refills by wall-clock seconds held in doubles (epoch + 0.1 rounds to
    # 2**-22 s, a little short): a millionth of a token missing is not a reason to refuse.
    await a.sharing.settle()
    assert a.call(subject(), tenant) and not a.call(subject(), tenant)


async def test_stream_slots_count_the_streams_open_on_other_processes(db: asyncpg.Pool) -> None:
    clock, principal = FakeClock(), subject()
    a, b = Process(db, clock, RATES), Process(db, clock, RATES)
    a.limiter.streams.acquire(principal)
    a.limiter.streams.acquire(principal)
    await a.sharing.settle()
    await b.sharing.settle()
    with pytest.raises(ResourceExhausted):
        b.limiter.streams.acquire(principal)
    a.limiter.streams.release(principal)
    await a.sharing.settle()
    await b.sharing.settle()
    b.limiter.streams.acquire(principal)


async def test_streams_of_a_process_gone_without_a_word_stop_counting(db: asyncpg.Pool) -> None:
    clock, principal = FakeClock(), subject()
    gone, alive = Process(db, clock, RATES), Process(db, clock, RATES)
    gone.limiter.streams.acquire(principal)
    gone.limiter.streams.acquire(principal)
    await gone.sharing.settle()
    await alive.sharing.settle()
    with pytest.raises(ResourceExhausted):
        alive.limiter.streams.acquire(principal)
    clock.now = 2.5  # `gone` stopped settling: after the stale time its counts are ignored
    await alive.sharing.settle()
    alive.limiter.streams.acquire(principal)
