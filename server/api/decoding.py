"""How request messages reach the handlers: bounded in memory and time, and tolerant of bad bytes.

**Bounded reads.** gRPC's Python server receives a unary request whole before any handler
runs, so before Tally has looked at the token; an unauthenticated client could hold one
message of up to `--max-message-bytes` on every stream it opens, for as long as it likes.
Every method registered through `BoundedRegistration` is therefore served as a
request-streaming method (the wire protocol is the same), and Tally reads the request
itself through a `RequestReader`: at most `max_pending` messages are being received at
once, each within `timeout_seconds` (DEADLINE_EXCEEDED after that, which frees what gRPC
buffered). gRPC only buffers a request's bytes once a read is asked for (until then the
stream's HTTP/2 window, 64 KiB, holds the client back), so before the token is checked
the server holds at most `max_pending` x `--max-message-bytes` of request messages
(docs/security.md, "Memory bound"). Tally's own client streams are not read before the
token is checked (`server.api.calls`), so their reads are not counted; health and
reflection have no token, so every one of their reads is.

**Tolerant decoding.** gRPC answers a request it cannot deserialize with INTERNAL
("Exception deserializing request"), which would look like a server bug. Tally's services
get deserializers that turn undecodable bytes into a `Malformed` value, which
`server.api.calls` refuses with INVALID_ARGUMENT after authenticating the caller. Health
and reflection keep gRPC's own decoding.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

_UNDECODABLE = (DecodeError, UnicodeDecodeError, ValueError, RecursionError)
_UNDECODABLE_REASON = "is not a valid protobuf message of the method's request type"


@dataclass(frozen=True, slots=True)
class Malformed:
    """Bytes that did not decode as the method's request message."""

    reason: str


class RequestReader:
    """Receives request messages that arrive before the caller is known, a few at a time."""

    def __init__(self, max_pending: int, timeout_seconds: float) -> None:
        self._slots = asyncio.Semaphore(max_pending)
        self.timeout_seconds = timeout_seconds

    async def read(self, context: grpc.aio.ServicerContext) -> Any:
        """The next message, or grpc.aio.EOF; waiting for a slot counts against the timeout."""
        try:
            async with asyncio.timeout(self.timeout_seconds) as timeout, self._slots:
                # A slot freed just as this call's time ran out: do not start reading.
                if (deadline := timeout.when()) is not None and deadline <= asyncio.get_running_loop().time():
                    raise TimeoutError
                return await context.read()
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request message did not arrive within {self.timeout_seconds:g} s",
            )
        except _UNDECODABLE:  # health and reflection keep gRPC's deserializers
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE_REASON)

    async def read_one(self, context: grpc.aio.ServicerContext) -> Any:
        """The request of a unary-request method."""
        message = await self.read(context)
        if message is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
        return message

    async def read_all(self, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """The messages of a client stream until its end, each read as `read` does."""
        while (message := await self.read(context)) is not grpc.aio.EOF:
            yield message


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except _UNDECODABLE:
            return Malformed(_UNDECODABLE_REASON)

    return decode


async def _responses(produced: Any) -> AsyncIterator[Any]:
    """A response-streaming behaviour's responses, whether it yields them or writes them itself."""
    if inspect.isasyncgen(produced):
        async for response in produced:
            yield response
    else:
        await produced


def _bounded(
    handler: grpc.RpcMethodHandler, reader: RequestReader, *, streams_read_after_token: bool
) -> grpc.RpcMethodHandler:
    """The handler served as request-streaming, its requests read through `reader`."""
    if not handler.request_streaming:
        if handler.response_streaming:
            unary_stream = handler.unary_stream

            async def stream_from_one(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                request = await reader.read_one(context)
                async for response in _responses(unary_stream(request, context)):
                    yield response

            return handler._replace(request_streaming=True, unary_stream=None, stream_stream=stream_from_one)
        unary_unary = handler.unary_unary

        async def unary_from_one(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await unary_unary(await reader.read_one(context), context)

        return handler._replace(request_streaming=True, unary_unary=None, stream_unary=unary_from_one)
    if streams_read_after_token:
        return handler
    if handler.response_streaming:
        stream_stream = handler.stream_stream

        async def stream_from_many(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in _responses(stream_stream(reader.read_all(context), context)):
                yield response

        return handler._replace(stream_stream=stream_from_many)
    stream_unary = handler.stream_unary

    async def unary_from_many(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await stream_unary(reader.read_all(context), context)

    return handler._replace(stream_unary=unary_from_many)


class _BoundedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Callable[[Any], Any]) -> None:
        self._inner = inner
        self._wrap = wrap
        # Only methods that exist are remembered: a miss is cheap to recompute, and caching
        # misses let any caller grow this dict with made-up method names.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            found = self._inner.service(handler_call_details)
            if found is None:
                return None
            handler = self._handlers[method] = self._wrap(found)
        return handler


class BoundedRegistration:
    """Registers a service's handlers with bounded reads, standing in for the server.

    A generated `add_XServicer_to_server` (or reflection) is given this in place of the server.

    `tally=True` is for Tally's services: tolerant deserializers, and client streams left
    to read after the token is checked. Done once at start-up rather than in an
    interceptor, which would cost every call an extra coroutine (measured at several
    percent of a unary call).
    """

    def __init__(self, server: grpc.aio.Server, reader: RequestReader, *, tally: bool) -> None:
        self._server = server
        self._reader = reader
        self._tally = tally

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if self._tally and handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        return _bounded(handler, self._reader, streams_read_after_token=self._tally)

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        """Register generic handlers with the server, each method they find given bounded reads."""
        self._server.add_generic_rpc_handlers(tuple(_BoundedGeneric(h, self._wrap) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Register a service's method handlers with the server, each given bounded reads."""
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(h) for name, h in handlers.items()}
        )
