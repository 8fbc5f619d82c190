"""Between the client's values and the messages of PaymentService and NotificationService.

Enum values come back in lower case without their prefixes (good_standing, delivered),
as the other conversions (tally_client.convert) give them. A subscription's secret only
ever goes out: the server never returns it, so WebhookSubscription has no such field.
"""

from __future__ import annotations

from collections.abc import Sequence

from tally.v1 import notification_service_pb2, payment_service_pb2
from tally_client.convert import enum_text, from_timestamp, optional_time
from tally_client.models import (
    CollectionStatus,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookSubscription,
)
from tally_client.names import (
    COLLECTION_STATUS,
    WEBHOOK_SUBSCRIPTIONS,
    parse_invoice_name,
    parse_tenant_name,
)


def collection_status(message: payment_service_pb2.CollectionStatus) -> CollectionStatus:
    """A CollectionStatus proto, its invoices by id."""
    return CollectionStatus(
        name=message.name,
        tenant_id=parse_tenant_name(message.name.removesuffix(COLLECTION_STATUS)),
        state=enum_text(payment_service_pb2.CollectionStatus.State, message.state, "STATE_"),
        past_due_invoices=tuple(parse_invoice_name(name)[1] for name in message.past_due_invoices),
        uncollectible_invoices=tuple(parse_invoice_name(name)[1] for name in message.uncollectible_invoices),
        update_time=optional_time(message, "update_time"),
    )


def create_webhook_subscription_request(
    url: str, secret: str, event_types: Sequence[str], description: str, request_id: str
) -> notification_service_pb2.CreateWebhookSubscriptionRequest:
    """The CreateWebhookSubscription request: the one place the secret is sent."""
    if isinstance(event_types, str):  # "invoice.paid" would be sent as one type per character
        raise TypeError("event_types must be a sequence of event types, not one string")
    return notification_service_pb2.CreateWebhookSubscriptionRequest(
        webhook_subscription=notification_service_pb2.WebhookSubscription(
            url=url, secret=secret, event_types=list(event_types), description=description
        ),
        request_id=request_id,
    )


def webhook_subscription(message: notification_service_pb2.WebhookSubscription) -> WebhookSubscription:
    """A WebhookSubscription proto (which never carries its secret)."""
    return WebhookSubscription(
        name=message.name,
        subscription_id=message.name.removeprefix(WEBHOOK_SUBSCRIPTIONS),
        url=message.url,
        event_types=tuple(message.event_types),
        description=message.description,
        create_time=from_timestamp(message.create_time),
    )


def webhook_delivery(message: notification_service_pb2.WebhookDelivery) -> WebhookDelivery:
    """A WebhookDelivery proto with its attempts, oldest first."""
    return WebhookDelivery(
        name=message.name,
        event_id=message.event_id,
        event_type=message.event_type,
        state=enum_text(
            notification_service_pb2.WebhookDeliveryState, message.state, "WEBHOOK_DELIVERY_STATE_"
        ),
        attempt_count=message.attempt_count,
        attempts=tuple(
            WebhookDeliveryAttempt(from_timestamp(a.attempt_time), a.status_code, a.error)
            for a in message.attempts
        ),
        next_attempt_time=optional_time(message, "next_attempt_time"),
        create_time=from_timestamp(message.create_time),
        deliver_time=optional_time(message, "deliver_time"),
        expire_time=optional_time(message, "expire_time"),
    )
