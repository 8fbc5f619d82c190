"""Requests that are not valid protobuf become INVALID_ARGUMENT, not gRPC's INTERNAL.

gRPC answers a request it cannot deserialize with INTERNAL ("Exception deserializing
request"), which would look like a server bug. This interceptor wraps each Tally
method's deserializer so that undecodable bytes arrive as a `Malformed` value, which
`server.api.calls` refuses with INVALID_ARGUMENT after authenticating the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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


class TolerantDecoding(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Applies to the methods of `services` (health and reflection keep gRPC's behaviour)."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.request_deserializer is None
            or not handler_call_details.method.startswith(self._prefixes)
        ):
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
