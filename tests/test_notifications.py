"""Outbound webhooks: subscriptions by RPC, events published with the change, signed at-least-once delivery.

Deliveries run against a real aiohttp receiver started by each test. The retry tests drive
their own outbox worker on a fake clock over a database of their own (created in the test
cluster), so the session server's worker and the other tests' events never meet theirs; the
end-to-end tests go through the session server, draining its worker themselves, on real time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from aiohttp import web

from server.domain.audit import AuditAction, AuditEntry
from server.domain.timeutil import to_micros
from server.domain.webhooks import RetrySchedule, SubscriptionSpec
from server.notifications.delivery import DELIVER_JOB, DeliveryHandler, WebhookSender
from server.notifications.events import (
    INVOICE_FINALIZED,
    INVOICE_PAID,
    INVOICE_UNCOLLECTIBLE,
    THRESHOLD_CROSSED,
    publish,
)
from server.notifications.signing import signature, verify
from server.payments.outbox import Outbox
from server.storage.webhooks import WebhookStore
from tally.v1 import billing_service_pb2, notification_service_pb2_grpc, usage_service_pb2
from tally.v1 import notification_service_pb2 as pb
from tests.billing_helpers import far_anchor_day, set_profile, uploads
from tests.helpers import error_info, event, field_violations, hour_start, own_database, ts

SECRET = "whsec-test-0123456789abcdef"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # the fake clock's start


# ---------------------------------------------------------------------------------------------
# A receiver: records every request, answers with the scripted statuses (then 200).


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


@dataclass
class Receiver:
    url: str
    statuses: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver(url="")

    async def handle(request: web.Request) -> web.Response:
        found.requests.append(Received(request.path, dict(request.headers), await request.read()))
        found.arrived.set()
        status = found.statuses.pop(0) if found.statuses else 200
        return web.Response(status=status, text="ok" if status < 300 else "receiver says no")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


# ---------------------------------------------------------------------------------------------
# A database of the module's own, and an outbox worker on a fake clock.


@pytest_asyncio.fixture(scope="module")
async def own_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with own_database(database_url, "notify") as pool:
        yield pool


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> int:
        return to_micros(self.now)

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Worker:
    pool: asyncpg.Pool
    clock: FakeClock
    outbox: Outbox

    async def subscribe(self, url: str, *event_types: str) -> str:
        subscription_id = f"ws_{uuid.uuid4().hex}"

        def entry(subscription: Any) -> AuditEntry:
            return AuditEntry(
                "test", "test", AuditAction.WEBHOOK_SUBSCRIPTION_CREATED, "", subscription.name, None, {}
            )

        await WebhookStore(self.pool).create(
            subscription_id, SubscriptionSpec(url, SECRET, event_types), self.clock.now, entry, None
        )
        return subscription_id

    async def publish(self, event_type: str, data: dict[str, str]) -> str | None:
        async with self.pool.acquire() as conn, conn.transaction():
            return await publish(conn, event_type, data, time=self.clock.now)

    async def delivery(self, subscription_id: str) -> asyncpg.Record:
        [row] = await self.pool.fetch(
            "SELECT * FROM webhook_deliveries WHERE subscription_id = $1", subscription_id
        )
        return row

    async def attempts(self, delivery_id: int) -> list[tuple[datetime, int]]:
        rows = await self.pool.fetch(
            "SELECT attempt_time, status_code FROM webhook_delivery_attempts WHERE delivery_id = $1"
            " ORDER BY attempt",
            delivery_id,
        )
        return [(r["attempt_time"], r["status_code"]) for r in rows]


@pytest_asyncio.fixture
async def worker(own_pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    # Each test starts from no subscriptions and no pending job: its drain() runs its own only.
    await own_pool.execute("TRUNCATE webhook_subscriptions, webhook_events, outbox_jobs CASCADE")
    clock = FakeClock(T0)
    sender = WebhookSender(connect_seconds=10, total_seconds=30)
    outbox = Outbox(own_pool, {DELIVER_JOB: DeliveryHandler(sender, clock)}, clock)
    yield Worker(own_pool, clock, outbox)
    await sender.close()


# ---------------------------------------------------------------------------------------------
# Signing and the schedule (pure).


def test_signature_is_hmac_sha256_of_timestamp_dot_body_and_verifies_only_unchanged() -> None:
    body = b'{"id":"evt_1"}'
    header = f"t=1700000000,v1={signature(SECRET, 1700000000, body)}"
    expected = hmac.new(SECRET.encode(), b'1700000000.{"id":"evt_1"}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(SECRET, header, body, now=1700000100)
    assert not verify(SECRET, header, body + b" ", now=1700000100)  # body changed
    assert not verify("another-secret-0123456789", header, body, now=1700000100)
    assert not verify(SECRET, header, body, now=1700000000 + 301)  # replayed too late
    assert not verify(SECRET, header.replace("t=1700000000", "t=1700000001"), body, now=1700000000)


def test_retry_schedule_doubles_to_six_hours_and_ends_on_the_third_day() -> None:
    schedule = RetrySchedule()
    expire = T0 + timedelta(days=3)
    now, attempts, delays = T0, 0, []
    while (nxt := schedule.next_attempt(attempts + 1, now, expire)) is not None:
        attempts += 1
        delays.append(nxt - now)
        now = nxt
    assert delays[:4] == [timedelta(seconds=s) for s in (30, 60, 120, 240)]
    assert max(delays) == timedelta(hours=6)
    assert now == expire  # the last attempt is made at the end of the window, then no more
    assert attempts + 1 == 22  # 22 attempts in all over the 3 days


# ---------------------------------------------------------------------------------------------
# Delivery through the outbox, on a fake clock.


async def test_event_is_delivered_signed_with_its_id_and_type(worker: Worker, receiver: Receiver) -> None:
    subscription = await worker.subscribe(f"{receiver.url}/hooks", INVOICE_FINALIZED)
    data = {"invoice": "tenants/acme/invoices/inv_1", "total": "12.50", "currency_code": "USD"}
    event_id = await worker.publish(INVOICE_FINALIZED, data)
    assert event_id is not None

    await worker.outbox.drain()

    [received] = receiver.requests
    assert received.path == "/hooks"
    assert received.headers["Tally-Event-Id"] == event_id
    assert received.headers["Tally-Event-Type"] == INVOICE_FINALIZED
    assert received.headers["Content-Type"] == "application/json"
    sent_at = int(worker.clock.now.timestamp())
    assert received.headers["Tally-Signature"].startswith(f"t={sent_at},v1=")
    assert verify(SECRET, received.headers["Tally-Signature"], received.body, now=sent_at)
    assert not verify(
        "not-the-secret-0123456789", received.headers["Tally-Signature"], received.body, now=sent_at
    )
    assert received.event == {
        "id": event_id,
        "type": INVOICE_FINALIZED,
        "create_time": "2026-11-02T09:00:00Z",
        "data": data,
    }
    delivery = await worker.delivery(subscription)
    assert (delivery["state"], delivery["attempt_count"], delivery["deliver_time"]) == ("delivered", 1, T0)
    assert await worker.attempts(delivery["id"]) == [(T0, 200)]
    job = await worker.pool.fetchrow(
        "SELECT state FROM outbox_jobs WHERE kind = $1 AND subject = $2", DELIVER_JOB, str(delivery["id"])
    )
    assert job["state"] == "done"


async def test_receiver_error_is_retried_after_backoff_and_the_event_delivered_once_more(
    worker: Worker, receiver: Receiver
) -> None:
    subscription = await worker.subscribe(receiver.url, INVOICE_PAID)
    receiver.statuses = [500]  # then 200
    event_id = await worker.publish(INVOICE_PAID, {"invoice": "tenants/acme/invoices/inv_2"})

    await worker.outbox.drain()
    delivery = await worker.delivery(subscription)
    assert (delivery["state"], delivery["attempt_count"]) == ("pending", 1)
    assert delivery["next_attempt_time"] == T0 + timedelta(seconds=30)
    assert len(receiver.requests) == 1

    worker.clock.advance(timedelta(seconds=29))
    await worker.outbox.drain()
    assert len(receiver.requests) == 1  # not due yet

    worker.clock.advance(timedelta(seconds=1))
    await worker.outbox.drain()
    first, second = receiver.requests
    assert first.body == second.body and first.headers["Tally-Event-Id"] == second.headers["Tally-Event-Id"]
    assert second.headers["Tally-Event-Id"] == event_id
    retry_at = int((T0 + timedelta(seconds=30)).timestamp())
    assert verify(SECRET, second.headers["Tally-Signature"], second.body, now=retry_at)
    delivery = await worker.delivery(subscription)
    assert (delivery["state"], delivery["attempt_count"], delivery["next_attempt_time"]) == (
        "delivered",
        2,
        None,
    )
    assert await worker.attempts(delivery["id"]) == [(T0, 500), (T0 + timedelta(seconds=30), 200)]

    worker.clock.advance(timedelta(days=5))
    await worker.outbox.drain()
    assert len(receiver.requests) == 2  # delivered: never sent again


async def test_delivery_gives_up_three_days_after_the_event(worker: Worker, receiver: Receiver) -> None:
    subscription = await worker.subscribe(receiver.url, THRESHOLD_CROSSED)
    receiver.statuses = [503] * 1_000
    await worker.publish(THRESHOLD_CROSSED, {"tenant_id": "acme"})

    for _ in range(100):  # bounded: the schedule makes 22 attempts
        await worker.outbox.drain()
        delivery = await worker.delivery(subscription)
        if delivery["state"] != "pending":
            break
        worker.clock.now = delivery["next_attempt_time"]
    assert delivery["state"] == "failed"
    attempts = await worker.attempts(delivery["id"])
    assert len(attempts) == delivery["attempt_count"] == len(receiver.requests) == 22
    assert attempts[0][0] == T0 and attempts[-1][0] == T0 + timedelta(days=3)
    assert {status for _, status in attempts} == {503}
    job = await worker.pool.fetchrow(
        "SELECT state, last_error FROM outbox_jobs WHERE kind = $1 AND subject = $2",
        DELIVER_JOB,
        str(delivery["id"]),
    )
    assert job["state"] == "stopped" and "HTTP 503" in job["last_error"]

    worker.clock.advance(timedelta(days=30))
    await worker.outbox.drain()
    assert len(receiver.requests) == 22  # given up: no more attempts


async def test_receiver_that_is_down_counts_as_a_failed_attempt(worker: Worker, receiver: Receiver) -> None:
    # A port with nothing listening: connection refused, no HTTP status.
    closed = socket_with_nothing_listening()
    subscription = await worker.subscribe(f"http://127.0.0.1:{closed}/x", INVOICE_PAID)
    await worker.publish(INVOICE_PAID, {"invoice": "tenants/acme/invoices/inv_3"})
    await worker.outbox.drain()
    delivery = await worker.delivery(subscription)
    assert (delivery["state"], delivery["attempt_count"]) == ("pending", 1)
    [(_, status)] = await worker.attempts(delivery["id"])
    assert status == 0


def socket_with_nothing_listening() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: connecting is refused


async def test_only_subscribed_event_types_are_delivered(worker: Worker, receiver: Receiver) -> None:
    await worker.subscribe(f"{receiver.url}/invoices", INVOICE_FINALIZED, INVOICE_PAID)
    await worker.subscribe(f"{receiver.url}/thresholds", THRESHOLD_CROSSED)
    paid = await worker.publish(INVOICE_PAID, {"invoice": "tenants/acme/invoices/inv_4"})
    crossed = await worker.publish(THRESHOLD_CROSSED, {"tenant_id": "acme"})
    assert await worker.publish(INVOICE_UNCOLLECTIBLE, {"invoice": "tenants/acme/invoices/inv_4"}) is None

    await worker.outbox.drain()

    assert [r.headers["Tally-Event-Id"] for r in receiver.at("/invoices")] == [paid]
    assert [r.headers["Tally-Event-Id"] for r in receiver.at("/thresholds")] == [crossed]
    assert len(receiver.requests) == 2
    # Nobody wanted the uncollectible event: nothing of it is stored.
    assert await worker.pool.fetchval("SELECT count(*) FROM webhook_events") == 2


async def test_deleted_subscription_gets_no_more_attempts(worker: Worker, receiver: Receiver) -> None:
    subscription = await worker.subscribe(receiver.url, INVOICE_PAID)
    receiver.statuses = [500]
    await worker.publish(INVOICE_PAID, {"invoice": "tenants/acme/invoices/inv_5"})
    await worker.outbox.drain()
    await worker.pool.execute("DELETE FROM webhook_subscriptions WHERE id = $1", subscription)

    worker.clock.advance(timedelta(hours=1))
    await worker.outbox.drain()
    assert len(receiver.requests) == 1
    assert await worker.pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
    assert await worker.pool.fetchval("SELECT count(*) FROM outbox_jobs WHERE state = 'pending'") == 0


# ---------------------------------------------------------------------------------------------
# NotificationService, through the session server.


@pytest.fixture
def notifications(channel: grpc.aio.Channel) -> notification_service_pb2_grpc.NotificationServiceStub:
    return notification_service_pb2_grpc.NotificationServiceStub(channel)


@pytest_asyncio.fixture
async def cleanup(db: asyncpg.Pool) -> AsyncIterator[list[str]]:
    """Names of subscriptions to delete after the test, so the session's later events skip them."""
    names: list[str] = []
    yield names
    ids = [name.removeprefix("webhookSubscriptions/") for name in names]
    await db.execute("DELETE FROM webhook_subscriptions WHERE id = ANY($1)", ids)


def new_subscription(url: str, *event_types: str, secret: str = SECRET) -> pb.WebhookSubscription:
    return pb.WebhookSubscription(url=url, secret=secret, event_types=event_types, description="test")


async def test_secret_is_never_returned_by_create_get_or_list(
    notifications: Any, db: asyncpg.Pool, cleanup: list[str]
) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    created = (
        await notifications.CreateWebhookSubscription(
            pb.CreateWebhookSubscriptionRequest(
                webhook_subscription=new_subscription("https://hooks.example/t", INVOICE_PAID, secret=secret)
            )
        )
    ).webhook_subscription
    cleanup.append(created.name)
    assert created.name.startswith("webhookSubscriptions/ws_")
    assert (created.url, list(created.event_types), created.secret) == (
        "https://hooks.example/t",
        [INVOICE_PAID],
        "",
    )
    got = (
        await notifications.GetWebhookSubscription(pb.GetWebhookSubscriptionRequest(name=created.name))
    ).webhook_subscription
    assert got == created
    listed = []
    token = ""
    while True:
        page = await notifications.ListWebhookSubscriptions(
            pb.ListWebhookSubscriptionsRequest(page_size=2, page_token=token)
        )
        listed.extend(page.webhook_subscriptions)
        assert secret.encode() not in page.SerializeToString()
        token = page.next_page_token
        if not token:
            break
    assert [s for s in listed if s.name == created.name] == [created]
    # Stored to sign with, but not in the audit trail.
    assert (
        await db.fetchval(
            "SELECT secret FROM webhook_subscriptions WHERE url = 'https://hooks.example/t' AND secret = $1",
            secret,
        )
        == secret
    )
    audit = await db.fetchval("SELECT after::text FROM audit_events WHERE resource = $1", created.name)
    assert "https://hooks.example/t" in audit and secret not in audit


async def test_create_with_the_same_request_id_creates_one_subscription(
    notifications: Any, db: asyncpg.Pool, cleanup: list[str]
) -> None:
    url = f"https://hooks.example/{uuid.uuid4().hex}"
    request = pb.CreateWebhookSubscriptionRequest(
        webhook_subscription=new_subscription(url, INVOICE_FINALIZED), request_id=f"req-{uuid.uuid4().hex}"
    )
    first = (await notifications.CreateWebhookSubscription(request)).webhook_subscription
    cleanup.append(first.name)
    again = (await notifications.CreateWebhookSubscription(request)).webhook_subscription
    assert again == first
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions WHERE url = $1", url) == 1

    request.webhook_subscription.secret = "a-different-secret-0123456789"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await notifications.CreateWebhookSubscription(request)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "REQUEST_ID_REUSED"  # type: ignore[union-attr]
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions WHERE url = $1", url) == 1


async def test_bad_subscription_is_invalid_argument_naming_each_field_and_stores_nothing(
    notifications: Any, db: asyncpg.Pool
) -> None:
    before = await db.fetchval("SELECT count(*) FROM webhook_subscriptions")
    bad = pb.WebhookSubscription(
        url="ftp://hooks.example/x", secret="short", event_types=["invoice.finalized", "invoice.eaten"]
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await notifications.CreateWebhookSubscription(
            pb.CreateWebhookSubscriptionRequest(webhook_subscription=bad)
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(raised.value)) == {
        "webhook_subscription.url",
        "webhook_subscription.secret",
        "webhook_subscription.event_types[1]",
    }
    assert "short" not in (raised.value.details() or "")  # the secret is never quoted
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions") == before


async def test_deleted_subscription_is_not_found_and_so_are_its_deliveries(
    notifications: Any, db: asyncpg.Pool
) -> None:
    created = (
        await notifications.CreateWebhookSubscription(
            pb.CreateWebhookSubscriptionRequest(
                webhook_subscription=new_subscription("https://hooks.example/gone", INVOICE_PAID)
            )
        )
    ).webhook_subscription
    delete = pb.DeleteWebhookSubscriptionRequest(name=created.name, request_id=f"req-{uuid.uuid4().hex}")
    await notifications.DeleteWebhookSubscription(delete)
    await notifications.DeleteWebhookSubscription(delete)  # a retry answers as the first call did
    for call in (
        notifications.GetWebhookSubscription(pb.GetWebhookSubscriptionRequest(name=created.name)),
        notifications.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest(parent=created.name)),
        notifications.DeleteWebhookSubscription(pb.DeleteWebhookSubscriptionRequest(name=created.name)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(raised.value)
        assert info is not None and info.reason == "WEBHOOK_SUBSCRIPTION_NOT_FOUND"
        assert info.metadata["webhookSubscription"] == created.name
    assert (
        await db.fetchval(
            "SELECT count(*) FROM webhook_subscriptions WHERE id = $1", created.name.split("/")[1]
        )
        == 0
    )


async def test_finalized_invoice_reaches_its_subscriber_signed(
    tally: Any,
    notifications: Any,
    usage: Any,
    billing: Any,
    tenant: str,
    receiver: Receiver,
    cleanup: list[str],
) -> None:
    created = (
        await notifications.CreateWebhookSubscription(
            pb.CreateWebhookSubscriptionRequest(
                webhook_subscription=new_subscription(f"{receiver.url}/tally", INVOICE_FINALIZED)
            )
        )
    ).webhook_subscription
    cleanup.append(created.name)
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="7", time=hour_start(-2)))
    )
    draft = (
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-3)),
                period_end_time=ts(hour_start(-1)),
            )
        )
    ).invoice
    finalized = (
        await billing.FinalizeInvoice(billing_service_pb2.FinalizeInvoiceRequest(name=draft.name))
    ).invoice

    assert tally.outbox is not None
    await tally.outbox.drain()  # the session server's worker does not poll (tests drive it)

    [received] = [r for r in receiver.requests if r.event["data"]["invoice"] == draft.name]
    assert verify(SECRET, received.headers["Tally-Signature"], received.body, now=int(time.time()))
    data = received.event["data"]
    assert (data["tenant_id"], data["number"], data["total"], data["status"], data["kind"]) == (
        tenant,
        finalized.number,
        finalized.total,
        "finalized",
        "final",
    )
    [delivery] = (
        await notifications.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest(parent=created.name))
    ).deliveries
    assert delivery.name.startswith(f"{created.name}/deliveries/")
    assert delivery.event_id == received.event["id"] == received.headers["Tally-Event-Id"]
    assert (delivery.event_type, delivery.state) == (INVOICE_FINALIZED, pb.WEBHOOK_DELIVERY_STATE_DELIVERED)
    assert delivery.attempt_count == 1 and [a.status_code for a in delivery.attempts] == [200]
    assert not delivery.HasField("next_attempt_time") and delivery.HasField("deliver_time")
    assert delivery.expire_time.ToDatetime() - delivery.create_time.ToDatetime() == timedelta(days=3)


async def test_crossed_spend_threshold_is_published_with_its_interim_invoice(
    tally: Any,
    notifications: Any,
    usage: Any,
    billing: Any,
    db: asyncpg.Pool,
    tenant: str,
    cleanup: list[str],
) -> None:
    # The URL refuses at once; the test reads what was published, not what was delivered.
    created = (
        await notifications.CreateWebhookSubscription(
            pb.CreateWebhookSubscriptionRequest(
                webhook_subscription=new_subscription("http://127.0.0.1:9/thresholds", THRESHOLD_CROSSED)
            )
        )
    ).webhook_subscription
    cleanup.append(created.name)
    await set_profile(
        billing,
        tenant,
        billing_anchor_day=far_anchor_day(),
        billing_start_time=ts(hour_start(-5)),
        spend_threshold="0.5",
    )
    await uploads(usage, tenant, "7", hour_start(-3))  # 0.70 at the default 0.10 per upload
    await tally.periods.bill_thresholds()

    rows = await db.fetch(
        "SELECT e.type, e.data::text AS data FROM webhook_deliveries d"
        " JOIN webhook_events e ON e.id = d.event_id WHERE d.subscription_id = $1",
        created.name.split("/")[1],
    )
    [row] = [r for r in rows if json.loads(r["data"])["tenant_id"] == tenant]
    [interim] = (
        await billing.ListInvoices(billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}"))
    ).invoices
    assert row["type"] == THRESHOLD_CROSSED
    data = json.loads(row["data"])
    assert (data["spend_threshold"], data["amount"], data["currency_code"], data["invoice"]) == (
        "0.5",
        interim.total,
        "USD",
        interim.name,
    )
    assert interim.total == "0.70"


async def test_invoice_written_off_then_paid_by_hand_is_published_each_time(
    tally: Any,
    notifications: Any,
    usage: Any,
    billing: Any,
    tenant: str,
    receiver: Receiver,
    cleanup: list[str],
) -> None:
    created = (
        await notifications.CreateWebhookSubscription(
            pb.CreateWebhookSubscriptionRequest(
                webhook_subscription=new_subscription(
                    f"{receiver.url}/tally", INVOICE_PAID, INVOICE_UNCOLLECTIBLE
                )
            )
        )
    ).webhook_subscription
    cleanup.append(created.name)
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="7", time=hour_start(-2)))
    )
    draft = (
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-3)),
                period_end_time=ts(hour_start(-1)),
            )
        )
    ).invoice
    await billing.FinalizeInvoice(billing_service_pb2.FinalizeInvoiceRequest(name=draft.name))
    await billing.MarkInvoiceUncollectible(
        billing_service_pb2.MarkInvoiceUncollectibleRequest(name=draft.name)
    )
    await billing.MarkInvoicePaid(billing_service_pb2.MarkInvoicePaidRequest(name=draft.name))

    assert tally.outbox is not None
    await tally.outbox.drain()

    mine = [r.event for r in receiver.requests if r.event["data"]["invoice"] == draft.name]
    assert [
        (e["type"], e["data"]["status"]) for e in sorted(mine, key=lambda e: e["data"]["status_time"])
    ] == [
        (INVOICE_UNCOLLECTIBLE, "uncollectible"),
        (INVOICE_PAID, "paid"),
    ]
    assert {e["data"]["total"] for e in mine} == {"0.70"}  # 7 uploads at 0.10
