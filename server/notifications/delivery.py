"""Delivering an event to a subscriber: the signed POST, and the outbox handler that retries it.

The handler runs as the outbox job `webhook.deliver` whose subject is the delivery id: it
POSTs the event, records the attempt in the job's own transaction (so "attempted" and the
job's next due time commit together), and tells the outbox when to try again. A 2xx answer
delivers it; anything else, or no answer within the sender's timeout, is retried on the
RetrySchedule until the delivery's expire_time (3 days after the event), when it fails for
good. A crash after the POST and before the commit means the POST is made again: delivery is
at least once, and receivers deduplicate on the event id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import asyncpg

from server.domain.timeutil import to_datetime
from server.domain.webhooks import DELIVER_JOB as DELIVER_JOB  # the job kind, re-exported
from server.domain.webhooks import DeliveryAttempt, DeliveryState, RetrySchedule, event_body
from server.notifications.signing import SIGNATURE_HEADER, signature_header
from server.payments.outbox import Done, Job, Outcome, Retry, Stop
from server.storage import webhooks

log = logging.getLogger(__name__)

DEFAULT_SCHEDULE = RetrySchedule()
EVENT_ID_HEADER = "Tally-Event-Id"
EVENT_TYPE_HEADER = "Tally-Event-Type"
USER_AGENT = "Tally-Webhooks/1"
# Enough to show why a receiver refused (its error line), not enough to store a page.
MAX_ERROR_BODY_BYTES = 200


@dataclass(frozen=True, slots=True)
class PostResult:
    """What one POST got: the HTTP status (0 if no answer) and, unless 2xx, why it failed."""

    status_code: int
    error: str

    @property
    def delivered(self) -> bool:
        """Whether the receiver took it (any 2xx)."""
        return 200 <= self.status_code < 300


class WebhookSender:
    """POSTs webhook bodies with bounded waits, through one aiohttp session (close() ends it).

    `connect_seconds` bounds opening the connection (TLS included); `total_seconds` the whole
    exchange, so a receiver that accepts and never answers costs one attempt, not a stuck job.
    Redirects are not followed: the subscription's URL is the one that was agreed.
    """

    def __init__(self, *, connect_seconds: float = 5.0, total_seconds: float = 10.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=total_seconds, sock_connect=connect_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PostResult:
        """POST `body` to `url`; the answer's status, or 0 and the error when there was none."""
        if self._session is None:  # made in the running loop, on first use
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"User-Agent": USER_AGENT})
        try:
            async with self._session.post(url, data=body, headers=dict(headers), allow_redirects=False) as r:
                if 200 <= r.status < 300:
                    return PostResult(r.status, "")
                excerpt = (await r.content.read(MAX_ERROR_BODY_BYTES)).decode("utf-8", "replace")
                text = " ".join(excerpt.split())
                return PostResult(r.status, f"HTTP {r.status}" + (f": {text}" if text else ""))
        except TimeoutError:
            return PostResult(0, f"no answer within {self._timeout.total:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return PostResult(0, f"{type(exc).__name__}: {exc}"[:500])

    async def close(self) -> None:
        """Close the HTTP session (at shutdown)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class DeliveryHandler:
    """The outbox handler of `webhook.deliver` jobs; see the module docstring."""

    def __init__(
        self,
        sender: WebhookSender,
        now_micros: Callable[[], int],
        schedule: RetrySchedule = DEFAULT_SCHEDULE,
    ) -> None:
        self._sender = sender
        self._now_micros = now_micros
        self._schedule = schedule

    async def __call__(self, conn: asyncpg.Connection, job: Job) -> Outcome:
        """One attempt of the delivery `job.subject`, recorded with the job's outcome."""
        target = await webhooks.lock_target(conn, int(job.subject))
        if target is None or target.state is not DeliveryState.PENDING:
            return Done()  # unsubscribed since, or already settled by an earlier run
        now = to_datetime(self._now_micros())
        data = json.loads(target.event_data)
        body = event_body(target.event_id, target.event_type, target.event_time, data)
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: target.event_id,
            EVENT_TYPE_HEADER: target.event_type,
            SIGNATURE_HEADER: signature_header(target.secret, int(now.timestamp()), body),
        }
        result = await self._sender.post(target.url, body, headers)
        attempt = DeliveryAttempt(now, result.status_code, result.error)
        if result.delivered:
            await webhooks.record_attempt(conn, target, attempt, DeliveryState.DELIVERED, None)
            return Done()
        attempts = target.attempt_count + 1
        next_time = self._schedule.next_attempt(attempts, now, target.expire_time)
        if next_time is None:
            await webhooks.record_attempt(conn, target, attempt, DeliveryState.FAILED, None)
            return Stop(f"webhook delivery {target.id} given up after {attempts} attempts: {result.error}")
        await webhooks.record_attempt(conn, target, attempt, DeliveryState.PENDING, next_time)
        return Retry(result.error, after=next_time - now)
