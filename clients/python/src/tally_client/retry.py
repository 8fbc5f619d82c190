"""When to retry a failed call, and how long to wait first.

Every Tally call is safe to retry: usage events are identified by their event_id,
and the client sends the same request_id (AIP-155) on every attempt of a change.
So the question is only whether the failure is passing: the server or its database
unreachable (UNAVAILABLE), a conflict (ABORTED), a rate or stream limit
(RESOURCE_EXHAUSTED with reason RATE_LIMITED or STREAM_LIMIT_REACHED), an expired
token (a new one is fetched), or a connection lost mid-call, which gRPC itself
reports as INTERNAL or UNKNOWN without Tally's ErrorInfo (Tally's own INTERNAL, a
bug, has reason INTERNAL_ERROR and is not retried). The wait is the server's RetryInfo delay
when it gives one, else exponential backoff with jitter.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tally_client.errors import (
    AbortedError,
    InternalError,
    RateLimitedError,
    TallyError,
    UnauthenticatedError,
    UnavailableError,
    UnknownError,
)

TOKEN_EXPIRED = "TOKEN_EXPIRED"


def is_transient(error: TallyError) -> bool:
    """True if the same call may succeed later."""
    if isinstance(error, UnauthenticatedError):
        return error.reason == TOKEN_EXPIRED
    if isinstance(error, InternalError | UnknownError):
        return error.reason is None
    return isinstance(error, UnavailableError | AbortedError | RateLimitedError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """At most `max_attempts` tries of a unary call; waits grow from `initial_backoff` to `max_backoff` s."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, error: TallyError, random: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (0 for the first)."""
        if error.retry_delay is not None:
            return max(0.0, error.retry_delay.total_seconds())
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        # Half fixed, half random: callers that failed together do not come back together.
        return ceiling * (0.5 + 0.5 * random())


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)
