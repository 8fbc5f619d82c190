"""The few failures that the domain reports; server.api.errors maps each to a gRPC status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, named by its path (e.g. "event.quantity")."""

    field: str
    description: str


class TallyError(Exception):
    """Base of the errors a caller is meant to see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TallyError):
    """The request is malformed; `violations` names each bad field."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class NotFound(TallyError):
    """The named resource does not exist."""


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

    def __init__(self, message: str, *, retry_after_seconds: float, subject: str, limit: str) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.subject = subject
        self.limit = limit


class DeadlineExceeded(TallyError):
    """The server gave up waiting for the client (an idle stream)."""
