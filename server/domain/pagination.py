"""Opaque page tokens for List methods: the last key of a page, bound to the request's filter.

A token is URL-safe base64 of JSON, a dot, and an HMAC-SHA256 of that JSON. The JSON
carries a fingerprint of the filter it was issued for, so a token reused with different
filters (or with another List method) is rejected instead of silently skipping rows. The
HMAC makes a token that Tally did not issue (forged, truncated, edited) INVALID_ARGUMENT
before any of its values is used; the key is shared by every server process on one
database (server.storage.shared_keys), so a client may send the next page to any of them.
Even a validly signed key is checked against the ranges its parts may take, so that no
value can overflow a datetime or a bigint further down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from server.domain.errors import ErrorReason, InvalidArgument
from server.domain.events import MAX_NAME_LENGTH
from server.domain.timeutil import to_micros

DEFAULT_FIELD = "page_token"
MIN_KEY_BYTES = 32
# Real tokens are well under 1 KiB; anything longer is refused before it is decoded.
MAX_TOKEN_CHARS = 2_048
# Domain separation: a MAC made for something else with the same key is never a page token.
_MAC_CONTEXT = b"tally.v1.page_token\n"
_NOT_OURS = "is not a token returned by this method"


def _invalid(description: str) -> InvalidArgument:
    return InvalidArgument.single(DEFAULT_FIELD, description, reason=ErrorReason.PAGE_TOKEN_INVALID)


class KeyPart(Protocol):
    """One element of a page's last key, and the values it may take."""

    def accepts(self, value: object) -> bool: ...


@dataclass(frozen=True, slots=True)
class IntPart:
    """An integer in [minimum, maximum]."""

    minimum: int
    maximum: int

    def accepts(self, value: object) -> bool:
        return type(value) is int and self.minimum <= value <= self.maximum


@dataclass(frozen=True, slots=True)
class TextPart:
    """A string of at most max_length characters, none of them a control character."""

    max_length: int

    def accepts(self, value: object) -> bool:
        return (
            type(value) is str
            and len(value) <= self.max_length
            and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)
        )


# An instant that datetime (years 1..9999) and PostgreSQL's timestamptz can both hold.
MICROS = IntPart(
    to_micros(datetime(1, 1, 1, tzinfo=UTC)),
    to_micros(datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
)
BIGINT_ID = IntPart(0, 2**63 - 1)  # a PostgreSQL identity column
NAME = TextPart(MAX_NAME_LENGTH)  # a service or usage type
ID = TextPart(128)  # an invoice id


def _fingerprint(filter_key: str) -> str:
    return hashlib.sha256(filter_key.encode()).hexdigest()[:16]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    # validate=True: a character outside the alphabet is an error, not silently skipped.
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


class PageTokens:
    """Issues and checks page tokens with one secret key (at least 32 bytes)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a page token key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, _MAC_CONTEXT + body, hashlib.sha256).digest()

    def encode(self, filter_key: str, last_key: Sequence[Any]) -> str:
        body = json.dumps(
            {"f": _fingerprint(filter_key), "k": list(last_key)}, separators=(",", ":")
        ).encode()
        return f"{_b64encode(body)}.{_b64encode(self._mac(body))}"

    def decode(self, token: str, filter_key: str, shape: Sequence[KeyPart]) -> list[Any] | None:
        """The last key of the previous page, or None for the first page.

        INVALID_ARGUMENT (field page_token) for a token this server did not issue, one
        issued for other filters, or one whose key does not fit `shape`.
        """
        if not token:
            return None
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise _invalid(_NOT_OURS)
        body_text, mac_text = token.split(".")
        try:
            body = _b64decode(body_text)
            mac = _b64decode(mac_text)
        except (binascii.Error, ValueError) as exc:
            raise _invalid(_NOT_OURS) from exc
        if not hmac.compare_digest(mac, self._mac(body)):
            raise _invalid(_NOT_OURS)
        try:
            decoded = json.loads(body)
            key = decoded["k"]
            fingerprint = decoded["f"]
        except (ValueError, KeyError, TypeError) as exc:
            raise _invalid(_NOT_OURS) from exc
        if fingerprint != _fingerprint(filter_key):
            raise _invalid("was issued for a request with different filters")
        if (
            not isinstance(key, list)
            or len(key) != len(shape)
            or not all(part.accepts(value) for value, part in zip(key, shape, strict=True))
        ):
            raise _invalid(_NOT_OURS)
        return key


def check_page_size(page_size: int, *, default: int, maximum: int) -> int:
    if page_size < 0:
        raise InvalidArgument.single("page_size", "must not be negative")
    if page_size == 0:
        return default
    return min(page_size, maximum)
