"""Fixtures of the client's tests: clients of the session's server, with a token for every tenant."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import pytest
import pytest_asyncio
from aiohttp import web

from server.app import TallyServer
from tally_client import AsyncTallyClient
from tally_client.cli import main
from tests.conftest import make_token


@pytest.fixture(scope="session")
def address(tally: TallyServer) -> str:
    return f"127.0.0.1:{tally.port}"


@pytest_asyncio.fixture
async def client(address: str) -> AsyncIterator[AsyncTallyClient]:
    async with AsyncTallyClient(address, token=make_token()) as tally_client:
        yield tally_client


class Run(NamedTuple):
    code: int
    out: str
    err: str


Tally = Callable[..., Awaitable[Run]]


@pytest.fixture
def cli(address: str, capsys: pytest.CaptureFixture[str]) -> Tally:
    """Runs `tally ARGS --addr ... --token ...` (a token for every tenant and scope unless given).

    In a thread (tally_client.cli.main, as the console script calls it): its blocking gRPC
    calls must not hold up the event loop that serves them."""

    async def run(*args: str, token: str | None = None) -> Run:
        argv = [*args, "--addr", address, "--token", token or make_token()]
        try:
            code = await asyncio.to_thread(main, argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


@dataclasses.dataclass
class Receiver:
    url: str
    bodies: list[bytes] = dataclasses.field(default_factory=list)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An HTTP endpoint that accepts every POST (2xx), keeping the bodies."""
    found = Receiver(url="")

    async def handle(request: web.Request) -> web.Response:
        found.bodies.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
    yield found
    await runner.cleanup()
