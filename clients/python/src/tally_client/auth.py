"""Bearer tokens for the client: minted from a secret file (tests, development) or fetched (production).

Tally verifies JWTs; a call carries `authorization: Bearer <token>` metadata. A
`TokenSource` gives the client the token for each call:
- `StaticToken`: one token as given (e.g. from `tally token` or TALLY_TOKEN);
- `RefreshingToken`: calls your provider (e.g. your identity provider's client)
  for a token and calls it again shortly before that token expires, so calls never
  go out with an expired token; the expiry is read from the token's `exp` claim
  unless the provider says it;
- `SecretFileTokens`: mints HS256 tokens with the secret that `tally serve` uses
  (`--jwt-secret-file`, or the development secret in its data directory), for
  tests and development only: whoever holds the secret can act for any tenant.

HS256 minting is a few lines of hmac here, so the client needs no JWT library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

ALL_TENANTS = "*"
MIN_SECRET_BYTES = 32
DEFAULT_AUDIENCE = "tally"
# Minted (and fetched) tokens are renewed when less than this is left of their life,
# so that a call in flight never carries a token that expires on the way.
DEFAULT_REFRESH_MARGIN_SECONDS = 60.0


class TokenSource(Protocol):
    """Gives the bearer token for the next call."""

    def token(self) -> str:
        """A token valid for at least the next call; may block while it fetches a new one."""
        ...

    def cached_token(self) -> str | None:
        """The token if one is at hand and fresh, without blocking; None if `token()` must fetch one."""
        ...

    def invalidate(self) -> None:
        """Forget the current token (the server said it expired); the next `token()` gets a new one."""
        ...


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(
    secret: bytes,
    *,
    tenants: Iterable[str] | str,
    scopes: Iterable[str],
    subject: str = "developer",
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = DEFAULT_AUDIENCE,
    now: Callable[[], float] = time.time,
) -> str:
    """An HS256 JWT with Tally's claims; `tenants` is a list of tenant ids or "*" for all."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    issued = int(now())
    listed: str | list[str] = ALL_TENANTS
    if tenants != ALL_TENANTS:
        listed = sorted([tenants] if isinstance(tenants, str) else tenants)
    claims: dict[str, Any] = {
        "sub": subject,
        "tenants": listed,
        "scope": " ".join(sorted(scopes)),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    return f"{header}.{payload}.{_b64(hmac.new(secret, signing_input, hashlib.sha256).digest())}"


def read_secret(path: Path) -> bytes:
    """The HS256 secret in `path`: its bytes without surrounding white space, as the server reads it."""
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the JWT secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (seconds since the epoch), read without verifying it; None if absent."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise ValueError("not a JWT: cannot read its expiry") from exc
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return float(expiry) if isinstance(expiry, int | float) else None


class StaticToken:
    """One token, used as is (it is the caller's job to replace an expired one)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the token is empty")
        self._token = token

    def token(self) -> str:
        """The token given, whether or not it has expired."""
        return self._token

    def cached_token(self) -> str | None:
        """The token given: it is always at hand."""
        return self._token

    def invalidate(self) -> None:
        """Nothing to do: a static token cannot be replaced (an expired one keeps failing)."""
        pass


class RefreshingToken:
    """Calls `provider` for a token and again `refresh_margin_seconds` before that token expires.

    The async client calls `provider` in a worker thread, so it may block. `provider`
    returns the token, or (token, expiry in seconds since the epoch) when the
    expiry is not the token's `exp` claim. It is called under a lock, so concurrent calls
    fetch one token between them. Thread-safe.
    """

    def __init__(
        self,
        provider: Callable[[], str | tuple[str, float]],
        *,
        refresh_margin_seconds: float = DEFAULT_REFRESH_MARGIN_SECONDS,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._provider = provider
        self._margin = refresh_margin_seconds
        self._now = now
        self._lock = threading.Lock()
        self._current: tuple[str, float | None] | None = None

    def cached_token(self) -> str | None:
        """The current token unless it expires within the refresh margin; never blocks."""
        current = self._current
        if current is None:
            return None
        token, expiry = current
        return token if expiry is None or self._now() < expiry - self._margin else None

    def token(self) -> str:
        """The current token, or a new one from `provider` when it is missing or about to expire."""
        token = self.cached_token()
        if token is not None:
            return token
        with self._lock:
            token = self.cached_token()
            if token is None:
                fetched = self._provider()
                token, expiry = fetched if isinstance(fetched, tuple) else (fetched, token_expiry(fetched))
                self._current = (token, expiry)
            return token

    def invalidate(self) -> None:
        """Forget the current token, so that the next `token()` calls `provider`."""
        with self._lock:
            self._current = None


class SecretFileTokens(RefreshingToken):
    """Mints short-lived HS256 tokens with the server's secret file, renewing them before they expire.

    For tests and development: production services get their tokens from an identity
    provider through `RefreshingToken`.
    """

    def __init__(
        self,
        secret_file: Path,
        *,
        tenants: Sequence[str] | str,
        scopes: Iterable[str],
        subject: str = "developer",
        ttl_seconds: int = 3600,
        issuer: str | None = None,
        audience: str | None = DEFAULT_AUDIENCE,
        refresh_margin_seconds: float = DEFAULT_REFRESH_MARGIN_SECONDS,
        now: Callable[[], float] = time.time,
    ) -> None:
        secret = read_secret(secret_file)
        chosen_scopes = tuple(scopes)

        def mint() -> str:
            return mint_token(
                secret,
                tenants=tenants,
                scopes=chosen_scopes,
                subject=subject,
                ttl_seconds=ttl_seconds,
                issuer=issuer,
                audience=audience,
                now=now,
            )

        super().__init__(mint, refresh_margin_seconds=refresh_margin_seconds, now=now)
