"""Requests that are not valid protobuf become INVALID_ARGUMENT, not gRPC's INTERNAL.

gRPC answers a request it cannot deserialize with INTERNAL ("Exception deserializing
request"), which would look like a server bug. Tally's services are registered through
TolerantRegistration, which wraps each method's deserializer so that undecodable bytes
arrive as a `Malformed` value, which `server.api.calls` refuses with INVALID_ARGUMENT after
authenticating the caller. Health and reflection keep gRPC's own behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class Malformed:
    """Bytes that did not decode as the method's request message."""

    reason: str


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError, ValueError, RecursionError):
            return Malformed("is not a valid protobuf message of the method's request type")

    return decode


def _tolerant_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler is None or handler.request_deserializer is None:
        return handler
    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))


class _TolerantGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in self._handlers:
            self._handlers[method] = _tolerant_handler(self._inner.service(handler_call_details))
        return self._handlers[method]


class TolerantRegistration:
    """Stands in for the server when a generated `add_XServicer_to_server` registers a
    service, and registers its handlers with tolerant deserializers.

    Done once at start-up rather than in an interceptor, which would cost every call an
    extra coroutine (measured at several percent of a unary call).
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TolerantGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _tolerant_handler(h) for name, h in handlers.items()}
        )
