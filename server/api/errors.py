"""The one place where failures become gRPC statuses.

Domain errors map to their codes, with google.rpc.BadRequest details naming each bad
field, and RetryInfo and QuotaFailure for limits; an unreachable database is UNAVAILABLE;
anything else is a bug, logged with a reference and answered INTERNAL, so nothing reaches
a client as UNKNOWN. Every failure carries the call's request id in its trailing metadata.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from server.domain.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TallyError,
    Unauthenticated,
    Unavailable,
)
from server.storage.database import CONNECTION_ERRORS

log = logging.getLogger(__name__)

_CODES: dict[type[TallyError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Aborted: grpc.StatusCode.ABORTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
REQUEST_ID_KEY = "x-request-id"


def _status(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str, list[Any]]:
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
        if isinstance(exc, ResourceExhausted):
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(max(1_000_000, int(exc.retry_after_seconds * 1e9)))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=exc.subject, description=exc.message)
                    ]
                )
            )
        return _CODES[type(exc)], exc.message, details
    if isinstance(exc, CONNECTION_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, "database unavailable, retry later", []
    reference = uuid.uuid4().hex[:12]
    log.error("internal error %s (request %s)", reference, request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (reference {reference} in the server log)", []


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str) -> NoReturn:
    code, message, details = _status(exc, request_id)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # The message is ours and never quotes the token (see server.auth.tokens).
        log.info("request %s refused: %s: %s", request_id, code.name, message)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    await context.abort(
        code,
        message,
        trailing_metadata=(
            ("grpc-status-details-bin", status.SerializeToString()),
            (REQUEST_ID_KEY, request_id),
        ),
    )
    raise AssertionError("context.abort returned")
