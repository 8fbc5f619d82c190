"""Request ids (AIP-155): a retried change is answered with its first result, never applied twice.

A mutating call that carries a request_id runs once per (principal, method, request_id):
the use case claims the key in the transaction of its change and stores the encoded
response with it; a later call with the same key gets that response back (`Replayed`),
as long as it is the same request (same fingerprint). The encoding is the API's business,
so the use case receives it as a function and hands replayed bytes back untouched.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.domain.errors import ErrorReason, FailedPrecondition, FieldViolation

T = TypeVar("T")

MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_REQUEST_ID_LENGTH}}}")


def check_request_id(request_id: str) -> FieldViolation | None:
    """Why a non-empty request_id is not acceptable, or None."""
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        return FieldViolation(
            "request_id",
            f"must be 1 to {MAX_REQUEST_ID_LENGTH} characters of A-Z, a-z, 0-9, '.', '_', ':', '-'",
        )
    return None


def fingerprint(request: bytes) -> bytes:
    """A digest of the request as sent (serialized without its request_id)."""
    return hashlib.sha256(request).digest()


@dataclass(frozen=True, slots=True)
class RequestKey:
    """One mutating request: who sent it, to which method, under which request_id."""

    principal: str
    method: str
    request_id: str
    fingerprint: bytes

    def reused(self) -> FailedPrecondition:
        """The refusal of a request_id used before for a different request (REQUEST_ID_REUSED)."""
        return FailedPrecondition(
            f"request_id {self.request_id!r} was already used for a different {self.method} request",
            reason=ErrorReason.REQUEST_ID_REUSED,
            metadata={"requestId": self.request_id},
        )


@dataclass(frozen=True, slots=True)
class Once(Generic[T]):
    """Run a change once for `key`, storing `encode(result)` as the answer to its retries."""

    key: RequestKey
    encode: Callable[[T], bytes]


@dataclass(frozen=True, slots=True)
class Replayed:
    """The stored response of the first call with the same request_id."""

    response: bytes
