"""Token helpers and retries: minted tokens pass the real server, providers are asked again before expiry,
an expired token is replaced, and a rate-limited call waits the server's RetryInfo delay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio

from server.app import TallyServer
from server.config import Config
from server.domain.access import SCOPES
from tally_client import (
    AsyncTallyClient,
    RateLimitedError,
    RefreshingToken,
    ReportOutcome,
    RetryPolicy,
    SecretFileTokens,
    UnauthenticatedError,
    UsageEvent,
)
from tally_client.auth import token_expiry
from tests.conftest import ISSUER, UNLIMITED, make_token

REQUESTS_PER_SECOND = 2


@pytest_asyncio.fixture(scope="module")
async def rate_limited(server_config: Config) -> AsyncIterator[TallyServer]:
    limits = replace(UNLIMITED, tenant_requests_per_second=REQUESTS_PER_SECOND)
    server = TallyServer(replace(server_config, limits=limits))
    await server.start()
    yield server
    await server.stop()


def query(tenant: str) -> UsageEvent:
    return UsageEvent(tenant, "analytics", "query", Decimal(1))


async def test_token_minted_from_the_secret_file_is_accepted(
    address: str, secret_file: Path, tenant: str
) -> None:
    tokens = SecretFileTokens(secret_file, tenants=[tenant], scopes=["usage:write"], issuer=ISSUER)
    async with AsyncTallyClient(address, token=tokens) as client:
        assert (await client.report_usage(query(tenant))).outcome is ReportOutcome.RECORDED


async def test_token_minted_with_another_secret_is_refused(address: str, tmp_path: Path, tenant: str) -> None:
    other = tmp_path / "other-secret"
    other.write_bytes(b"x" * 40)
    tokens = SecretFileTokens(other, tenants=[tenant], scopes=["usage:write"], issuer=ISSUER)
    async with AsyncTallyClient(address, token=tokens) as client:
        with pytest.raises(UnauthenticatedError) as caught:
            await client.report_usage(query(tenant))
    assert caught.value.reason == "TOKEN_INVALID"


def test_provider_is_asked_again_only_when_the_token_nears_its_expiry() -> None:
    now = 1_000.0
    fetched: list[float] = []

    def provider() -> str:
        fetched.append(now)
        return make_token(ttl_seconds=100, now=lambda: now)

    source = RefreshingToken(provider, refresh_margin_seconds=30, now=lambda: now)
    first = source.token()
    assert token_expiry(first) == 1_100.0
    now = 1_069.0
    assert source.token() == first and fetched == [1_000.0]
    now = 1_071.0  # less than 30 s left
    source.token()
    assert fetched == [1_000.0, 1_071.0]


async def test_expired_token_is_replaced_and_the_call_retried(address: str, tenant: str) -> None:
    calls = 0

    def provider() -> tuple[str, float]:
        nonlocal calls
        calls += 1
        # The first token claims a long life but is long expired: only the server can tell.
        issued = time.time() - (7_200 if calls == 1 else 0)
        return make_token([tenant], SCOPES, ttl_seconds=3_600, now=lambda: issued), time.time() + 10_000

    async with AsyncTallyClient(address, token=RefreshingToken(provider)) as client:
        result = await client.report_usage(query(tenant))
    assert result.outcome is ReportOutcome.RECORDED and calls == 2


async def test_rate_limited_call_carries_retry_info_and_quota(rate_limited: TallyServer, tenant: str) -> None:
    address = f"127.0.0.1:{rate_limited.port}"
    async with AsyncTallyClient(address, token=make_token(), retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(RateLimitedError) as caught:
            for _ in range(REQUESTS_PER_SECOND * 10):
                await client.report_usage(query(tenant))
    error = caught.value
    assert error.reason == "RATE_LIMITED" and error.metadata.get("quota")
    assert error.retry_delay is not None and 0 < error.retry_delay.total_seconds() <= 1
    assert [v.subject for v in error.quota_violations] == [f"tenant:{tenant}"]


async def test_rate_limited_call_waits_the_servers_delay_not_its_own_backoff(
    rate_limited: TallyServer,
) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:16]}"
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(seconds)

    # Its own backoff would be 1,000 s: only the server's RetryInfo makes this test finish.
    patient = RetryPolicy(max_attempts=10, initial_backoff=1_000, max_backoff=1_000)
    address = f"127.0.0.1:{rate_limited.port}"
    async with AsyncTallyClient(address, token=make_token(), retry=patient, sleep=sleep) as client:
        results = [await client.report_usage(query(tenant)) for _ in range(REQUESTS_PER_SECOND * 2)]
    assert all(r.outcome is ReportOutcome.RECORDED for r in results)
    assert slept and all(0 < s <= 1 for s in slept)
