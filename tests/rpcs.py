"""Every Tally RPC, described once, so that security and fuzz tests can cover them all generically."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from server.domain.access import (
    BILLING_ADMIN,
    BILLING_READ,
    METERS_ADMIN,
    NOTIFICATIONS_ADMIN,
    USAGE_READ,
    USAGE_WRITE,
)
from tally.v1 import (
    billing_service_pb2,
    meter_service_pb2,
    notification_service_pb2,
    payment_service_pb2,
    resources_pb2,
    usage_service_pb2,
)
from tests.helpers import event, hour_start, ts

USAGE = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"]
BILLING = billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"]
METER = meter_service_pb2.DESCRIPTOR.services_by_name["MeterService"]
NOTIFICATION = notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"]
# A subscription that the RPC examples may create: nothing listens there (the discard port refuses
# at once), and few tests cross a spend threshold.
EXAMPLE_WEBHOOK = notification_service_pb2.WebhookSubscription(
    url="http://127.0.0.1:9/tally-example",
    secret="example-secret-0123456789",
    event_types=["threshold.crossed"],
)
PAYMENT = payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"]


@dataclass(frozen=True)
class Rpc:
    name: str  # e.g. "UsageService/ReportUsage"
    scope: str
    client_streaming: bool
    server_streaming: bool
    request_type: type[Message]
    response_type: type[Message]
    example: Callable[[str, str], Message]  # (tenant, invoice id) -> a valid request about the tenant

    @property
    def path(self) -> str:
        return f"/tally.v1.{self.name}"


def _range() -> dict[str, Any]:
    return {"start_time": ts(hour_start(-3)), "end_time": ts(hour_start(1))}


EXAMPLES: dict[str, tuple[str, Callable[[str, str], Message]]] = {
    "ReportUsage": (USAGE_WRITE, lambda t, i: usage_service_pb2.ReportUsageRequest(event=event(t))),
    "IngestUsage": (USAGE_WRITE, lambda t, i: usage_service_pb2.IngestUsageRequest(events=[event(t)])),
    "StreamUsage": (
        USAGE_WRITE,
        lambda t, i: usage_service_pb2.StreamUsageRequest(sequence=1, events=[event(t)]),
    ),
    "GetUsageSummary": (
        USAGE_READ,
        lambda t, i: usage_service_pb2.GetUsageSummaryRequest(name=f"tenants/{t}/usageSummary", **_range()),
    ),
    "StreamUsageSummaries": (
        USAGE_READ,
        lambda t, i: usage_service_pb2.StreamUsageSummariesRequest(tenant_ids=[t], **_range()),
    ),
    "ListRates": (BILLING_READ, lambda t, i: billing_service_pb2.ListRatesRequest()),
    "SetRate": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.SetRateRequest(
            service="authtest", usage_type=f"u{uuid.uuid4().hex[:12]}", unit_price="1.5"
        ),
    ),
    "GenerateInvoice": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{t}", period_start_time=ts(hour_start(-3)), period_end_time=ts(hour_start(1))
        ),
    ),
    "GetInvoice": (
        BILLING_READ,
        lambda t, i: billing_service_pb2.GetInvoiceRequest(name=f"tenants/{t}/invoices/{i}"),
    ),
    "ListInvoices": (
        BILLING_READ,
        lambda t, i: billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{t}"),
    ),
    "ListAuditEvents": (BILLING_ADMIN, lambda t, i: billing_service_pb2.ListAuditEventsRequest(tenant_id=t)),
    "CancelEvent": (
        BILLING_ADMIN,
        lambda t, i: usage_service_pb2.CancelEventRequest(tenant_id=t, event_id=f"e-{uuid.uuid4().hex}"),
    ),
    # A SUM meter stores nothing of its own: creating one in a test changes no other test's data.
    "CreateMeter": (
        METERS_ADMIN,
        lambda t, i: meter_service_pb2.CreateMeterRequest(
            meter=resources_pb2.Meter(
                meter_id=f"m-{uuid.uuid4().hex[:12]}",
                service="marketplace",
                usage_type="wpk_upload",
                aggregation=resources_pb2.METER_AGGREGATION_SUM,
            )
        ),
    ),
    "GetMeter": (
        USAGE_READ,
        lambda t, i: meter_service_pb2.GetMeterRequest(name="meters/marketplace-wpk-upload"),
    ),
    "ListMeters": (USAGE_READ, lambda t, i: meter_service_pb2.ListMetersRequest()),
    "ArchiveMeter": (
        METERS_ADMIN,
        lambda t, i: meter_service_pb2.ArchiveMeterRequest(name=f"meters/m-{uuid.uuid4().hex[:12]}"),
    ),
    "FinalizeInvoice": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.FinalizeInvoiceRequest(name=f"tenants/{t}/invoices/{i}"),
    ),
    "VoidInvoice": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.VoidInvoiceRequest(name=f"tenants/{t}/invoices/{i}"),
    ),
    "MarkInvoicePaid": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.MarkInvoicePaidRequest(name=f"tenants/{t}/invoices/{i}"),
    ),
    "MarkInvoiceUncollectible": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.MarkInvoiceUncollectibleRequest(name=f"tenants/{t}/invoices/{i}"),
    ),
    "CreateCreditNote": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.CreateCreditNoteRequest(
            invoice=f"tenants/{t}/invoices/{i}", amount="0.01", reason="test"
        ),
    ),
    "ListCreditNotes": (
        BILLING_READ,
        lambda t, i: billing_service_pb2.ListCreditNotesRequest(parent=f"tenants/{t}"),
    ),
    "CreatePlan": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.CreatePlanRequest(
            plan_id=f"p-{uuid.uuid4().hex[:12]}", display_name="Test", currency_code="USD"
        ),
    ),
    "GetPlan": (BILLING_READ, lambda t, i: billing_service_pb2.GetPlanRequest(name="plans/default")),
    "ListPlans": (BILLING_READ, lambda t, i: billing_service_pb2.ListPlansRequest()),
    "CreatePlanVersion": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.CreatePlanVersionRequest(parent="plans/default"),
    ),
    "SetBillingProfile": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.SetBillingProfileRequest(
            billing_profile=resources_pb2.BillingProfile(name=f"tenants/{t}/billingProfile", display_name=t)
        ),
    ),
    "GetBillingProfile": (
        BILLING_READ,
        lambda t, i: billing_service_pb2.GetBillingProfileRequest(name=f"tenants/{t}/billingProfile"),
    ),
    "PreviewInvoice": (
        BILLING_READ,
        lambda t, i: billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{t}"),
    ),
    "ClosePeriod": (
        BILLING_ADMIN,
        lambda t, i: billing_service_pb2.ClosePeriodRequest(parent=f"tenants/{t}"),
    ),
    "CreateWebhookSubscription": (
        NOTIFICATIONS_ADMIN,
        lambda t, i: notification_service_pb2.CreateWebhookSubscriptionRequest(
            webhook_subscription=EXAMPLE_WEBHOOK
        ),
    ),
    "GetWebhookSubscription": (
        NOTIFICATIONS_ADMIN,
        lambda t, i: notification_service_pb2.GetWebhookSubscriptionRequest(
            name=f"webhookSubscriptions/ws_{uuid.uuid4().hex}"
        ),
    ),
    "ListWebhookSubscriptions": (
        NOTIFICATIONS_ADMIN,
        lambda t, i: notification_service_pb2.ListWebhookSubscriptionsRequest(),
    ),
    "DeleteWebhookSubscription": (
        NOTIFICATIONS_ADMIN,
        lambda t, i: notification_service_pb2.DeleteWebhookSubscriptionRequest(
            name=f"webhookSubscriptions/ws_{uuid.uuid4().hex}"
        ),
    ),
    "ListWebhookDeliveries": (
        NOTIFICATIONS_ADMIN,
        lambda t, i: notification_service_pb2.ListWebhookDeliveriesRequest(
            parent=f"webhookSubscriptions/ws_{uuid.uuid4().hex}"
        ),
    ),
    "GetCollectionStatus": (
        BILLING_READ,
        lambda t, i: payment_service_pb2.GetCollectionStatusRequest(name=f"tenants/{t}/collectionStatus"),
    ),
}


def _rpcs() -> list[Rpc]:
    from google.protobuf import symbol_database

    db = symbol_database.Default()
    found = []
    for service in (USAGE, BILLING, METER, NOTIFICATION, PAYMENT):
        for method in service.methods:
            scope, example = EXAMPLES[method.name]
            found.append(
                Rpc(
                    name=f"{service.name}/{method.name}",
                    scope=scope,
                    client_streaming=method.client_streaming,
                    server_streaming=method.server_streaming,
                    request_type=db.GetSymbol(method.input_type.full_name),
                    response_type=db.GetSymbol(method.output_type.full_name),
                    example=example,
                )
            )
    return found


RPCS = _rpcs()
assert {r.name.split("/")[1] for r in RPCS} == set(EXAMPLES), "every RPC needs an example"


# grpc.aio's client reports INTERNAL ("Internal error from Core", debug string 'Failed
# "execute_batch"') instead of the server's status when the server ends a client stream (a bad
# token, a bad first message) while the client is still writing to it: grpc/grpc#36066, a
# race that a loaded machine makes likelier. The status is the client's own, never the server's.
_LOST_STATUS = 'Failed "execute_batch"'
_ATTEMPTS = 10


def lost_to_client_race(error: grpc.aio.AioRpcError) -> bool:
    return error.code() == grpc.StatusCode.INTERNAL and _LOST_STATUS in (error.debug_error_string() or "")


async def invoke(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    requests: Sequence[Message | bytes],
    *,
    token: str | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    deadline_seconds: float = 60,  # only so that a bug cannot hang; a loaded machine is slow
) -> list[Any]:
    """Call the RPC with these request messages (or raw bytes); return the responses as a list.

    A client stream whose status the grpc client lost (see above) is called again, so the
    caller sees the server's answer; every RPC here is safe to repeat (idempotent or rejected).
    """
    for attempt in range(_ATTEMPTS):
        try:
            return await _invoke_once(channel, rpc, requests, token, metadata, deadline_seconds)
        except grpc.aio.AioRpcError as error:
            if not (rpc.client_streaming and lost_to_client_race(error)) or attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _invoke_once(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    requests: Sequence[Message | bytes],
    token: str | None,
    metadata: Sequence[tuple[str, str]],
    deadline_seconds: float,
) -> list[Any]:
    raw = any(isinstance(r, bytes) for r in requests)
    serializer = None if raw else (lambda m: m.SerializeToString())
    deserializer = rpc.response_type.FromString
    call_metadata = tuple(metadata) + ((("authorization", f"Bearer {token}"),) if token is not None else ())
    kind = (
        ("stream" if rpc.client_streaming else "unary")
        + "_"
        + ("stream" if rpc.server_streaming else "unary")
    )
    callable_ = getattr(channel, kind)(
        rpc.path, request_serializer=serializer, response_deserializer=deserializer
    )
    if rpc.client_streaming:

        async def stream() -> Any:
            for request in requests:
                yield request

        call = callable_(stream(), metadata=call_metadata, timeout=deadline_seconds)
    else:
        assert len(requests) == 1
        call = callable_(requests[0], metadata=call_metadata, timeout=deadline_seconds)
    if rpc.server_streaming:
        return [response async for response in call]
    return [await call]


def rejected_causes(responses: list[Any]) -> list[int]:
    """The cause of every rejection in ingestion responses."""
    return [r.cause for response in responses for r in getattr(response, "rejections", [])]


PERMISSION_CAUSE = resources_pb2.REJECTION_CAUSE_PERMISSION_DENIED
