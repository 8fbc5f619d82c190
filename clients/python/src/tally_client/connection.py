"""Where and how to reach a Tally server: address, TLS, token, deadline and retries.

Shared by the sync and async clients (and their ingesters), which differ only in the
channel they build from it. The token goes into each call's metadata rather than
into call credentials, because gRPC sends call credentials only over TLS and a
development server is plaintext.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tally_client.auth import StaticToken, TokenSource
from tally_client.errors import REQUEST_ID_KEY
from tally_client.retry import DEFAULT_RETRY, RetryPolicy

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_SECONDS = 30.0
ADDRESS_ENV = "TALLY_ADDR"
TOKEN_ENV = "TALLY_TOKEN"

Metadata = tuple[tuple[str, str], ...]


def new_request_id() -> str:
    """A request id for AIP-155 deduplication or x-request-id: 32 hex digits."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Connection:
    """How to reach the server.

    `credentials`: None for plaintext, else e.g. `grpc.ssl_channel_credentials()`.
    `token`: a bearer token or a TokenSource (None: calls carry no token).
    `timeout`: the deadline of each unary call, in seconds.
    """

    target: str = DEFAULT_TARGET
    token: TokenSource | None = None
    credentials: grpc.ChannelCredentials | None = None
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    retry: RetryPolicy = DEFAULT_RETRY
    options: Sequence[tuple[str, Any]] = ()

    @classmethod
    def create(
        cls,
        target: str | None = None,
        *,
        token: str | TokenSource | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy = DEFAULT_RETRY,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Connection:
        """A connection; `target` and `token` default to TALLY_ADDR and TALLY_TOKEN, then localhost:50051."""
        target = target or os.environ.get(ADDRESS_ENV) or DEFAULT_TARGET
        if token is None and os.environ.get(TOKEN_ENV):
            token = os.environ[TOKEN_ENV]
        source = StaticToken(token) if isinstance(token, str) else token
        return cls(target, source, credentials, timeout, retry, tuple(options))

    def metadata(self, token: str | None, request_id: str) -> Metadata:
        """The metadata of one attempt: the bearer token (if any) and the call's request id."""
        if token is None:
            return ((REQUEST_ID_KEY, request_id),)
        return (("authorization", f"Bearer {token}"), (REQUEST_ID_KEY, request_id))

    def sync_channel(self) -> grpc.Channel:
        """A new blocking channel to `target`, with TLS when `credentials` are set."""
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=list(self.options))
        return grpc.secure_channel(self.target, self.credentials, options=list(self.options))

    def aio_channel(self) -> grpc.aio.Channel:
        """A new asyncio channel to `target`, with TLS when `credentials` are set."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=list(self.options))
        return grpc.aio.secure_channel(self.target, self.credentials, options=list(self.options))
