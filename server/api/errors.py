"""The one place where failures become gRPC statuses.

Domain errors map to their codes, with google.rpc.BadRequest details naming each bad
field; an unreachable database is UNAVAILABLE; anything else is a bug, logged with a
reference and answered INTERNAL, so nothing reaches a client as UNKNOWN.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from server.domain.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TallyError,
    Unavailable,
)
from server.storage.database import CONNECTION_ERRORS

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_CODES: dict[type[TallyError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Aborted: grpc.StatusCode.ABORTED,
}


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str, list[Any]]:
    if isinstance(exc, TallyError):
        details: list[Any] = []
        if isinstance(exc, InvalidArgument):
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in exc.violations
                    ]
                )
            )
        return _CODES[type(exc)], exc.message, details
    if isinstance(exc, CONNECTION_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, "database unavailable, retry later", []
    reference = uuid.uuid4().hex[:12]
    log.error("internal error %s", reference, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (reference {reference} in the server log)", []


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message, details = _status(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    await context.abort(
        code, message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )
    raise AssertionError("context.abort returned")


def rpc(method: F) -> F:
    """Wrap a servicer method (coroutine or async generator) so every failure gets a precise status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)

    return unary_wrapper  # type: ignore[return-value]
