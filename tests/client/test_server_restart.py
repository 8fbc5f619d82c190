"""The ingester across a crash: `tally serve` is SIGKILLed with batches in flight and started again on the
same port; the ingester resends what was not acknowledged and the database ends with every event once."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from server.app import TallyServer
from server.domain.access import SCOPES
from tally_client import AsyncTallyClient, RetryPolicy, UsageEvent
from tests.client.fakes import until
from tests.conftest import ISSUER, make_token
from tests.helpers import totals

TALLY = shutil.which("tally") or str(Path(sys.executable).parent / "tally")
QUANTITY = Decimal("1.25")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def tally_serve(
    port: int, database_url: str, secret_file: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tally serve` on a fixed port and the session's database, killed at the end if still running."""
    process = await asyncio.create_subprocess_exec(
        TALLY,
        "serve",
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--jwt-secret-file",
        str(secret_file),
        "--jwt-issuer",
        ISSUER,
        "--log-level",
        "ERROR",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
        assert line.startswith(f"tally listening on 127.0.0.1:{port}"), line
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def batch(tenant: str, prefix: str, count: int) -> list[UsageEvent]:
    return [UsageEvent(tenant, "analytics", "query", QUANTITY, f"{prefix}-{n}") for n in range(count)]


@pytest.mark.slow
async def test_events_in_flight_when_the_server_is_killed_are_resent_and_counted_once(
    tally: TallyServer, secret_file: Path, db: asyncpg.Pool, tenant: str
) -> None:
    port = free_port()
    # Reconnect soon after the restart (gRPC's own reconnect backoff starts at one second).
    fast_reconnect = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500))
    async with tally_serve(port, tally.dsn, secret_file) as first:
        client = AsyncTallyClient(
            f"127.0.0.1:{port}", token=make_token([tenant], SCOPES), options=fast_reconnect
        )
        ingester = client.ingester(batch_size=200, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5))
        ingester.start()
        try:
            await ingester.add_many(batch(tenant, "before", 2_000))
            assert (await ingester.flush()).accepted == 2_000

            # Frozen, the server can read nothing more: what is written now is in flight when it dies.
            os.kill(first.pid, signal.SIGSTOP)
            await ingester.add_many(batch(tenant, "during", 3_000))
            await until(lambda: ingester.counts.in_flight > 0)
            first.kill()
            await first.wait()
            assert ingester.counts.pending == 3_000
        except BaseException:
            ingester.abort()
            await client.close()
            raise

    async with tally_serve(port, tally.dsn, secret_file):
        try:
            await ingester.add_many(batch(tenant, "before", 500))  # already recorded
            await ingester.add_many(batch(tenant, "after", 1_000))
            async with asyncio.timeout(120):
                counts = await ingester.close()
        finally:
            ingester.abort()
            await client.close()

    assert (counts.accepted, counts.duplicate, counts.rejected, counts.pending) == (6_000, 500, 0, 0)
    assert counts.resent_batches >= 1 and counts.reconnects >= 1
    expected_sum = QUANTITY * 6_000
    assert await totals(db, tenant) == (6_000, expected_sum, 6_000, expected_sum)
