"""From a call's metadata to a Principal: the `authorization: Bearer <token>` header, verified."""

from __future__ import annotations

from collections.abc import Iterable

from server.auth.limits import Limiter
from server.auth.tokens import TokenVerifier
from server.domain.access import Principal
from server.domain.errors import ErrorReason, Unauthenticated

_SCHEME = "bearer "


class Authenticator:
    """Verifies callers and holds the limits that apply to them (one per server process)."""

    def __init__(self, verifier: TokenVerifier, limiter: Limiter) -> None:
        self._verifier = verifier
        self.limiter = limiter

    def principal(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The principal of a call's bearer token; Unauthenticated if it has none, several or a bad one."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            raise Unauthenticated(
                "missing 'authorization: Bearer <token>' metadata", reason=ErrorReason.TOKEN_MISSING
            )
        if len(values) > 1:
            raise Unauthenticated(
                "more than one 'authorization' metadata value", reason=ErrorReason.TOKEN_INVALID
            )
        value = values[0]
        if not isinstance(value, str) or not value[: len(_SCHEME)].lower() == _SCHEME:
            raise Unauthenticated(
                "the 'authorization' metadata must be 'Bearer <token>'", reason=ErrorReason.TOKEN_MISSING
            )
        return self._verifier.verify(value[len(_SCHEME) :].strip())
