"""Opaque page tokens for List methods: the last key of a page, bound to the request's filter.

A token is URL-safe base64 of JSON. It carries a fingerprint of the filter it was issued
for, so a token reused with different filters is rejected instead of silently skipping rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from server.domain.errors import ErrorReason, InvalidArgument

DEFAULT_FIELD = "page_token"
_REASON = ErrorReason.PAGE_TOKEN_INVALID


def _fingerprint(filter_key: str) -> str:
    return hashlib.sha256(filter_key.encode()).hexdigest()[:16]


def encode_token(filter_key: str, last_key: list[Any]) -> str:
    raw = json.dumps({"f": _fingerprint(filter_key), "k": last_key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, filter_key: str, shape: tuple[type, ...]) -> list[Any] | None:
    """The last key of the previous page, or None for the first page.

    `shape` is the type of each key element; a token of another shape is rejected.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        key = body["k"]
        fingerprint = body["f"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument.single(
            DEFAULT_FIELD, "is not a token returned by this method", reason=_REASON
        ) from exc
    if fingerprint != _fingerprint(filter_key):
        raise InvalidArgument.single(
            DEFAULT_FIELD, "was issued for a request with different filters", reason=_REASON
        )
    if (
        not isinstance(key, list)
        or len(key) != len(shape)
        or not all(type(value) is kind for value, kind in zip(key, shape, strict=True))
    ):
        raise InvalidArgument.single(DEFAULT_FIELD, "is not a token returned by this method", reason=_REASON)
    return key


def check_page_size(page_size: int, *, default: int, maximum: int) -> int:
    if page_size < 0:
        raise InvalidArgument.single("page_size", "must not be negative")
    if page_size == 0:
        return default
    return min(page_size, maximum)
