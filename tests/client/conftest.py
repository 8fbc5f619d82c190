"""Fixtures of the client's tests: clients of the session's server, with a token for every tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from server.app import TallyServer
from tally_client import AsyncTallyClient
from tests.conftest import make_token


@pytest.fixture(scope="session")
def address(tally: TallyServer) -> str:
    return f"127.0.0.1:{tally.port}"


@pytest_asyncio.fixture
async def client(address: str) -> AsyncIterator[AsyncTallyClient]:
    async with AsyncTallyClient(address, token=make_token()) as tally_client:
        yield tally_client
