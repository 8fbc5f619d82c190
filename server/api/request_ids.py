"""The API side of request ids (AIP-155): a request's key, and how its response is stored.

The fingerprint is the request serialized deterministically without its request_id, so a
retry of the same request (the same fields, in any order on the wire) matches, and one
that changes any field does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message

from server.domain.access import Caller
from server.domain.errors import InvalidArgument
from server.domain.requests import Once, Replayed, RequestKey, check_request_id, fingerprint

T = TypeVar("T")
M = TypeVar("M", bound=Message)


def once(request: Message, method: str, caller: Caller, respond: Callable[[T], Message]) -> Once[T] | None:
    """The `Once` of a request with a request_id, None without one; InvalidArgument if malformed.

    `respond` builds the method's response from the use case's result; its bytes are what
    a retry gets back.
    """
    request_id: str = getattr(request, "request_id")  # noqa: B009 (every caller's request has one)
    if not request_id:
        return None
    if violation := check_request_id(request_id):
        raise InvalidArgument([violation])
    unkeyed = type(request)()
    unkeyed.CopyFrom(request)
    unkeyed.ClearField("request_id")
    key = RequestKey(
        principal=caller.principal.subject,
        method=method,
        request_id=request_id,
        fingerprint=fingerprint(unkeyed.SerializeToString(deterministic=True)),
    )
    return Once(key, lambda result: respond(result).SerializeToString(deterministic=True))


def response(result: T | Replayed, respond: Callable[[T], M], response_type: type[M]) -> M:
    """The method's response: built from a fresh result, or parsed from a replayed one."""
    if isinstance(result, Replayed):
        return response_type.FromString(result.response)
    return respond(result)
