"""NotificationService: protobuf in and out around server.notifications.subscriptions, with request ids.

The secret travels only inward: subscription_message has no way to set it.
"""

from __future__ import annotations

import grpc

from server.api.calls import rpc
from server.api.convert import to_timestamp
from server.api.request_ids import once, response
from server.auth.authenticator import Authenticator
from server.domain.access import NOTIFICATIONS_ADMIN, Caller
from server.domain.errors import InvalidArgument
from server.domain.webhooks import Delivery, DeliveryState, Subscription, SubscriptionSpec
from server.notifications.subscriptions import Subscriptions
from server.telemetry.calls import CallTelemetry
from tally.v1 import notification_service_pb2 as pb
from tally.v1 import notification_service_pb2_grpc

_METHODS = pb.DESCRIPTOR.services_by_name["NotificationService"].methods_by_name
_CREATE = _METHODS["CreateWebhookSubscription"].full_name
_DELETE = _METHODS["DeleteWebhookSubscription"].full_name

_STATES = {
    DeliveryState.PENDING: pb.WEBHOOK_DELIVERY_STATE_PENDING,
    DeliveryState.DELIVERED: pb.WEBHOOK_DELIVERY_STATE_DELIVERED,
    DeliveryState.FAILED: pb.WEBHOOK_DELIVERY_STATE_FAILED,
}


def subscription_spec(message: pb.WebhookSubscription) -> SubscriptionSpec:
    """The subscription a CreateWebhookSubscription request asks for (validated by Subscriptions)."""
    return SubscriptionSpec(
        url=message.url,
        secret=message.secret,
        event_types=tuple(message.event_types),
        description=message.description,
    )


def subscription_message(subscription: Subscription) -> pb.WebhookSubscription:
    """The proto of a subscription, without its secret (never returned)."""
    return pb.WebhookSubscription(
        name=subscription.name,
        url=subscription.url,
        event_types=list(subscription.event_types),
        description=subscription.description,
        create_time=to_timestamp(subscription.create_time),
    )


def delivery_message(delivery: Delivery) -> pb.WebhookDelivery:
    """The proto of a delivery with its attempts."""
    message = pb.WebhookDelivery(
        name=delivery.name,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        state=_STATES[delivery.state],
        attempt_count=delivery.attempt_count,
        attempts=[
            pb.WebhookDeliveryAttempt(
                attempt_time=to_timestamp(a.attempt_time), status_code=a.status_code, error=a.error
            )
            for a in delivery.attempts
        ],
        create_time=to_timestamp(delivery.create_time),
        expire_time=to_timestamp(delivery.expire_time),
    )
    if delivery.state is DeliveryState.PENDING and delivery.next_attempt_time is not None:
        message.next_attempt_time.CopyFrom(to_timestamp(delivery.next_attempt_time))
    if delivery.deliver_time is not None:
        message.deliver_time.CopyFrom(to_timestamp(delivery.deliver_time))
    return message


class NotificationApi(notification_service_pb2_grpc.NotificationServiceServicer):
    """NotificationService: converts and maps errors; the use cases are server.notifications.subscriptions."""

    def __init__(
        self, subscriptions: Subscriptions, authenticator: Authenticator, telemetry: CallTelemetry
    ) -> None:
        self._subscriptions = subscriptions
        self.authenticator = authenticator
        self.telemetry = telemetry

    @rpc(NOTIFICATIONS_ADMIN)
    async def CreateWebhookSubscription(
        self,
        request: pb.CreateWebhookSubscriptionRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> pb.CreateWebhookSubscriptionResponse:
        """Create a subscription (an all-tenants principal); a retried request_id answers the first result."""

        def respond(subscription: Subscription) -> pb.CreateWebhookSubscriptionResponse:
            message = subscription_message(subscription)
            return pb.CreateWebhookSubscriptionResponse(webhook_subscription=message)

        if not request.HasField("webhook_subscription"):
            raise InvalidArgument.single("webhook_subscription", "is required")
        keyed = once(request, _CREATE, caller, respond)
        spec = subscription_spec(request.webhook_subscription)
        result = await self._subscriptions.create(spec, caller, keyed)
        return response(result, respond, pb.CreateWebhookSubscriptionResponse)

    @rpc(NOTIFICATIONS_ADMIN)
    async def GetWebhookSubscription(
        self, request: pb.GetWebhookSubscriptionRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> pb.GetWebhookSubscriptionResponse:
        """One subscription by name."""
        subscription = await self._subscriptions.get(request.name, caller.principal)
        return pb.GetWebhookSubscriptionResponse(webhook_subscription=subscription_message(subscription))

    @rpc(NOTIFICATIONS_ADMIN)
    async def ListWebhookSubscriptions(
        self, request: pb.ListWebhookSubscriptionsRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> pb.ListWebhookSubscriptionsResponse:
        """Subscriptions, oldest first, a page at a time."""
        page = await self._subscriptions.list(request.page_size, request.page_token, caller.principal)
        return pb.ListWebhookSubscriptionsResponse(
            webhook_subscriptions=[subscription_message(s) for s in page.items],
            next_page_token=page.next_page_token,
        )

    @rpc(NOTIFICATIONS_ADMIN)
    async def DeleteWebhookSubscription(
        self,
        request: pb.DeleteWebhookSubscriptionRequest,
        context: grpc.aio.ServicerContext,
        caller: Caller,
    ) -> pb.DeleteWebhookSubscriptionResponse:
        """Delete a subscription: its pending deliveries are attempted no more."""

        def respond(_: None) -> pb.DeleteWebhookSubscriptionResponse:
            return pb.DeleteWebhookSubscriptionResponse()

        keyed = once(request, _DELETE, caller, respond)
        result = await self._subscriptions.delete(request.name, caller, keyed)
        return response(result, respond, pb.DeleteWebhookSubscriptionResponse)

    @rpc(NOTIFICATIONS_ADMIN)
    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> pb.ListWebhookDeliveriesResponse:
        """A subscription's deliveries, newest first, with their attempts."""
        page = await self._subscriptions.deliveries(
            request.parent, request.page_size, request.page_token, caller.principal
        )
        return pb.ListWebhookDeliveriesResponse(
            deliveries=[delivery_message(d) for d in page.items], next_page_token=page.next_page_token
        )
