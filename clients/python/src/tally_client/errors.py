"""Typed exceptions for failed calls, decoded from the status's google.rpc details.

Tally answers every failure with a gRPC status whose `grpc-status-details-bin`
trailer holds a google.rpc.Status: ErrorInfo (a stable `reason` and facts in
`metadata`), and where they apply BadRequest (the fields at fault), RetryInfo
(when to retry) and QuotaFailure (which limit). `from_rpc_error` turns a failed
call into the exception class of its status code carrying all of these, so that
callers branch on types and reasons, never on message text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "tally.v1"
REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field at fault (google.rpc.BadRequest), e.g. field "event.quantity"."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One limit reached (google.rpc.QuotaFailure): its subject and what it allows."""

    subject: str
    description: str


class TallyError(Exception):
    """Base of every error this package raises.

    For a failed call: `code` is its gRPC status code, `reason` the ErrorInfo reason
    (a name of tally.v1.ErrorReason, e.g. "INVOICE_PERIOD_OVERLAP"; None for statuses
    produced by gRPC itself), `metadata` the ErrorInfo metadata, `field_violations`
    and `quota_violations` the BadRequest and QuotaFailure details, `retry_delay` the
    RetryInfo delay, and `request_id` the x-request-id that names the call in the
    server's logs and audit trail. Errors raised by the client itself have no code.
    """

    code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        quota_violations: tuple[QuotaViolation, ...] = (),
        retry_delay: timedelta | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = MappingProxyType(dict(metadata or {}))
        self.field_violations = field_violations
        self.quota_violations = quota_violations
        self.retry_delay = retry_delay
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.reason:
            parts.append(f"reason={self.reason}")
        parts.extend(f"{v.field}: {v.description}" for v in self.field_violations)
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        return "; ".join(parts)


class CallCancelledError(TallyError):
    """The call was cancelled, by the caller or because its connection went away."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(TallyError):
    """A failure without a known status; without Tally's ErrorInfo it is a lost connection, retried."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(TallyError):
    """A field breaks a rule; `field_violations` names each one. Resending unchanged fails again."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(TallyError):
    """The call's deadline passed, or the server closed a stream that sent nothing for too long."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(TallyError):
    """The named resource does not exist, or belongs to a tenant the token does not cover."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TallyError):
    """A resource with the id the caller chose exists already (a meter, a plan)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TallyError):
    """The token lacks a scope or does not cover the tenant (see `reason`)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(TallyError):
    """A limit was reached; `retry_delay` says when to retry, `quota_violations` which limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimitedError(ResourceExhaustedError):
    """A rate or stream limit of Tally (reasons RATE_LIMITED, STREAM_LIMIT_REACHED)."""


class FailedPreconditionError(TallyError):
    """The request is well formed but conflicts with the stored state (see `reason`).

    For example an invoice that cannot make that move (INVOICE_STATUS_INVALID) or a change
    that reaches into a billed period (PERIOD_FINALIZED). Resending unchanged fails again.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(TallyError):
    """A concurrency conflict in the server that outlasted its own retries; safe to retry."""

    code = grpc.StatusCode.ABORTED


class OutOfRangeError(TallyError):
    """A value outside the range the server can serve.

    gRPC's own code: Tally's checks answer INVALID_ARGUMENT with the field at fault.
    """

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(TallyError):
    """The server does not have this RPC (an older server than the client)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TallyError):
    """A bug in Tally; `metadata["reference"]` points at the server's log entry."""

    code = grpc.StatusCode.INTERNAL


class UnavailableError(TallyError):
    """The server or its database cannot be reached right now; retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(TallyError):
    """Unrecoverable data loss or corruption; Tally does not return it itself."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TallyError):
    """No token, or one that cannot be verified or has expired (see `reason`)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class IngesterFullError(TallyError):
    """The ingester holds as many events as it may; the server is not keeping up."""


class IngesterClosedError(TallyError):
    """The ingester was closed, or stopped for good after an error it cannot retry."""


_BY_CODE: dict[grpc.StatusCode, type[TallyError]] = {
    cls.code: cls
    for cls in (
        CallCancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
    if cls.code is not None
}
_RATE_LIMIT_REASONS = frozenset({"RATE_LIMITED", "STREAM_LIMIT_REACHED"})


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:
        # A details trailer that contradicts the status line: trust the status line.
        return None
    return status


def _trailing(error: grpc.RpcError, key: str) -> str | None:
    for item_key, value in error.trailing_metadata() or ():
        if item_key == key and isinstance(value, str):
            return value
    return None


def from_rpc_error(error: grpc.RpcError, *, request_id: str | None = None) -> TallyError:
    """The typed exception for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`).

    `request_id` is the x-request-id the client sent, used when the server's answer
    carries none (a call that never reached it).
    """
    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    fields: dict[str, Any] = {"request_id": _trailing(error, REQUEST_ID_KEY) or request_id}
    status = _rich_status(error)
    if status is not None:
        violations: list[FieldViolation] = []
        quotas: list[QuotaViolation] = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                fields.update(reason=info.reason or None, metadata=dict(info.metadata))
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                fields["retry_delay"] = retry.retry_delay.ToTimedelta()
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                quotas.extend(QuotaViolation(v.subject, v.description) for v in quota.violations)
        fields.update(field_violations=tuple(violations), quota_violations=tuple(quotas))
    cls = _BY_CODE.get(code, UnknownError)
    if cls is ResourceExhaustedError and fields.get("reason") in _RATE_LIMIT_REASONS:
        cls = RateLimitedError
    return cls(message, **fields)
