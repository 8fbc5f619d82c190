"""The asyncpg connection pool and the errors that mean "the database is unavailable".

Every wait on the database is bounded, so that a database that is down, unreachable or
stuck becomes UNAVAILABLE in bounded time instead of holding calls, streams and shutdown:
opening a connection (CONNECT_TIMEOUT_SECONDS), one statement (COMMAND_TIMEOUT_SECONDS),
and one attempt of an operation under run_with_retries, from waiting for a pool
connection to its commit (ATTEMPT_TIMEOUT_SECONDS). The values are far above what a
healthy database needs (a batch of 5,000 events commits in about 0.1 s), so that a slow
or loaded machine never trips them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import asyncpg

from server.domain.errors import Aborted, ErrorReason, InvalidArgument, Unavailable

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 60.0
ATTEMPT_TIMEOUT_SECONDS = 60.0

# Errors that say the database cannot be reached right now, as opposed to a bug or bad data.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    # asyncpg's protocol state error, raised when the connection is lost in the middle of a
    # statement (seen when PostgreSQL stops while a new connection introspects types).
    # Tally never shares a connection between tasks, which is the other way to cause it.
    asyncpg.InternalClientError,
)


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"database unavailable: {type(exc).__name__}", reason=ErrorReason.DATABASE_UNAVAILABLE)


@contextlib.contextmanager
def unavailable_when_unreachable() -> Iterator[None]:
    """Turn the errors of an unreachable database into the domain's Unavailable.

    Storage raises domain errors only, so that the layers above never need to know asyncpg's
    exceptions; run_with_retries does this for the operations it runs, and this covers work
    on a connection held outside it (e.g. InvoiceStore's transactions).
    """
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise _unavailable(exc) from exc


class RetryTransaction(Exception):
    """Raised by a transactional operation that knows a retry will succeed (see storage.usage)."""


# Errors that a retry of the whole transaction resolves.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    RetryTransaction,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook that sends nothing.

    asyncpg's default resets every connection it takes back (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL): one more round trip per call, a fifth of a unary request's cost.
    Tally never leaves session state behind (no SET, LISTEN, cursors or session locks
    outside migrations, which release theirs), so there is nothing to reset.
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    custom_plans: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    command_timeout: float = COMMAND_TIMEOUT_SECONDS,
) -> asyncpg.Pool:
    """A pool whose connections work in UTC (so hour, day and month buckets are UTC buckets).

    custom_plans: plan every execution for its actual arguments. Right for the read
    pool: a summary's best plan depends on how many rollup rows the tenant and range
    hold, and the generic plan PostgreSQL settles on after five executions was measured
    twice as slow; planning costs 0.2 ms. Wrong for the write pool's batch statement,
    whose plan does not depend on its arguments.
    """
    settings = {"timezone": "UTC", "application_name": "tally"}
    if custom_plans:
        settings["plan_cache_mode"] = "force_custom_plan"
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings=settings,
        timeout=connect_timeout,
        command_timeout=command_timeout,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


async def run_with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    seconds_per_attempt: float = ATTEMPT_TIMEOUT_SECONDS,
) -> T:
    """Run a transactional operation, retrying deadlocks and serialization failures.

    Connection failures, and an attempt that takes longer than `seconds_per_attempt`
    (waiting for a pool connection included), become domain Unavailable errors, so that
    callers see UNAVAILABLE rather than an internal error or no answer at all. An attempt
    cut short is never half-written: its transaction commits or rolls back as a whole.
    """
    for attempt in range(attempts):
        try:
            async with asyncio.timeout(seconds_per_attempt):
                return await operation()
        except RETRYABLE_ERRORS as exc:
            if attempt == attempts - 1:
                raise Aborted(
                    f"concurrent update conflict, retry the call ({type(exc).__name__})",
                    reason=ErrorReason.TRANSACTION_CONFLICT,
                ) from exc
            await asyncio.sleep(0.005 * 2**attempt)
        except TimeoutError as exc:
            raise Unavailable(
                f"database unavailable: no answer within {seconds_per_attempt:g} s",
                reason=ErrorReason.DATABASE_UNAVAILABLE,
            ) from exc
        except CONNECTION_ERRORS as exc:
            raise _unavailable(exc) from exc
        except asyncpg.DataError as exc:
            # Validation should have caught it; if not, it is still bad input (e.g. a NUL
            # character in a page token), which must not look like a server fault.
            raise InvalidArgument.single("request", f"a value cannot be stored: {exc.sqlstate}") from exc
    raise AssertionError("unreachable")
