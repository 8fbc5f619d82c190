"""The asyncpg connection pool and the errors that mean "the database is unavailable"."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from server.domain.errors import Aborted, InvalidArgument, Unavailable

T = TypeVar("T")

# Errors that say the database cannot be reached right now, as opposed to a bug or bad data.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)
# Errors that a retry of the whole transaction resolves.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


async def create_pool(dsn: str, *, min_size: int, max_size: int) -> asyncpg.Pool:
    # Every connection works in UTC so that hour, day and month buckets are UTC buckets.
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"timezone": "UTC", "application_name": "tally"},
        command_timeout=60,
    )
    assert pool is not None
    return pool


async def run_with_retries(operation: Callable[[], Awaitable[T]], *, attempts: int = 5) -> T:
    """Run a transactional operation, retrying deadlocks and serialization failures.

    Connection failures become domain Unavailable errors, so that callers see
    UNAVAILABLE rather than an internal error.
    """
    for attempt in range(attempts):
        try:
            return await operation()
        except RETRYABLE_ERRORS as exc:
            if attempt == attempts - 1:
                raise Aborted(f"concurrent update conflict, retry the call ({type(exc).__name__})") from exc
            await asyncio.sleep(0.005 * 2**attempt)
        except CONNECTION_ERRORS as exc:
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from exc
        except asyncpg.DataError as exc:
            # Validation should have caught it; if not, it is still bad input (e.g. a NUL
            # character in a page token), which must not look like a server fault.
            raise InvalidArgument.single("request", f"a value cannot be stored: {exc.sqlstate}") from exc
    raise AssertionError("unreachable")
