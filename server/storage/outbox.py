"""Queries on outbox_jobs: the transactional outbox's jobs (server.payments.outbox runs them)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class Job:
    """One kind of work on one subject, e.g. ("stripe.invoice", "inv_...").

    `step` is how far the job got (a handler's own names, "" at first); `attempts` counts the
    failed attempts of the current step (back to 0 when a step is done), for backoff.
    """

    id: int
    kind: str
    subject: str
    step: str
    state: str  # 'pending', 'done' or 'stopped'
    attempts: int
    next_attempt_time: datetime
    last_error: str | None
    payload: Mapping[str, Any]
    created_time: datetime
    updated_time: datetime


_COLUMNS = (
    "id, kind, subject, step, state, attempts, next_attempt_time, last_error, payload::text AS payload,"
    " created_time, updated_time"
)


def _job(row: asyncpg.Record) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        subject=row["subject"],
        step=row["step"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_time=row["next_attempt_time"],
        last_error=row["last_error"],
        payload=json.loads(row["payload"]),
        created_time=row["created_time"],
        updated_time=row["updated_time"],
    )


async def enqueue(
    conn: asyncpg.Connection,
    kind: str,
    subject: str,
    payload: Mapping[str, Any] | None = None,
    *,
    due: datetime,
    reopen: bool = False,
) -> bool:
    """Add a job in the caller's transaction (it commits or rolls back with the change it is for).

    Idempotent on (kind, subject): an existing job is left as it is and False returned, unless
    `reopen`, which starts a finished (done or stopped) job again from its first step with this
    payload and due time (e.g. the next try of something that recurs). A pending job is never
    reset: it may be running right now.
    """
    body = json.dumps(dict(payload or {}), sort_keys=True)
    if reopen:
        row = await conn.fetchrow(
            "INSERT INTO outbox_jobs AS j"
            " (kind, subject, payload, next_attempt_time, created_time, updated_time)"
            " VALUES ($1, $2, $3::jsonb, $4, $4, $4)"
            " ON CONFLICT (kind, subject) DO UPDATE SET state = 'pending', step = '', attempts = 0,"
            "   last_error = NULL, payload = excluded.payload,"
            "   next_attempt_time = excluded.next_attempt_time, updated_time = excluded.updated_time"
            " WHERE j.state <> 'pending' RETURNING id",
            kind,
            subject,
            body,
            due,
        )
    else:
        row = await conn.fetchrow(
            "INSERT INTO outbox_jobs (kind, subject, payload, next_attempt_time, created_time, updated_time)"
            " VALUES ($1, $2, $3::jsonb, $4, $4, $4) ON CONFLICT (kind, subject) DO NOTHING RETURNING id",
            kind,
            subject,
            body,
            due,
        )
    return row is not None


async def enqueue_many(
    conn: asyncpg.Connection, kind: str, subjects: Sequence[str], *, due: datetime
) -> None:
    """`enqueue` of one kind for many subjects, with no payload, in one statement (a period close's block)."""
    await conn.execute(
        "INSERT INTO outbox_jobs (kind, subject, payload, next_attempt_time, created_time, updated_time)"
        " SELECT $1, subject, '{}'::jsonb, $3, $3, $3 FROM unnest($2::text[]) AS subject"
        " ON CONFLICT (kind, subject) DO NOTHING",
        kind,
        list(subjects),
        due,
    )


async def get(conn: asyncpg.Connection | asyncpg.Pool, kind: str, subject: str) -> Job | None:
    """The job of `kind` on `subject`, or None."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM outbox_jobs WHERE kind = $1 AND subject = $2", kind, subject
    )
    return None if row is None else _job(row)


async def claim(conn: asyncpg.Connection, kinds: Sequence[str], now: datetime) -> Job | None:
    """The first due pending job of one of `kinds`, row locked until the transaction ends.

    SKIP LOCKED: a job another worker (of any process) holds is passed over, so no job runs
    twice at once, and workers never queue behind each other.
    """
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM outbox_jobs WHERE state = 'pending' AND next_attempt_time <= $2"
        " AND kind = ANY($1::text[]) ORDER BY next_attempt_time, id LIMIT 1 FOR UPDATE SKIP LOCKED",
        list(kinds),
        now,
    )
    return None if row is None else _job(row)


async def finish(
    conn: asyncpg.Connection, job_id: int, state: str, last_error: str | None, now: datetime
) -> None:
    """Done or stopped: the job is never claimed again (unless enqueued again with reopen)."""
    await conn.execute(
        "UPDATE outbox_jobs SET state = $2, last_error = $3, updated_time = $4 WHERE id = $1",
        job_id,
        state,
        last_error,
        now,
    )


async def advance(
    conn: asyncpg.Connection, job_id: int, step: str, payload: Mapping[str, Any] | None, now: datetime
) -> None:
    """The current step is done: record the next one, due now, with its attempts back to 0."""
    await conn.execute(
        "UPDATE outbox_jobs SET step = $2, attempts = 0, last_error = NULL, next_attempt_time = $4,"
        " updated_time = $4, payload = COALESCE($3::jsonb, payload) WHERE id = $1",
        job_id,
        step,
        None if payload is None else json.dumps(dict(payload), sort_keys=True),
        now,
    )


async def postpone(
    conn: asyncpg.Connection, job_id: int, error: str, due: datetime, now: datetime, *, count: bool = True
) -> None:
    """A failed attempt (counted unless `count` is False): try again at `due`."""
    await conn.execute(
        "UPDATE outbox_jobs SET attempts = attempts + $5::int, last_error = $2, next_attempt_time = $3,"
        " updated_time = $4 WHERE id = $1",
        job_id,
        error,
        due,
        now,
        1 if count else 0,
    )
