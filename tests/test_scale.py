"""Scaling out: raw-event retention by monthly partition, and several server processes on one database."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from server.app import TallyServer
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.conftest import AUDIENCE, ISSUER, TEST_SECRET, make_token
from tests.helpers import channel_with_token, event, totals, ts

TALLY = str(Path(sys.executable).parent / "tally")
OLD = datetime(2001, 1, 15, 12, tzinfo=UTC)  # months no other test uses (recorded by backfill)


async def partitions(db: asyncpg.Pool) -> set[str]:
    rows = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'usage_events'::regclass"
    )
    return {r["relname"] for r in rows}


async def backfill(
    usage: usage_service_pb2_grpc.UsageServiceStub, events: list[resources_pb2.UsageEvent]
) -> usage_service_pb2.IngestUsageResponse:
    """Record events older than the ingestion window, in one backfilled batch."""

    async def requests() -> AsyncIterator[usage_service_pb2.IngestUsageRequest]:
        yield usage_service_pb2.IngestUsageRequest(events=events, backfill=True)

    response: usage_service_pb2.IngestUsageResponse = await usage.IngestUsage(requests())
    return response


async def retention(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `tally retention` without blocking the loop that also runs the test server."""
    return await asyncio.to_thread(
        subprocess.run,
        [TALLY, "retention", *args],
        env={**os.environ, "DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_retention_drops_old_raw_months_and_keeps_totals_and_dedup(
    tally: TallyServer,
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    db: asyncpg.Pool,
    tenant: str,
) -> None:
    jan, feb = OLD, OLD + timedelta(days=31)
    first = await backfill(
        usage, [event(tenant, f"old{i}", time=when) for i, when in enumerate([jan, jan, feb])]
    )
    assert (first.accepted_count, first.rejected_count) == (3, 0), first.rejections
    period = billing_service_pb2.GenerateInvoiceRequest(
        parent=f"tenants/{tenant}",
        period_start_time=ts(datetime(2001, 1, 1, tzinfo=UTC)),
        period_end_time=ts(datetime(2001, 3, 1, tzinfo=UTC)),
    )
    before = (await billing.GenerateInvoice(period)).invoice
    assert {"usage_events_2001_01", "usage_events_2001_02"} <= await partitions(db)

    dry = await retention(tally.dsn, "--before", "2001-02", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would drop" in dry.stdout and "usage_events_2001_01" in dry.stdout
    assert "usage_events_2001_01" in await partitions(db)

    done = await retention(tally.dsn, "--before", "2001-02")
    assert done.returncode == 0, done.stderr
    assert "usage_events_2001_01" not in await partitions(db)
    assert "usage_events_2001_02" in await partitions(db)

    # Raw January events are gone; totals read rollups and do not change.
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE tenant_id = $1", tenant) == 1
    after = (await billing.GenerateInvoice(period)).invoice
    assert (after.name, after.total, list(after.line_items)) == (
        before.name,
        before.total,
        list(before.line_items),
    )

    # A dropped event sent again is still a duplicate; a late new one for January is recorded,
    # although this server process had the dropped partition in its cache.
    again = await backfill(usage, [event(tenant, "old0", time=jan)])
    assert (again.accepted_count, again.duplicate_count) == (0, 1)
    late = await backfill(usage, [event(tenant, "late", time=jan)])
    assert late.accepted_count == 1
    assert (await billing.GenerateInvoice(period)).invoice.total == "0.40"


def test_retention_needs_a_cutoff() -> None:
    result = subprocess.run([TALLY, "retention"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--before" in result.stderr


@pytest.fixture
def two_servers(tally: TallyServer, tmp_path: Path) -> Iterator[list[str]]:
    """Two more `tally serve` processes on the test database, trusting the tests' tokens."""
    secret = tmp_path / "secret"
    secret.write_bytes(TEST_SECRET)
    flags = ["--jwt-secret-file", str(secret), "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    for limit in ("tenant-events", "principal-events", "tenant-requests", "principal-requests"):
        flags += [f"--{limit}-per-second", "0"]
    processes = []
    addresses = []
    for _ in range(2):
        process = subprocess.Popen(
            [TALLY, "serve", "--port", "0", "--log-level", "WARNING", "--data-dir", str(tmp_path), *flags],
            env={**os.environ, "DATABASE_URL": tally.dsn},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("tally listening on "), line
        processes.append(process)
        addresses.append(line.split()[3])
    yield addresses
    for process in processes:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


async def test_two_server_processes_fed_the_same_events_count_each_once(
    two_servers: list[str], db: asyncpg.Pool, tenant: str
) -> None:
    events = [event(tenant, f"m{i}", quantity="0.25") for i in range(3_000)]
    batches_a = [events[i : i + 300] for i in range(0, 3_000, 300)]
    batches_b = [list(reversed(events))[i : i + 200] for i in range(0, 3_000, 200)]

    async def feed(address: str, batches: list[list[object]]) -> tuple[int, int]:
        async with channel_with_token(address, make_token()) as channel:
            stub = usage_service_pb2_grpc.UsageServiceStub(channel)
            call = stub.StreamUsage()
            accepted = duplicates = 0
            for sequence, batch in enumerate(batches):
                await call.write(usage_service_pb2.StreamUsageRequest(sequence=sequence, events=batch))
                ack = await call.read()
                accepted += ack.accepted_count
                duplicates += ack.duplicate_count
            await call.done_writing()
            return accepted, duplicates

    (a_new, a_dup), (b_new, b_dup) = await asyncio.gather(
        feed(two_servers[0], batches_a),  # type: ignore[arg-type]
        feed(two_servers[1], batches_b),  # type: ignore[arg-type]
    )
    assert (a_new + b_new, a_dup + b_dup) == (3_000, 3_000)
    assert await totals(db, tenant) == (3_000, Decimal("750"), 3_000, Decimal("750"))
