"""The transactional outbox (server.payments.outbox) against the real database, on a fake clock."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from server.domain.timeutil import to_micros
from server.payments.outbox import (
    Advance,
    Backoff,
    Done,
    Halt,
    Job,
    Outbox,
    Outcome,
    Retry,
    Stop,
    enqueue,
)
from server.storage import outbox as store

START = datetime(2026, 3, 1, tzinfo=UTC)


class Clock:
    """A wall clock that only moves when the test moves it."""

    def __init__(self, at: datetime = START) -> None:
        self.at = at

    def __call__(self) -> int:
        return to_micros(self.at)

    def advance(self, delta: timedelta) -> None:
        self.at += delta


def new_kind() -> str:
    """A kind of this test's own: workers only claim the kinds they handle, so tests never meet."""
    return f"test.{uuid.uuid4().hex[:12]}"


async def add(pool: asyncpg.Pool, kind: str, subject: str, due: datetime = START, **payload: object) -> bool:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(conn, kind, subject, payload, due=due)


async def job(pool: asyncpg.Pool, kind: str, subject: str) -> Job:
    found = await store.get(pool, kind, subject)
    assert found is not None
    return found


async def test_a_job_exists_only_if_its_transaction_commits(db: asyncpg.Pool) -> None:
    kind = new_kind()
    with pytest.raises(RuntimeError):
        async with db.acquire() as conn, conn.transaction():
            await enqueue(conn, kind, "rolled-back", due=START)
            raise RuntimeError("the change failed")
    assert await store.get(db, kind, "rolled-back") is None
    assert await add(db, kind, "kept", amount="1.00")
    assert not await add(db, kind, "kept", amount="2.00")  # idempotent on (kind, subject)
    assert (await job(db, kind, "kept")).payload == {"amount": "1.00"}


async def test_steps_run_in_order_until_done_and_each_step_commits_with_its_writes(db: asyncpg.Pool) -> None:
    kind = new_kind()
    seen: list[str] = []

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        seen.append(job.step)
        await conn.execute("SELECT 1")
        return {"": Advance("second", {"n": 1}), "second": Advance("third")}.get(job.step, Done())

    await add(db, kind, "s1")
    outbox = Outbox(db, {kind: handler}, Clock())
    assert await outbox.drain() == 3
    assert seen == ["", "second", "third"]
    done = await job(db, kind, "s1")
    assert (done.state, done.step, done.payload, done.attempts) == ("done", "third", {"n": 1}, 0)
    assert await outbox.drain() == 0  # a done job is never claimed again


async def test_failed_attempts_back_off_on_the_clock_and_a_success_resets_the_count(db: asyncpg.Pool) -> None:
    kind = new_kind()
    clock = Clock()
    results: list[Outcome] = [Retry("down"), Retry("still down"), Advance("next"), Retry("again"), Done()]

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        return results.pop(0)

    await add(db, kind, "b1")
    outbox = Outbox(db, {kind: handler}, clock, backoff=Backoff(first=timedelta(seconds=10), factor=3))
    assert await outbox.drain() == 1
    failed = await job(db, kind, "b1")
    assert (failed.attempts, failed.last_error, failed.next_attempt_time) == (
        1,
        "down",
        START + timedelta(seconds=10),
    )
    clock.advance(timedelta(seconds=9))
    assert await outbox.drain() == 0  # not due yet
    clock.advance(timedelta(seconds=1))
    assert await outbox.drain() == 1
    assert (await job(db, kind, "b1")).next_attempt_time == clock.at + timedelta(seconds=30)
    clock.advance(timedelta(seconds=30))
    assert await outbox.drain() == 2  # "next" reached, then its first failure
    again = await job(db, kind, "b1")
    assert (again.step, again.attempts, again.next_attempt_time) == (
        "next",
        1,
        clock.at + timedelta(seconds=10),
    )
    clock.advance(timedelta(seconds=10))
    assert await outbox.drain() == 1
    assert (await job(db, kind, "b1")).state == "done"


async def test_retry_after_a_given_delay_wins_over_the_backoff(db: asyncpg.Pool) -> None:
    kind = new_kind()
    clock = Clock()

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        return Retry("rate limited", after=timedelta(seconds=2))

    await add(db, kind, "r1")
    await Outbox(db, {kind: handler}, clock).drain()
    assert (await job(db, kind, "r1")).next_attempt_time == START + timedelta(seconds=2)


async def test_a_handler_that_raises_is_retried_and_what_it_wrote_is_rolled_back(db: asyncpg.Pool) -> None:
    kind = new_kind()

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        await conn.execute("UPDATE outbox_jobs SET step = 'written-by-handler' WHERE id = $1", job.id)
        raise ValueError("a bug")

    await add(db, kind, "x1")
    await Outbox(db, {kind: handler}, Clock()).drain()
    failed = await job(db, kind, "x1")
    assert (failed.state, failed.step, failed.attempts) == ("pending", "", 1)
    assert failed.last_error == "ValueError: a bug"


async def test_a_handler_past_its_timeout_is_cut_off_and_retried(db: asyncpg.Pool) -> None:
    kind = new_kind()
    never = asyncio.Event()

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        await never.wait()
        return Done()

    await add(db, kind, "t1")
    outbox = Outbox(db, {kind: handler}, Clock(), handler_timeout_seconds=0.2)
    assert await outbox.drain() == 1
    timed_out = await job(db, kind, "t1")
    assert (timed_out.state, timed_out.attempts) == ("pending", 1)
    assert "ran past 0.2 s" in (timed_out.last_error or "")


async def test_stop_gives_up_on_the_job_with_its_reason(db: asyncpg.Pool) -> None:
    kind = new_kind()

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        return Stop("totals differ")

    await add(db, kind, "st1")
    outbox = Outbox(db, {kind: handler}, Clock())
    await outbox.drain()
    stopped = await job(db, kind, "st1")
    assert (stopped.state, stopped.last_error) == ("stopped", "totals differ")
    assert await outbox.drain() == 0


async def test_halt_stops_claiming_its_kinds_and_leaves_the_job_due(db: asyncpg.Pool) -> None:
    halting, sibling, other = new_kind(), new_kind(), new_kind()
    ran: list[str] = []
    key_fixed = False

    async def halt(conn: asyncpg.Connection, job: Job) -> Outcome:
        ran.append(job.kind)
        return Done() if key_fixed else Halt("bad key", frozenset({halting, sibling}))

    async def done(conn: asyncpg.Connection, job: Job) -> Outcome:
        ran.append(job.kind)
        return Done()

    for kind in (halting, sibling, other):
        await add(db, kind, "h1")
    outbox = Outbox(db, {halting: halt, sibling: done, other: done}, Clock())
    await outbox.drain()
    assert sorted(ran) == sorted([halting, other])  # the sibling kind halted before its turn
    assert outbox.halted == {halting: "bad key", sibling: "bad key"}
    left = await job(db, halting, "h1")
    assert (left.state, left.attempts, left.next_attempt_time, left.last_error) == (
        "pending",
        0,
        START,
        "bad key",
    )
    key_fixed = True
    outbox.resume()
    await outbox.drain()
    assert [(await job(db, k, "h1")).state for k in (halting, sibling)] == ["done", "done"]


async def test_two_workers_never_run_one_job_at_the_same_time(db: asyncpg.Pool) -> None:
    kind = new_kind()
    entered = asyncio.Event()
    release = asyncio.Event()
    calls: Counter[str] = Counter()

    async def slow(conn: asyncpg.Connection, job: Job) -> Outcome:
        calls[job.subject] += 1
        entered.set()
        await release.wait()
        return Done()

    await add(db, kind, "only")
    first, second = Outbox(db, {kind: slow}, Clock()), Outbox(db, {kind: slow}, Clock())
    running = asyncio.create_task(first.run_once())
    await entered.wait()
    assert not await second.run_once()  # the job is locked: passed over, not waited for
    release.set()
    assert await running
    assert not await second.run_once()
    assert calls == {"only": 1}


async def test_workers_draining_together_run_each_job_exactly_once(db: asyncpg.Pool) -> None:
    kind = new_kind()
    calls: Counter[str] = Counter()

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        calls[f"{job.subject}/{job.step}"] += 1
        await asyncio.sleep(0)  # let the other workers claim meanwhile
        return Advance("second") if job.step == "" else Done()

    subjects = [f"j{i}" for i in range(40)]
    for subject in subjects:
        await add(db, kind, subject)
    workers = [Outbox(db, {kind: handler}, Clock()) for _ in range(3)]
    await asyncio.gather(*(w.drain() for w in workers for _ in range(2)))
    assert calls == Counter({f"{s}/{step}": 1 for s in subjects for step in ("", "second")})


async def test_stop_ends_in_bounded_time_and_the_next_worker_resumes_the_cut_step(db: asyncpg.Pool) -> None:
    kind = new_kind()
    entered = asyncio.Event()
    stuck = asyncio.Event()
    steps: list[str] = []

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        steps.append(job.step)
        if job.step == "second" and not stuck.is_set():
            stuck.set()
            entered.set()
            await asyncio.Event().wait()  # never returns: a hung call
        return Advance("second") if job.step == "" else Done()

    await add(db, kind, "c1")
    outbox = Outbox(db, {kind: handler}, Clock(), poll_seconds=0.05)
    outbox.start()
    await entered.wait()
    async with asyncio.timeout(30):  # a generous margin: stop itself waits 0.1 s, then cancels
        await outbox.stop(0.1)
    cut = await job(db, kind, "c1")
    assert (cut.state, cut.step, cut.attempts) == ("pending", "second", 0)
    assert await Outbox(db, {kind: handler}, Clock()).drain() == 1
    assert steps == ["", "second", "second"]
    assert (await job(db, kind, "c1")).state == "done"


async def test_background_worker_wakes_for_a_new_job(db: asyncpg.Pool) -> None:
    kind = new_kind()
    ran = asyncio.Event()

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        ran.set()
        return Done()

    # A poll far longer than the test: only wake() can make it run.
    outbox = Outbox(db, {kind: handler}, Clock(), poll_seconds=3600)
    outbox.start()
    try:
        await asyncio.sleep(0)
        await add(db, kind, "w1")
        outbox.wake()
        async with asyncio.timeout(30):
            await ran.wait()
    finally:
        await outbox.stop(5)


async def test_reopen_starts_a_finished_job_again_but_never_a_pending_one(db: asyncpg.Pool) -> None:
    kind = new_kind()

    async def handler(conn: asyncpg.Connection, job: Job) -> Outcome:
        return Done()

    await add(db, kind, "o1", n=1)
    async with db.acquire() as conn:
        assert not await enqueue(conn, kind, "o1", {"n": 2}, due=START, reopen=True)  # still pending
    await Outbox(db, {kind: handler}, Clock()).drain()
    later = START + timedelta(days=3)
    async with db.acquire() as conn:
        assert await enqueue(conn, kind, "o1", {"n": 3}, due=later, reopen=True)
    again = await job(db, kind, "o1")
    assert (again.state, again.step, again.payload, again.next_attempt_time) == (
        "pending",
        "",
        {"n": 3},
        later,
    )
