"""The transactional outbox's worker: runs the jobs that changes wrote beside themselves.

A change that needs work done elsewhere (push an invoice to Stripe, deliver a webhook) calls
`enqueue(conn, kind, subject, payload, due=...)` inside its own transaction, so the job exists
exactly when the change committed. `Outbox` claims due jobs one at a time, each in a
transaction of its own that holds the job's row lock (`FOR UPDATE SKIP LOCKED`): any number of
workers, in any number of processes, never run one job at once, and a worker that dies (process
killed, connection lost) leaves its job to the next one, since the lock goes with the connection.

The handler for the job's kind gets the job and the claiming transaction's connection: what it
writes there commits together with the outcome it returns, so "the Stripe id is stored" and
"the job moved past that step" are one fact. A handler does one step per call and returns:
- `Done()`: the job is finished;
- `Advance(step)`: the step succeeded; the job is due again at once, at `step`;
- `Retry(error, after=None)`: the attempt failed; due again after `after`, or after the backoff
  for the job's number of failed attempts of this step;
- `Stop(reason)`: give up on the job (a person has to look); `reason` is kept in last_error;
- `Halt(reason, kinds)`: the work cannot go on at all (e.g. an API key was revoked): the job is
  left due, and this worker claims no more jobs of `kinds` until it is restarted.
A handler that raises, or runs past `handler_timeout_seconds`, counts as a failed attempt with
backoff; what it wrote is rolled back (a savepoint), the attempt is still recorded.

Times come from the injected `now_micros`, so tests step a fake clock and call `drain()`; the
background loop (`start()`/`stop()`) polls every `poll_seconds` and wakes early on `wake()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from server.domain.timeutil import to_datetime
from server.storage import outbox as store
from server.storage.database import CONNECTION_ERRORS
from server.storage.outbox import Job, enqueue

__all__ = [
    "Advance",
    "Backoff",
    "Done",
    "Halt",
    "Job",
    "JobHandler",
    "Outbox",
    "Outcome",
    "Retry",
    "Stop",
    "enqueue",
]

log = logging.getLogger(__name__)

# The longest error text kept on a job (Stripe's messages are short; a traceback is not kept).
MAX_ERROR_CHARS = 2_000


@dataclass(frozen=True, slots=True)
class Done:
    """The job is finished."""


@dataclass(frozen=True, slots=True)
class Advance:
    """The current step succeeded: go on at `step` (with `payload`, if given, replacing the job's)."""

    step: str
    payload: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """The attempt failed: try the same step again after `after` (None: the worker's backoff)."""

    error: str
    after: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """Give up: the job is stopped, with `reason` in its last_error, and never claimed again."""

    reason: str


@dataclass(frozen=True, slots=True)
class Halt:
    """Nothing of `kinds` can succeed now (bad credentials): this worker stops claiming them."""

    reason: str
    kinds: frozenset[str] = field(default_factory=frozenset)  # empty: the job's own kind


Outcome = Done | Advance | Retry | Stop | Halt
# The `outcome` label of the outbox metric, by what a step returned.
OUTCOME_NAMES: Mapping[type, str] = {
    Done: "done",
    Advance: "advanced",
    Retry: "retried",
    Stop: "stopped",
    Halt: "halted",
}
JobHandler = Callable[[asyncpg.Connection, Job], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential: `first` after the first failure, times `factor` after each next, at most `cap`."""

    first: timedelta = timedelta(seconds=5)
    factor: float = 2.0
    cap: timedelta = timedelta(hours=1)

    def delay(self, attempts: int) -> timedelta:
        """The wait after the `attempts`-th failed attempt in a row (1 for the first)."""
        seconds = self.first.total_seconds() * self.factor ** max(0, attempts - 1)
        return min(timedelta(seconds=seconds), self.cap)


class Outbox:
    """Runs due jobs with the handler of their kind; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        handlers: Mapping[str, JobHandler],
        now_micros: Callable[[], int],
        *,
        concurrency: int = 2,
        poll_seconds: float = 1.0,
        handler_timeout_seconds: float = 120.0,
        backoff: Backoff = Backoff(),
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._pool = pool
        self._handlers = dict(handlers)
        self._now_micros = now_micros
        self._concurrency = concurrency
        self._poll_seconds = poll_seconds
        self._handler_timeout = handler_timeout_seconds
        self._backoff = backoff
        # Told (kind, outcome) once each step's transaction has committed (server.telemetry).
        self._observe = observe
        self._halted: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def halted(self) -> Mapping[str, str]:
        """The kinds this worker no longer runs, with the reason (see Halt)."""
        return dict(self._halted)

    def _active_kinds(self) -> list[str]:
        return [kind for kind in self._handlers if kind not in self._halted]

    async def run_once(self) -> bool:
        """Claim one due job and run one step of it; False if no job was due."""
        kinds = self._active_kinds()
        if not kinds:
            return False
        async with self._pool.acquire() as conn, conn.transaction():
            now = to_datetime(self._now_micros())
            job = await store.claim(conn, kinds, now)
            if job is None:
                return False
            outcome = await self._call(conn, job)
            # The outcome's time: after the handler, which may have taken a while (real clock).
            await self._apply(conn, job, outcome, to_datetime(self._now_micros()))
        if self._observe is not None:
            self._observe(job.kind, OUTCOME_NAMES[type(outcome)])
        return True

    async def drain(self, *, max_steps: int = 10_000) -> int:
        """Run due jobs until none is due (or `max_steps` steps ran); the number of steps run."""
        steps = 0
        while steps < max_steps and await self.run_once():
            steps += 1
        return steps

    async def _call(self, conn: asyncpg.Connection, job: Job) -> Outcome:
        handler = self._handlers[job.kind]
        try:
            async with asyncio.timeout(self._handler_timeout), conn.transaction():  # a savepoint
                return await handler(conn, job)
        except TimeoutError:
            return Retry(f"the {job.kind} handler ran past {self._handler_timeout:g} s")
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            raise  # the claiming transaction is gone too: the job stays as it was, due
        except Exception as exc:  # a handler's bug must not stop the other jobs; it is logged
            log.exception("outbox job %s %s (step %r) failed", job.kind, job.subject, job.step)
            return Retry(f"{type(exc).__name__}: {exc}")

    async def _apply(self, conn: asyncpg.Connection, job: Job, outcome: Outcome, now: Any) -> None:
        match outcome:
            case Done():
                await store.finish(conn, job.id, "done", None, now)
            case Advance(step=step, payload=payload):
                await store.advance(conn, job.id, step, payload, now)
            case Retry(error=error, after=after):
                delay = after if after is not None else self._backoff.delay(job.attempts + 1)
                log.warning(
                    "outbox job %s %s (step %r) failed, attempt %d, again in %s: %s",
                    job.kind,
                    job.subject,
                    job.step,
                    job.attempts + 1,
                    delay,
                    error,
                )
                await store.postpone(conn, job.id, error[:MAX_ERROR_CHARS], now + delay, now)
            case Stop(reason=reason):
                log.error("outbox job %s %s stopped at step %r: %s", job.kind, job.subject, job.step, reason)
                await store.finish(conn, job.id, "stopped", reason[:MAX_ERROR_CHARS], now)
            case Halt(reason=reason, kinds=kinds):
                halted = kinds or frozenset({job.kind})
                for kind in halted:
                    self._halted.setdefault(kind, reason)
                log.error("outbox: no more %s jobs run by this worker: %s", ", ".join(sorted(halted)), reason)
                # Left due, not counted: it was not its fault. A restart takes it up again.
                await store.postpone(
                    conn, job.id, reason[:MAX_ERROR_CHARS], job.next_attempt_time, now, count=False
                )

    def resume(self, kinds: Iterable[str] | None = None) -> None:
        """Run halted kinds again (all of them with None), e.g. after the credentials were replaced."""
        for kind in list(self._halted) if kinds is None else kinds:
            self._halted.pop(kind, None)
        self.wake()

    def wake(self) -> None:
        """Look for due jobs now instead of at the next poll (e.g. just after enqueueing one)."""
        self._wake.set()

    def start(self) -> None:
        """Run `concurrency` claim loops in the background until stop()."""
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._loop(), name=f"tally-outbox-{i}") for i in range(self._concurrency)
        ]

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before looking: a wake() from here on is not lost
            try:
                if await self.run_once():
                    continue
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("outbox: database unavailable, retrying at the next poll: %s", exc)
            except Exception:  # a bug in applying an outcome: logged; the loop goes on
                log.exception("outbox: a step failed")
            waiters = [
                asyncio.create_task(self._wake.wait()),
                asyncio.create_task(self._stopping.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=self._poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def stop(self, timeout_seconds: float) -> None:
        """Stop within `timeout_seconds`: steps in progress may finish, then they are cancelled.

        A cancelled step's transaction rolls back whole: its job is left as it was, due, and is
        resumed by the next worker (whatever it did outside, e.g. at Stripe, is made safe to
        repeat by the handler's idempotency keys).
        """
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_seconds)
        for task in pending:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
