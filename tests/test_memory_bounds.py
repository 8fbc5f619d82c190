"""Memory before any token is checked: what a caller without a token can make the server hold.

The end-to-end test attacks a `tally serve` of its own (its RSS is then the server's alone)
with a raw HTTP/2 client that sends what no gRPC client would: calls that declare large
messages, send all but their last byte, and hold. docs/security.md ("Memory bound") states
the bound this test checks, and how it follows from the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import psutil
import pytest

from server.api.decoding import BoundedRegistration, RequestReader

TALLY = str(Path(sys.executable).parent / "tally")
KIB, MIB = 1024, 1024 * 1024

# The attacked server's limits: small, so that the attack reaches them in a moment.
MESSAGE_BYTES = 1 * MIB
INCOMING_REQUESTS = 4
CONCURRENT_CALLS = 200
CONNECTIONS = 8
STREAMS_PER_CONNECTION = 40
RECEIVE_SECONDS = 5
# docs/security.md: requests being received, plus per call the HTTP/2 window of a request not
# yet read (64 KiB) and gRPC's own state (about 25 KiB measured, 32 KiB counted), plus 64 KiB
# per connection.
BOUND = INCOMING_REQUESTS * MESSAGE_BYTES + CONCURRENT_CALLS * 96 * KIB + CONNECTIONS * 64 * KIB
MARGIN = 32 * MIB  # the allocator's and the interpreter's own growth, not the attack's


# --- the raw HTTP/2 client ---------------------------------------------------------------


@dataclass
class Attack:
    """What the attack saw: bytes the server let in, connections refused, statuses received."""

    sent: int = 0
    refused_connections: int = 0
    statuses: dict[str, list[str]] = field(default_factory=dict)  # path -> grpc-status of ended calls
    open_streams: dict[tuple[int, int], str] = field(default_factory=dict)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    a_call_ended: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        for task in self.readers:
            task.cancel()
        for writer in self.writers:
            writer.close()


async def call_and_hold(
    attack: Attack, index: int, port: int, paths: list[str], declared: int, *, complete: bool
) -> None:
    """One connection: a call per path, each declaring a `declared`-byte message and sending it
    (`complete`) or all of it but the last byte, as fast as flow control allows; then it keeps
    reading, so that the calls' statuses are seen, until `attack.close()`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    attack.writers.append(writer)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    remaining: dict[int, int] = {}
    status: dict[int, str] = {}
    progress = asyncio.Event()
    closed = False

    def ended(stream: int) -> None:
        path = attack.open_streams.pop((index, stream), None)
        if path is not None:
            attack.statuses.setdefault(path, []).append(status.pop(stream, "reset"))
            attack.a_call_ended.set()
        remaining.pop(stream, None)

    async def read_frames() -> None:
        nonlocal closed
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    if "grpc-status" in dict(event.headers):
                        status[event.stream_id] = dict(event.headers)["grpc-status"]
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended(event.stream_id)
            writer.write(conn.data_to_send())
            progress.set()
        closed = True
        for stream in list(remaining):
            ended(stream)
        progress.set()

    attack.readers.append(asyncio.create_task(read_frames()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(progress.wait(), 30)  # the server's SETTINGS, or its refusal
    if closed:
        attack.refused_connections += 1
        return
    for path in paths:
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"127.0.0.1:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(stream, b"\x00" + struct.pack(">I", declared))
        remaining[stream] = declared if complete else declared - 1
        attack.open_streams[(index, stream)] = path
    chunk = b"\x0a" * conn.max_outbound_frame_size
    # Until every call is sent or over (incomplete ones end after --request-receive-seconds).
    while remaining and not closed:
        progress.clear()
        for stream in list(remaining):
            try:
                while (
                    size := min(conn.local_flow_control_window(stream), len(chunk), remaining[stream])
                ) > 0:
                    conn.send_data(stream, chunk[:size], end_stream=complete and size == remaining[stream])
                    remaining[stream] -= size
                    attack.sent += size
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
                pass
            if remaining.get(stream) == 0:
                del remaining[stream]
        writer.write(conn.data_to_send())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        await progress.wait()


async def attack(
    served: Served, connections: int, paths: list[str], declared: int, *, complete: bool
) -> Attack:
    """Runs the connections until every call has been sent in full or has ended (a server that
    neither reads nor ends them is given --request-receive-seconds and a margin)."""
    result = Attack()
    sending = [
        asyncio.create_task(call_and_hold(result, i, served.port, paths, declared, complete=complete))
        for i in range(connections)
    ]
    done, late = await asyncio.wait(sending, timeout=RECEIVE_SECONDS + 30)
    for task in late:
        task.cancel()
    for task in done:
        task.result()
    return result


async def ended(result: Attack) -> None:
    """Waits until the server has ended every call (bounded by --request-receive-seconds)."""
    async with asyncio.timeout(RECEIVE_SECONDS + 60):
        while result.open_streams:
            result.a_call_ended.clear()
            await result.a_call_ended.wait()


# --- the server under attack -------------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    flags = {
        "--max-message-bytes": MESSAGE_BYTES,
        "--max-incoming-requests": INCOMING_REQUESTS,
        "--max-concurrent-calls": CONCURRENT_CALLS,
        "--max-connections": CONNECTIONS,
        "--max-streams-per-connection": STREAMS_PER_CONNECTION,
        "--request-receive-seconds": RECEIVE_SECONDS,
    }
    process = subprocess.Popen(
        [TALLY, "serve", "--port", "0", "--log-level", "ERROR", "--data-dir", str(tmp_path)]
        + [str(word) for pair in flags.items() for word in pair],
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("tally listening on "), line
    yield Served(process, int(line.split()[3].rsplit(":", 1)[1]))
    process.send_signal(signal.SIGTERM)
    process.wait(30)


class PeakRss:
    """Samples a process's RSS in a thread until stopped; the thread does not need the loop."""

    def __init__(self, served: Served) -> None:
        self.peak = served.rss()
        self._served = served
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._served.rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


REPORT = "/tally.v1.UsageService/ReportUsage"
INGEST = "/tally.v1.UsageService/IngestUsage"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAUTHENTICATED = (
    str(code.value[0])
    for code in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
    )
)


@pytest.mark.slow
async def test_calls_without_a_token_cannot_grow_the_server_beyond_the_documented_bound(
    served: Served,
) -> None:
    # Warm-up: the server's first calls load code and fill caches; that growth is not the attack's.
    warm = await attack(served, 1, [REPORT, HEALTH, REFLECTION, INGEST], 64 * KIB, complete=True)
    await ended(warm)
    warm.close()
    # A declared size over the limit is refused from the message's 5-byte prefix, before its bytes.
    oversized = await attack(served, 1, [REPORT] * 4, 16 * MIB, complete=False)
    await ended(oversized)
    oversized.close()
    assert oversized.statuses[REPORT] == [RESOURCE_EXHAUSTED] * 4
    assert oversized.sent < 4 * 64 * KIB  # no more than the HTTP/2 windows
    baseline = served.rss()
    sampler = PeakRss(served)

    # 12 connections (4 over the limit), each with as many calls as the server allows (40):
    # every call declares the largest message allowed and sends all of it but the last byte.
    paths = [REPORT] * 24 + [HEALTH] * 6 + [REFLECTION] * 6 + [INGEST] * 4
    held = await attack(served, CONNECTIONS + 4, paths, MESSAGE_BYTES, complete=False)
    peak = sampler.stop()

    assert held.refused_connections >= 4  # --max-connections
    # The server read requests (it let at least the incoming requests' bytes in), yet held no
    # more than the bound: requests being received, windows of the others, per-call state.
    assert held.sent >= INCOMING_REQUESTS * (MESSAGE_BYTES - 1)
    assert peak - baseline <= BOUND + MARGIN, f"grew {(peak - baseline) / MIB:.0f} MiB"
    await ended(held)
    held.close()

    # Incomplete requests ended with DEADLINE_EXCEEDED after --request-receive-seconds (waiting
    # for a slot included); Tally's own streams were refused before any read; calls over
    # --max-concurrent-calls were refused at once.
    for path in (REPORT, HEALTH, REFLECTION):
        assert set(held.statuses[path]) <= {DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED}, path
        assert DEADLINE_EXCEEDED in held.statuses[path], path
    assert set(held.statuses[INGEST]) <= {UNAUTHENTICATED, RESOURCE_EXHAUSTED}
    assert UNAUTHENTICATED in held.statuses[INGEST]


# --- the pieces, without gRPC ------------------------------------------------------------


class FakeContext:
    """A ServicerContext whose request arrives when `arrive` is set (never, by default)."""

    def __init__(self) -> None:
        self.arrive = asyncio.Event()
        self.reading = False
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def read(self) -> object:
        self.reading = True
        await self.arrive.wait()
        return "request"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


async def test_request_that_never_arrives_ends_with_deadline_exceeded_and_frees_its_slot() -> None:
    reader = RequestReader(max_pending=1, timeout_seconds=0.05)
    stuck = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await reader.read_one(stuck)
    assert stuck.aborted == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the request message did not arrive within 0.05 s",
    )
    prompt = FakeContext()
    prompt.arrive.set()
    assert await reader.read_one(prompt) == "request"  # the slot was given back


async def test_requests_over_the_limit_are_not_read_until_a_slot_frees() -> None:
    reader = RequestReader(max_pending=1, timeout_seconds=60)
    first, second = FakeContext(), FakeContext()
    reading_first = asyncio.create_task(reader.read_one(first))
    reading_second = asyncio.create_task(reader.read_one(second))
    for _ in range(20):
        await asyncio.sleep(0)
    assert first.reading and not second.reading  # gRPC buffers nothing of it meanwhile
    first.arrive.set()
    second.arrive.set()
    assert await reading_first == "request"
    assert await reading_second == "request"
    assert second.reading


class _Server:
    def __init__(self) -> None:
        self.generic: tuple[grpc.GenericRpcHandler, ...] = ()

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.generic = handlers


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_unknown_method_names_are_not_remembered() -> None:
    async def echo(request: object, context: object) -> object:
        return request

    known = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=bytes)
    inner = grpc.method_handlers_generic_handler("x.Echo", {"Echo": known})
    server = _Server()
    BoundedRegistration(server, RequestReader(1, 1), tally=True).add_generic_rpc_handlers((inner,))  # type: ignore[arg-type]
    (generic,) = server.generic
    assert generic.service(_Details("/x.Echo/Echo")).request_streaming  # known: served, read by Tally

    # An attacker's made-up names, as long as gRPC's metadata limit lets them be.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(2_000):
        assert generic.service(_Details(f"/x.Echo/{i:08d}" + "m" * 4_000)) is None
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 256 * KIB, f"{grown} bytes kept for 8 MB of unknown names"
