"""The signature of a webhook delivery, as Stripe signs its own: HMAC-SHA256 over "t.body".

The header `Tally-Signature: t=<unix seconds>,v1=<hex digest>` binds the body to the time it
was sent, so a receiver that also checks the timestamp against its clock (docs/notifications.md)
refuses a captured request replayed later. Several v1 values may appear (e.g. during a secret
rotation); a receiver accepts the request if any of them matches.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "Tally-Signature"
SCHEME = "v1"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The Tally-Signature header value for a body sent at `timestamp` (Unix seconds)."""
    return f"t={timestamp},{SCHEME}={signature(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, *, now: int, tolerance_seconds: int = 300) -> bool:
    """Whether `header` signs `body` with `secret` at a time within `tolerance_seconds` of `now`.

    What a receiver does; Tally uses it in its tests, and docs/notifications.md shows the same
    steps for receivers in any language. Constant-time comparison of the digests.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == SCHEME:
            candidates.append(value)
    if timestamp is None or abs(now - timestamp) > tolerance_seconds:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
