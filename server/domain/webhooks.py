"""Outbound webhooks' values and rules: event types, subscriptions, deliveries and the retry schedule.

Pure: the checks of a new subscription, the names of subscriptions and deliveries, the shape
of an event's body, and when a failed delivery is tried again. Storage and HTTP live in
server.storage.webhooks and server.notifications.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from server.domain.decimals import MINOR_UNITS, format_money
from server.domain.errors import ErrorReason, FieldViolation, InvalidArgument, NotFound
from server.domain.models import Invoice
from server.domain.names import invoice_name

INVOICE_FINALIZED: Final = "invoice.finalized"
INVOICE_PAID: Final = "invoice.paid"
INVOICE_PAYMENT_FAILED: Final = "invoice.payment_failed"
INVOICE_UNCOLLECTIBLE: Final = "invoice.uncollectible"
THRESHOLD_CROSSED: Final = "threshold.crossed"
EVENT_TYPES: Final = (
    INVOICE_FINALIZED,
    INVOICE_PAID,
    INVOICE_PAYMENT_FAILED,
    INVOICE_UNCOLLECTIBLE,
    THRESHOLD_CROSSED,
)

SUBSCRIPTIONS = "webhookSubscriptions/"
DELIVERIES = "/deliveries/"
_SUBSCRIPTION_ID = re.compile(r"ws_[0-9a-f]{32}")
MAX_URL_CHARS = 2_048
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
MAX_DESCRIPTION_CHARS = 1_024
# Every subscription adds a delivery (and an outbox job) to each event of its types, written in
# the transaction of the change that publishes it: the limit bounds that work.
MAX_SUBSCRIPTIONS = 100

# Retried for up to this long after the event; the last attempt is made at its end.
DELIVERY_WINDOW = timedelta(days=3)
# The outbox job kind that delivers one event to one subscription (server.notifications.delivery).
DELIVER_JOB = "webhook.deliver"


class DeliveryState(enum.StrEnum):
    """Where a delivery stands: pending (to be attempted), delivered, or failed for good."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """What a caller asks for; the secret is kept apart from everything that is returned."""

    url: str
    secret: str
    event_types: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Subscription:
    """A stored subscription as it is shown: never with its secret."""

    id: str
    url: str
    event_types: tuple[str, ...]
    description: str
    create_time: datetime

    @property
    def name(self) -> str:
        """The resource name, `webhookSubscriptions/{id}`."""
        return subscription_name(self.id)


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One POST of a delivery and what came of it."""

    attempt_time: datetime
    status_code: int  # 0: no HTTP answer
    error: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one subscription: attempted until delivered or its window ends."""

    id: int
    subscription_id: str
    event_id: str
    event_type: str
    state: DeliveryState
    attempt_count: int
    attempts: tuple[DeliveryAttempt, ...]
    next_attempt_time: datetime | None
    create_time: datetime
    expire_time: datetime
    deliver_time: datetime | None

    @property
    def name(self) -> str:
        """The resource name, `webhookSubscriptions/{id}/deliveries/{delivery}`."""
        return f"{subscription_name(self.subscription_id)}{DELIVERIES}{self.id}"


def subscription_name(subscription_id: str) -> str:
    """The resource name of the subscription `subscription_id`."""
    return f"{SUBSCRIPTIONS}{subscription_id}"


def subscription_not_found(name: str) -> NotFound:
    """The NOT_FOUND of a subscription (or its deliveries) that does not exist."""
    return NotFound(
        f"no webhook subscription named {name[:120]!r}",
        reason=ErrorReason.WEBHOOK_SUBSCRIPTION_NOT_FOUND,
        metadata={"webhookSubscription": name[:200]},
    )


def parse_subscription_name(name: str, field: str = "name") -> str:
    """The id of "webhookSubscriptions/{webhook_subscription}".

    A well-formed name of an id Tally never issues is NOT_FOUND, as an unknown one is.
    """
    if not name.startswith(SUBSCRIPTIONS) or "/" in name[len(SUBSCRIPTIONS) :] or name == SUBSCRIPTIONS:
        raise InvalidArgument.single(
            field, "must be a resource name of the form 'webhookSubscriptions/{webhook_subscription}'"
        )
    subscription_id = name[len(SUBSCRIPTIONS) :]
    if not _SUBSCRIPTION_ID.fullmatch(subscription_id):
        raise subscription_not_found(name)
    return subscription_id


def check_spec(spec: SubscriptionSpec, prefix: str = "webhook_subscription.") -> None:
    """InvalidArgument listing every rule the subscription breaks (never quoting the secret)."""
    violations: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        violations.append(FieldViolation(prefix + field, description))

    if problem := _check_url(spec.url):
        bad("url", problem)
    if not (MIN_SECRET_CHARS <= len(spec.secret) <= MAX_SECRET_CHARS) or not all(
        " " < c <= "~" for c in spec.secret
    ):
        bad(
            "secret",
            f"must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} printable ASCII characters without spaces",
        )
    if not spec.event_types:
        bad("event_types", f"must list at least one of {', '.join(EVENT_TYPES)}")
    for i, event_type in enumerate(spec.event_types):
        if event_type not in EVENT_TYPES:
            bad(f"event_types[{i}]", f"must be one of {', '.join(EVENT_TYPES)}")
    if len(set(spec.event_types)) != len(spec.event_types):
        bad("event_types", "lists an event type twice")
    if len(spec.description) > MAX_DESCRIPTION_CHARS or not spec.description.isprintable():
        bad("description", f"must be at most {MAX_DESCRIPTION_CHARS} printable characters")
    if violations:
        raise InvalidArgument(violations)


def _check_url(url: str) -> str | None:
    if not url:
        return "is required"
    if len(url) > MAX_URL_CHARS or not url.isprintable() or " " in url:
        return f"must be at most {MAX_URL_CHARS} printable characters without spaces"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http:// or https:// URL"
    if parts.fragment:
        return "must not have a fragment"
    return None


def event_body(event_id: str, event_type: str, create_time: datetime, data: Mapping[str, Any]) -> bytes:
    """The JSON body POSTed for an event: the same bytes at every attempt."""
    return json.dumps(
        {
            "id": event_id,
            "type": event_type,
            "create_time": rfc3339(create_time),
            "data": data,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def rfc3339(value: datetime) -> str:
    """UTC, with microseconds only when there are some ("2026-11-01T00:00:00Z")."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Exponential backoff: `first` after the first failure, doubling, at most `cap` apart."""

    first: timedelta = timedelta(seconds=30)
    cap: timedelta = timedelta(hours=6)

    def next_attempt(self, attempts: int, now: datetime, expire_time: datetime) -> datetime | None:
        """When to try again after the `attempts`-th failed attempt at `now`; None: give up.

        The last attempt is made at `expire_time` (the event's time + DELIVERY_WINDOW) even when the
        backoff would pass it, so a receiver that is back within the window gets the event.
        """
        if now >= expire_time:
            return None
        delay = min(self.first * (1 << min(max(0, attempts - 1), 30)), self.cap)
        return min(now + delay, expire_time)


def invoice_data(invoice: Invoice, **extra: str) -> dict[str, str]:
    """The fields every invoice event carries (plus `extra`, e.g. a failure's reason)."""
    minor = MINOR_UNITS.get(invoice.currency, 2)
    data = {
        "invoice": invoice_name(invoice.tenant_id, invoice.id),
        "tenant_id": invoice.tenant_id,
        "number": invoice.number,
        "kind": invoice.kind.value,
        "status": invoice.status.value,
        "currency_code": invoice.currency,
        "total": format_money(invoice.total, minor),
        "period_start_time": rfc3339(invoice.period_start),
        "period_end_time": rfc3339(invoice.period_end),
    }
    data.update(extra)
    return data
