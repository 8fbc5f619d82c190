"""The few failures that the domain reports; server.api.errors maps each to a gRPC status.

Each failure carries an ErrorReason, the stable machine-readable reason that reaches the
client in google.rpc.ErrorInfo (AIP-193), and optional ErrorInfo metadata. The reasons and
their meaning are listed in protos/tally/v1/error_reason.proto, the contract; a test keeps
the two lists equal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The ErrorInfo domain of every reason below.
ERROR_DOMAIN = "tally.v1"


class ErrorReason(enum.StrEnum):
    """Why a call failed, for a program: the ErrorInfo reason (see error_reason.proto)."""

    FIELD_INVALID = "FIELD_INVALID"
    REQUEST_MALFORMED = "REQUEST_MALFORMED"
    PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    INVOICE_NOT_FOUND = "INVOICE_NOT_FOUND"
    PLAN_NOT_FOUND = "PLAN_NOT_FOUND"
    BILLING_PROFILE_NOT_FOUND = "BILLING_PROFILE_NOT_FOUND"
    INVOICE_PERIOD_OVERLAP = "INVOICE_PERIOD_OVERLAP"
    USAGE_NOT_PRICED = "USAGE_NOT_PRICED"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    INVOICE_STATUS_INVALID = "INVOICE_STATUS_INVALID"
    PERIOD_FINALIZED = "PERIOD_FINALIZED"
    CREDIT_EXCEEDS_INVOICE = "CREDIT_EXCEEDS_INVOICE"
    PLAN_READ_ONLY = "PLAN_READ_ONLY"
    PLAN_EXISTS = "PLAN_EXISTS"
    METER_NOT_FOUND = "METER_NOT_FOUND"
    EVENT_NOT_FOUND = "EVENT_NOT_FOUND"
    METER_EXISTS = "METER_EXISTS"
    WEBHOOK_SUBSCRIPTION_NOT_FOUND = "WEBHOOK_SUBSCRIPTION_NOT_FOUND"
    WEBHOOK_SUBSCRIPTION_LIMIT = "WEBHOOK_SUBSCRIPTION_LIMIT"
    SCOPE_MISSING = "SCOPE_MISSING"
    TENANT_NOT_PERMITTED = "TENANT_NOT_PERMITTED"
    ALL_TENANTS_REQUIRED = "ALL_TENANTS_REQUIRED"
    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_INVALID = "TOKEN_INVALID"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
    RATE_LIMITED = "RATE_LIMITED"
    STREAM_LIMIT_REACHED = "STREAM_LIMIT_REACHED"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    TRANSACTION_CONFLICT = "TRANSACTION_CONFLICT"
    STREAM_IDLE = "STREAM_IDLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, named by its path (e.g. "event.quantity")."""

    field: str
    description: str


class TallyError(Exception):
    """Base of the errors a caller is meant to see: a message for humans, a reason for programs.

    `metadata` goes into ErrorInfo.metadata: facts a program may use (lowerCamelCase keys).
    """

    def __init__(
        self, message: str, *, reason: ErrorReason, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(TallyError):
    """The request is malformed; `violations` names each bad field (reason FIELD_INVALID unless told)."""

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        reason: ErrorReason = ErrorReason.FIELD_INVALID,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = tuple(violations)
        super().__init__(
            "; ".join(f"{v.field}: {v.description}" for v in self.violations),
            reason=reason,
            metadata=metadata,
        )

    @classmethod
    def single(
        cls,
        field: str,
        description: str,
        *,
        reason: ErrorReason = ErrorReason.FIELD_INVALID,
        metadata: Mapping[str, str] | None = None,
    ) -> InvalidArgument:
        """InvalidArgument with one violation: `field` and what is wrong with it (`description`)."""
        return cls([FieldViolation(field, description)], reason=reason, metadata=metadata)


class NotFound(TallyError):
    """The named resource does not exist."""


class AlreadyExists(TallyError):
    """A resource with the id the caller chose exists already."""


class FailedPrecondition(TallyError):
    """The request is well formed but conflicts with the stored state."""


class Unavailable(TallyError):
    """A dependency (the database) cannot be reached; retrying later may succeed."""


class Aborted(TallyError):
    """A concurrency conflict that persisted through retries; the call can be retried."""


class Unauthenticated(TallyError):
    """The call carries no valid credentials. The message never repeats the token."""


class PermissionDenied(TallyError):
    """The caller is known but may not do this (missing scope, or another tenant's data)."""


class ResourceExhausted(TallyError):
    """A limit was reached: retry after `retry_after_seconds`; `subject` names the quota."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        subject: str,
        limit: str,
        reason: ErrorReason = ErrorReason.RATE_LIMITED,
    ) -> None:
        super().__init__(message, reason=reason, metadata={"quota": limit})
        self.retry_after_seconds = retry_after_seconds
        self.subject = subject
        self.limit = limit


class DeadlineExceeded(TallyError):
    """The server gave up waiting for the client (an idle stream)."""
