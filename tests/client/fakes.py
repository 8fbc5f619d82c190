"""Stand-ins for the ingester's collaborators: a clock the test moves, and a StreamUsage call it scripts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tally.v1 import usage_service_pb2
from tally_client import AsyncIngester


class FakeClock:
    """Time stands still until the test calls `advance`; every sleep is recorded."""

    def __init__(self) -> None:
        self._now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    def sleeping(self) -> list[float]:
        """The durations of the sleeps in progress."""
        return [f.duration for _, f in self._sleepers if not f.done()]  # type: ignore[attr-defined]

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.duration = seconds  # type: ignore[attr-defined]
        self._sleepers.append((self._now + seconds, future))
        await future

    def advance(self, seconds: float) -> None:
        self._now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self._now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._now]
        for _, future in due:
            if not future.done():
                future.set_result(None)


def rpc_error(
    code: grpc.StatusCode, message: str, *, reason: str = "", retry_delay: timedelta | None = None
) -> grpc.aio.AioRpcError:
    """A failed call as grpc.aio raises it, with ErrorInfo (and RetryInfo) details as Tally sends them."""
    details = []
    if retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(retry_delay)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if reason:
        details.append(error_details_pb2.ErrorInfo(reason=reason, domain="tally.v1"))
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        details=message,
    )


class FakeStream:
    """One StreamUsage call: records what the ingester writes; the test acknowledges or fails it."""

    def __init__(self, *, auto_ack: bool = False) -> None:
        self.written: list[usage_service_pb2.StreamUsageRequest] = []
        self.closed_by_client = False
        self.cancelled = False
        self._auto_ack = auto_ack
        self._responses: asyncio.Queue[usage_service_pb2.StreamUsageResponse | BaseException | None] = (
            asyncio.Queue()
        )

    async def write(self, request: usage_service_pb2.StreamUsageRequest) -> None:
        self.written.append(request)
        if self._auto_ack:
            self.ack(request.sequence, accepted=len(request.events))

    async def done_writing(self) -> None:
        self.closed_by_client = True
        self._responses.put_nowait(None)

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def ack(self, sequence: int, *, accepted: int = 0, duplicate: int = 0, rejected: int = 0) -> None:
        self._responses.put_nowait(
            usage_service_pb2.StreamUsageResponse(
                sequence=sequence, accepted_count=accepted, duplicate_count=duplicate, rejected_count=rejected
            )
        )

    def fail(self, error: BaseException) -> None:
        self._responses.put_nowait(error)

    async def _responses_iter(self) -> AsyncIterator[usage_service_pb2.StreamUsageResponse]:
        while True:
            item = await self._responses.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self) -> AsyncIterator[usage_service_pb2.StreamUsageResponse]:
        return self._responses_iter()


class FakeServer:
    """Opens a new FakeStream for each call of the ingester, made by `make_stream`."""

    def __init__(self, make_stream: Callable[[], FakeStream] = FakeStream) -> None:
        self.streams: list[FakeStream] = []
        self._make_stream = make_stream

    async def open_stream(self) -> FakeStream:
        stream = self._make_stream()
        self.streams.append(stream)
        return stream

    @property
    def stream(self) -> FakeStream:
        return self.streams[-1]


HANG_GUARD_SECONDS = 30.0


async def until(predicate: Callable[[], bool]) -> None:
    """Let the event loop run until `predicate` holds (the time limit only turns a hang into a failure)."""
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.001)


@asynccontextmanager
async def running(ingester: AsyncIngester) -> AsyncIterator[AsyncIngester]:
    """The ingester started, and closed at the end; aborted instead if the test fails (nothing hangs)."""
    ingester.start()
    try:
        yield ingester
    except BaseException:
        ingester.abort()
        raise
    await asyncio.wait_for(ingester.close(), 30)
