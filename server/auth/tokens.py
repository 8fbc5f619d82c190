"""Bearer tokens: verifying a JWT into a Principal, and minting one (for `tally token` and tests).

Claims:
- `sub`: the principal's name (required);
- `tenants`: one tenant id, a list of them, or "*" (alone, or as the only element of a list) for
  every tenant (required); a list mixing "*" with tenant ids is refused;
- `scope`: space-separated scopes (OAuth 2 style), or a list (required);
- `exp` (required), `nbf`, `iat`; `iss` and `aud` when the server is configured with them.

Every failure becomes Unauthenticated with a fixed message per kind of problem: the
token's text, and PyJWT's messages (which may quote parts of it), never reach a caller
or a log.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jwt

from server.auth.keys import HS256, VerificationKey
from server.domain.access import ALL_TENANTS, SCOPES, AllTenants, Principal
from server.domain.errors import ErrorReason, Unauthenticated
from server.domain.events import check_id

ALL_TENANTS_CLAIM = "*"
MAX_TOKEN_BYTES = 8 * 1024
MAX_TENANTS = 1_000
DEFAULT_LEEWAY_SECONDS = 30

_REASONS: dict[type[jwt.PyJWTError], ErrorReason] = {
    jwt.ExpiredSignatureError: ErrorReason.TOKEN_EXPIRED,
    jwt.ImmatureSignatureError: ErrorReason.TOKEN_NOT_YET_VALID,
}
_FAILURES: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token's audience is not accepted"),
    (jwt.InvalidIssuerError, "the token's issuer is not accepted"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim"),
    (jwt.InvalidSignatureError, "the token's signature is invalid"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
)


def _failure(exc: jwt.PyJWTError) -> Unauthenticated:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return Unauthenticated(f"the token lacks the {exc.claim!r} claim", reason=ErrorReason.TOKEN_INVALID)
    for kind, message in _FAILURES:
        if isinstance(exc, kind):
            return Unauthenticated(message, reason=_REASONS.get(kind, ErrorReason.TOKEN_INVALID))
    return Unauthenticated("the token is malformed", reason=ErrorReason.TOKEN_INVALID)


def _tenants(value: Any) -> frozenset[str] | AllTenants:
    if value == ALL_TENANTS_CLAIM or value == [ALL_TENANTS_CLAIM]:
        return ALL_TENANTS
    if isinstance(value, list) and ALL_TENANTS_CLAIM in value:
        # ["acme", "*"] is ambiguous: most likely a token meant for one tenant that an
        # issuer's template widened by mistake. Granting every tenant on a guess would turn
        # that mistake into access to everyone's data, so the token is refused.
        raise Unauthenticated(
            "the token's 'tenants' claim must be '*' alone, or tenant ids without '*'",
            reason=ErrorReason.TOKEN_INVALID,
        )
    listed = [value] if isinstance(value, str) else value
    if (
        not isinstance(listed, list)
        or not listed
        or len(listed) > MAX_TENANTS
        or not all(isinstance(t, str) and check_id(t) is None for t in listed)
    ):
        raise Unauthenticated(
            "the token's 'tenants' claim must be a tenant id, a list of them, or '*'",
            reason=ErrorReason.TOKEN_INVALID,
        )
    return frozenset(listed)


def _scopes(value: Any) -> frozenset[str]:
    listed = value.split() if isinstance(value, str) else value
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        raise Unauthenticated(
            "the token's 'scope' claim must be a space-separated string or a list",
            reason=ErrorReason.TOKEN_INVALID,
        )
    # Unknown scopes are ignored, so that one token can also carry other services' scopes.
    return frozenset(s for s in listed if s in SCOPES)


class TokenVerifier:
    """Checks signature, expiry, not-before, issuer and audience, then reads the claims."""

    def __init__(
        self,
        keys: Sequence[VerificationKey],
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
        cache_size: int = 4_096,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("at least one verification key is required")
        self._keys = tuple(keys)
        self._issuer = issuer or None
        self._audience = audience or None
        self._leeway = leeway_seconds
        # Verified tokens, most recently used last: a service sends the same token on every
        # call, and checking its signature and claims again each time cost a sixth of a
        # unary call. The key is the whole token, so a hit is the same signed text; its time
        # window is checked again on every use.
        self._verified: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()
        self._cache_size = cache_size
        self._now = now

    def _candidates(self, token: str) -> list[VerificationKey]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the token is malformed", reason=ErrorReason.TOKEN_INVALID) from None
        algorithm, key_id = header.get("alg"), header.get("kid")
        candidates = [
            k for k in self._keys if k.algorithm == algorithm and (k.key_id is None or k.key_id == key_id)
        ]
        if not candidates:
            raise Unauthenticated(
                "the token's algorithm or key id is not accepted", reason=ErrorReason.TOKEN_INVALID
            )
        return candidates

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; Unauthenticated (with the reason) for any other.

        A token verified before is taken from the cache, but its time window is checked on
        every use, within the leeway.
        """
        cached = self._verified.get(token)
        if cached is None:
            cached = self._verify(token)
            self._verified[token] = cached
        else:
            self._verified.move_to_end(token)
        principal, not_before, expires = cached
        now = self._now()
        if now >= expires + self._leeway:
            del self._verified[token]
            raise Unauthenticated("the token has expired", reason=ErrorReason.TOKEN_EXPIRED)
        if now < not_before - self._leeway:
            del self._verified[token]
            raise Unauthenticated("the token is not valid yet", reason=ErrorReason.TOKEN_NOT_YET_VALID)
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float, float]:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(
                f"the token is longer than {MAX_TOKEN_BYTES} bytes", reason=ErrorReason.TOKEN_INVALID
            )
        required = ["exp", "sub", "tenants", "scope"]
        if self._issuer:
            required.append("iss")
        if self._audience:
            required.append("aud")
        failure: Unauthenticated | None = None
        for key in self._candidates(token):
            try:
                claims = jwt.decode(
                    token,
                    key.key,  # type: ignore[arg-type]
                    algorithms=[key.algorithm],
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway,
                    options={"require": required, "verify_aud": self._audience is not None},
                )
            except jwt.InvalidSignatureError as exc:
                failure = _failure(exc)  # another key may match (key rotation)
                continue
            except jwt.PyJWTError as exc:
                raise _failure(exc) from None
            subject = claims["sub"]
            if not isinstance(subject, str) or check_id(subject) is not None:
                raise Unauthenticated(
                    "the token's 'sub' claim must be a non-empty name", reason=ErrorReason.TOKEN_INVALID
                )
            principal = Principal(subject, _tenants(claims["tenants"]), _scopes(claims["scope"]))
            return principal, float(claims.get("nbf", float("-inf"))), float(claims["exp"])
        assert failure is not None
        raise failure


def mint_token(
    secret: bytes,
    *,
    subject: str,
    tenants: Iterable[str] | AllTenants,
    scopes: Iterable[str],
    ttl_seconds: int,
    issuer: str | None = None,
    audience: str | None = None,
    now: Callable[[], float] = time.time,
) -> str:
    """An HS256 token for `tally token` and for tests."""
    issued = int(now())
    claims: dict[str, Any] = {
        "sub": subject,
        "tenants": ALL_TENANTS_CLAIM if tenants == ALL_TENANTS else sorted(tenants),
        "scope": " ".join(sorted(scopes)),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=HS256)
