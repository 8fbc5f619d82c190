"""Queries on the outbound webhook tables: subscriptions, events, deliveries and their attempts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from server.domain.audit import AuditEntry
from server.domain.errors import ErrorReason, FailedPrecondition
from server.domain.requests import Once, Replayed
from server.domain.webhooks import (
    DELIVER_JOB,
    DELIVERY_WINDOW,
    EVENT_TYPES,
    MAX_SUBSCRIPTIONS,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Subscription,
    SubscriptionSpec,
    subscription_name,
    subscription_not_found,
)
from server.storage import audit, request_ids
from server.storage.database import run_with_retries
from server.storage.outbox import enqueue

# One transaction at a time counts and adds subscriptions, so the limit holds under concurrency.
_CREATE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('webhook_subscriptions', 0))"
_SUBSCRIPTION_COLUMNS = "id, url, event_types, description, create_time"
_INSERT_SUBSCRIPTION = f"""
INSERT INTO webhook_subscriptions (id, url, secret, event_types, description, create_time)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING {_SUBSCRIPTION_COLUMNS}
"""
_GET_SUBSCRIPTION = f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE id = $1"
_LIST_SUBSCRIPTIONS = f"""
SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions
WHERE ($1::timestamptz IS NULL OR (create_time, id) > ($1, $2))
ORDER BY create_time, id LIMIT $3
"""
_DELETE_SUBSCRIPTION = f"DELETE FROM webhook_subscriptions WHERE id = $1 RETURNING {_SUBSCRIPTION_COLUMNS}"

# The event is stored only if some subscription wants it. FOR KEY SHARE: a subscription being
# deleted right now is waited for and then left out, rather than failing this transaction (the
# publisher's: an invoice's finalization) on the deliveries' foreign key.
_PUBLISH = """
WITH subscribers AS (
    SELECT id FROM webhook_subscriptions WHERE $2 = ANY(event_types) FOR KEY SHARE
), event AS (
    INSERT INTO webhook_events (id, type, data, create_time)
    SELECT $1, $2, $3::jsonb, $4 WHERE EXISTS (SELECT 1 FROM subscribers)
    RETURNING id
)
INSERT INTO webhook_deliveries (subscription_id, event_id, next_attempt_time, create_time, expire_time)
SELECT s.id, e.id, $4, $4, $5 FROM subscribers s CROSS JOIN event e
RETURNING id
"""

_DELIVERY_COLUMNS = (
    "d.id, d.subscription_id, d.event_id, e.type AS event_type, d.state, d.attempt_count,"
    " d.next_attempt_time, d.create_time, d.expire_time, d.deliver_time"
)
_LIST_DELIVERIES = f"""
SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
WHERE d.subscription_id = $1 AND d.id < $2
ORDER BY d.id DESC LIMIT $3
"""
_ATTEMPTS = """
SELECT delivery_id, attempt_time, status_code, error FROM webhook_delivery_attempts
WHERE delivery_id = ANY($1::bigint[]) ORDER BY delivery_id, attempt
"""
# The delivery handler's view: everything one POST needs, the delivery row locked.
_TARGET = """
SELECT d.id, d.state, d.attempt_count, d.expire_time, s.url, s.secret,
       e.id AS event_id, e.type AS event_type, e.data::text AS data, e.create_time AS event_time
FROM webhook_deliveries d
JOIN webhook_subscriptions s ON s.id = d.subscription_id
JOIN webhook_events e ON e.id = d.event_id
WHERE d.id = $1
FOR UPDATE OF d
"""
_RECORD_ATTEMPT = """
INSERT INTO webhook_delivery_attempts (delivery_id, attempt, attempt_time, status_code, error)
VALUES ($1, $2, $3, $4, $5)
"""
_UPDATE_DELIVERY = """
UPDATE webhook_deliveries
SET state = $2, attempt_count = $3, next_attempt_time = $4, deliver_time = $5
WHERE id = $1
"""


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription(
        id=row["id"],
        url=row["url"],
        event_types=tuple(row["event_types"]),
        description=row["description"],
        create_time=row["create_time"],
    )


@dataclass(frozen=True, slots=True)
class DeliveryTarget:
    """One pending delivery, for its next attempt (with the secret, which only the sender sees)."""

    id: int
    state: DeliveryState
    attempt_count: int
    expire_time: datetime
    url: str
    secret: str
    event_id: str
    event_type: str
    event_data: str  # the event's data, JSON text
    event_time: datetime


async def insert_event(
    conn: asyncpg.Connection,
    event_id: str,
    event_type: str,
    data_json: str,
    time: datetime,
    expire_time: datetime,
) -> list[int]:
    """Store the event and a delivery per subscription of its type; the deliveries' ids."""
    rows = await conn.fetch(_PUBLISH, event_id, event_type, data_json, time, expire_time)
    return [row["id"] for row in rows]


async def has_subscribers(conn: asyncpg.Connection, event_type: str) -> bool:
    """Whether any subscription takes `event_type` (a block of events skips the work when none does)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM webhook_subscriptions WHERE $1 = ANY(event_types))", event_type
        )
    )


async def publish(
    conn: asyncpg.Connection,
    event_type: str,
    data: Mapping[str, Any],
    *,
    time: datetime | None = None,
) -> str | None:
    """Publish an event in the caller's transaction; its id, or None if nobody subscribes to its type.

    `time` is the event's time, from which its deliveries are due and retried for 3 days: pass
    the time of the change from the caller's clock (tests step fake ones); without it, the
    transaction's start time from the database.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    if time is None:
        time = await conn.fetchval("SELECT now()")
    assert time is not None
    event_id = f"evt_{uuid.uuid4().hex}"
    body = json.dumps(dict(data), sort_keys=True)
    deliveries = await insert_event(conn, event_id, event_type, body, time, time + DELIVERY_WINDOW)
    for delivery_id in deliveries:
        await enqueue(conn, DELIVER_JOB, str(delivery_id), due=time)
    return event_id if deliveries else None


async def publish_many(
    conn: asyncpg.Connection, event_type: str, datas: Sequence[Mapping[str, Any]], *, time: datetime
) -> None:
    """`publish` of many events of one type (a period close's block); one query when nobody subscribes."""
    if not datas or not await has_subscribers(conn, event_type):
        return
    for data in datas:
        await publish(conn, event_type, data, time=time)


async def lock_target(conn: asyncpg.Connection, delivery_id: int) -> DeliveryTarget | None:
    """The delivery with what its POST needs, row locked; None if it is gone (unsubscribed)."""
    row = await conn.fetchrow(_TARGET, delivery_id)
    if row is None:
        return None
    return DeliveryTarget(
        id=row["id"],
        state=DeliveryState(row["state"]),
        attempt_count=row["attempt_count"],
        expire_time=row["expire_time"],
        url=row["url"],
        secret=row["secret"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        event_data=row["data"],
        event_time=row["event_time"],
    )


async def record_attempt(
    conn: asyncpg.Connection,
    target: DeliveryTarget,
    attempt: DeliveryAttempt,
    state: DeliveryState,
    next_attempt_time: datetime | None,
) -> None:
    """Add the attempt and move the delivery to `state` (delivered at the attempt's time)."""
    number = target.attempt_count + 1
    await conn.execute(
        _RECORD_ATTEMPT, target.id, number, attempt.attempt_time, attempt.status_code, attempt.error
    )
    deliver_time = attempt.attempt_time if state is DeliveryState.DELIVERED else None
    await conn.execute(_UPDATE_DELIVERY, target.id, state.value, number, next_attempt_time, deliver_time)


class WebhookStore:
    """The subscriptions and deliveries as the API sees them (one transaction per call)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self,
        subscription_id: str,
        spec: SubscriptionSpec,
        time: datetime,
        audit_entry: Callable[[Subscription], AuditEntry],
        once: Once[Subscription] | None,
    ) -> Subscription | Replayed:
        """Store a new subscription with its audit entry and request id, in one transaction."""

        async def attempt() -> Subscription | Replayed:
            async with self._pool.acquire() as conn, conn.transaction():
                if once is not None and (stored := await request_ids.claim(conn, once.key)) is not None:
                    return Replayed(stored)
                await conn.execute(_CREATE_LOCK)
                if await conn.fetchval("SELECT count(*) FROM webhook_subscriptions") >= MAX_SUBSCRIPTIONS:
                    raise FailedPrecondition(
                        f"there are {MAX_SUBSCRIPTIONS} webhook subscriptions already, the most allowed",
                        reason=ErrorReason.WEBHOOK_SUBSCRIPTION_LIMIT,
                        metadata={"limit": str(MAX_SUBSCRIPTIONS)},
                    )
                row = await conn.fetchrow(
                    _INSERT_SUBSCRIPTION,
                    subscription_id,
                    spec.url,
                    spec.secret,
                    list(spec.event_types),
                    spec.description,
                    time,
                )
                subscription = _subscription(row)
                await audit.append(conn, audit_entry(subscription))
                if once is not None:
                    await request_ids.complete(conn, once.key, once.encode(subscription))
                return subscription

        return await run_with_retries(attempt)

    async def get(self, subscription_id: str) -> Subscription:
        """The subscription `subscription_id`; NotFound if there is none."""

        async def attempt() -> Subscription:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(_GET_SUBSCRIPTION, subscription_id)
            if row is None:
                raise subscription_not_found(subscription_name(subscription_id))
            return _subscription(row)

        return await run_with_retries(attempt)

    async def page(self, after: tuple[datetime, str] | None, limit: int) -> list[Subscription]:
        """Subscriptions after `after` (create time, id), oldest first, at most `limit`."""

        async def attempt() -> list[Subscription]:
            time, last_id = after if after is not None else (None, "")
            async with self._pool.acquire() as conn:
                return [_subscription(r) for r in await conn.fetch(_LIST_SUBSCRIPTIONS, time, last_id, limit)]

        return await run_with_retries(attempt)

    async def delete(
        self,
        subscription_id: str,
        audit_entry: Callable[[Subscription], AuditEntry],
        once: Once[None] | None,
    ) -> Replayed | None:
        """Delete the subscription and its deliveries (audited); NOT_FOUND if there is none."""

        async def attempt() -> Replayed | None:
            async with self._pool.acquire() as conn, conn.transaction():
                if once is not None and (stored := await request_ids.claim(conn, once.key)) is not None:
                    return Replayed(stored)
                row = await conn.fetchrow(_DELETE_SUBSCRIPTION, subscription_id)
                if row is None:
                    raise subscription_not_found(subscription_name(subscription_id))
                await audit.append(conn, audit_entry(_subscription(row)))
                if once is not None:
                    await request_ids.complete(conn, once.key, once.encode(None))
                return None

        return await run_with_retries(attempt)

    async def deliveries(self, subscription_id: str, before_id: int, limit: int) -> list[Delivery]:
        """The subscription's deliveries with ids below `before_id`, newest first, with their attempts.

        NOT_FOUND if the subscription does not exist (an empty page means it has none).
        """

        async def attempt() -> list[Delivery]:
            async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                if await conn.fetchrow(_GET_SUBSCRIPTION, subscription_id) is None:
                    raise subscription_not_found(subscription_name(subscription_id))
                rows = await conn.fetch(_LIST_DELIVERIES, subscription_id, before_id, limit)
                attempts: dict[int, list[DeliveryAttempt]] = {row["id"]: [] for row in rows}
                for a in await conn.fetch(_ATTEMPTS, list(attempts)):
                    attempts[a["delivery_id"]].append(
                        DeliveryAttempt(a["attempt_time"], a["status_code"], a["error"])
                    )
            return [_delivery(row, attempts[row["id"]]) for row in rows]

        return await run_with_retries(attempt)


def _delivery(row: asyncpg.Record, attempts: Sequence[DeliveryAttempt]) -> Delivery:
    return Delivery(
        id=row["id"],
        subscription_id=row["subscription_id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        state=DeliveryState(row["state"]),
        attempt_count=row["attempt_count"],
        attempts=tuple(attempts),
        next_attempt_time=row["next_attempt_time"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        deliver_time=row["deliver_time"],
    )
