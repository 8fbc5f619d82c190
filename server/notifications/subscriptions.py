"""The use cases behind NotificationService: subscriptions and the deliveries made to them.

Subscriptions receive every tenant's events, so every use case needs a principal for all
tenants (the API checks the notifications:admin scope). The secret goes in with a new
subscription and never comes out: the values returned have no field for it, and the audit
trail records the rest.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.domain.access import Caller, Principal
from server.domain.audit import AuditAction, AuditEntry, State
from server.domain.pagination import BIGINT_ID, MICROS, PageTokens, TextPart, check_page_size
from server.domain.requests import Once, Replayed
from server.domain.timeutil import to_datetime, to_micros
from server.domain.webhooks import (
    Delivery,
    Subscription,
    SubscriptionSpec,
    check_spec,
    parse_subscription_name,
    subscription_name,
)
from server.storage.webhooks import WebhookStore

T = TypeVar("T")
_SUBSCRIPTION_ID = TextPart(35)
_NO_DELIVERY_YET = 2**63 - 1  # above every delivery id: the first page starts from the newest


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list and the token of the next (empty at the end)."""

    items: list[T]
    next_page_token: str


def subscription_state(subscription: Subscription) -> State:
    """The audit trail's view: everything but the secret."""
    return {
        "url": subscription.url,
        "event_types": list(subscription.event_types),
        "description": subscription.description,
    }


def _require(principal: Principal, what: str) -> None:
    principal.require_all_tenants(what)


class Subscriptions:
    """NotificationService's use cases: subscriptions and their deliveries, for all-tenants principals."""

    def __init__(self, store: WebhookStore, page_tokens: PageTokens, now_micros: Callable[[], int]) -> None:
        self._store = store
        self._page_tokens = page_tokens
        self._now_micros = now_micros

    async def create(
        self, spec: SubscriptionSpec, caller: Caller, once: Once[Subscription] | None
    ) -> Subscription | Replayed:
        """Store a new subscription, audited; a replayed request_id answers the first result."""
        _require(caller.principal, "subscribing to webhooks")
        check_spec(spec)

        def entry(subscription: Subscription) -> AuditEntry:
            return AuditEntry(
                caller.principal.subject,
                caller.request_id,
                AuditAction.WEBHOOK_SUBSCRIPTION_CREATED,
                "",
                subscription.name,
                None,
                subscription_state(subscription),
            )

        return await self._store.create(
            f"ws_{uuid.uuid4().hex}", spec, to_datetime(self._now_micros()), entry, once
        )

    async def get(self, name: str, principal: Principal) -> Subscription:
        """The subscription named `name`; NotFound if there is none."""
        _require(principal, "reading webhook subscriptions")
        return await self._store.get(parse_subscription_name(name))

    async def list(self, page_size: int, page_token: str, principal: Principal) -> Page[Subscription]:
        """A page of subscriptions, oldest first."""
        _require(principal, "reading webhook subscriptions")
        limit = check_page_size(page_size, default=50, maximum=500)
        last = self._page_tokens.decode(page_token, "webhook_subscriptions", (MICROS, _SUBSCRIPTION_ID))
        after = (to_datetime(last[0]), last[1]) if last else None
        found = await self._store.page(after, limit + 1)
        next_token = ""
        if len(found) > limit:
            found = found[:limit]
            next_token = self._page_tokens.encode(
                "webhook_subscriptions", [to_micros(found[-1].create_time), found[-1].id]
            )
        return Page(found, next_token)

    async def delete(self, name: str, caller: Caller, once: Once[None] | None) -> Replayed | None:
        """Delete the subscription named `name`, audited; its pending deliveries end."""
        _require(caller.principal, "deleting a webhook subscription")
        subscription_id = parse_subscription_name(name)

        def entry(subscription: Subscription) -> AuditEntry:
            return AuditEntry(
                caller.principal.subject,
                caller.request_id,
                AuditAction.WEBHOOK_SUBSCRIPTION_DELETED,
                "",
                subscription.name,
                subscription_state(subscription),
                None,
            )

        return await self._store.delete(subscription_id, entry, once)

    async def deliveries(
        self, parent: str, page_size: int, page_token: str, principal: Principal
    ) -> Page[Delivery]:
        """A page of the deliveries of the subscription `parent`, newest first."""
        _require(principal, "reading webhook deliveries")
        subscription_id = parse_subscription_name(parent, "parent")
        limit = check_page_size(page_size, default=50, maximum=500)
        filter_key = f"webhook_deliveries:{subscription_name(subscription_id)}"
        last = self._page_tokens.decode(page_token, filter_key, (BIGINT_ID,))
        before = last[0] if last else _NO_DELIVERY_YET
        found = await self._store.deliveries(subscription_id, before, limit + 1)
        next_token = ""
        if len(found) > limit:
            found = found[:limit]
            next_token = self._page_tokens.encode(filter_key, [found[-1].id])
        return Page(found, next_token)
