"""The one place where failures become gRPC statuses.

Every status carries google.rpc.ErrorInfo with domain tally.v1 and the failure's stable
reason (AIP-193; the reasons are listed in protos/tally/v1/error_reason.proto). Domain
errors map to their codes, with google.rpc.BadRequest details naming each bad field, and
RetryInfo and QuotaFailure for limits. An unreachable database arrives as the domain's
Unavailable (storage translates asyncpg's exceptions; this layer never sees them). Anything
else is a bug, logged with a reference and answered INTERNAL, so nothing reaches a client
as UNKNOWN. Every failure carries the call's request id in its trailing metadata.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.domain.errors import (
    ERROR_DOMAIN,
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TallyError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

_CODES: dict[type[TallyError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Aborted: grpc.StatusCode.ABORTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
REQUEST_ID_KEY = "x-request-id"


def _packed(details: list[Message]) -> list[any_pb2.Any]:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return packed


def _error_info(
    reason: ErrorReason, metadata: Mapping[str, str] | None = None
) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason.value, domain=ERROR_DOMAIN, metadata=metadata or {})


def status_for(exc: BaseException, request_id: str) -> status_pb2.Status:
    """The google.rpc.Status that answers `exc`: code, message, ErrorInfo and the other details."""
    if isinstance(exc, TallyError):
        code = _CODES[type(exc)]
        details: list[Message] = []
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
        # ErrorInfo last: clients that read the first detail (BadRequest) keep working.
        details.append(_error_info(exc.reason, exc.metadata))
        message = exc.message
    else:
        reference = uuid.uuid4().hex[:12]
        log.error("internal error %s (request %s)", reference, request_id, exc_info=exc)
        code = grpc.StatusCode.INTERNAL
        message = f"internal error (reference {reference} in the server log)"
        details = [_error_info(ErrorReason.INTERNAL_ERROR, {"reference": reference})]
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=_packed(details))


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str) -> NoReturn:
    status = rpc_status.to_status(status_for(exc, request_id))
    if status.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # The message is ours and never quotes the token (see server.auth.tokens).
        log.info("request %s refused: %s: %s", request_id, status.code.name, status.details)
    await context.abort(
        status.code,
        status.details,
        trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_KEY, request_id)),
    )
    raise AssertionError("context.abort returned")
