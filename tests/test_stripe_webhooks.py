"""POST /webhooks/stripe and dunning through a real server, the real SDK and the fake Stripe API.

Deliveries are signed with the SDK's own signing code (tests/fake_stripe `sign`), the same
HMAC-SHA256 of "{t}.{body}" that Stripe computes (tests/test_payment_rules.py checks the
scheme against an independent computation). The server's wall clock is stepped by the tests
(`SteppedClock`), so signature ages and the days of the dunning schedule pass without waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
import pytest_asyncio
import stripe

from server.app import TallyServer
from server.config import Config
from server.payments.kinds import STRIPE_KINDS
from server.payments.ledger import AttemptOutcome
from server.payments.outbox import Halt
from server.payments.retries import RETRY_KIND, retry_handler
from server.storage import outbox as outbox_store
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    payment_service_pb2,
    payment_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.conftest import make_token
from tests.fake_stripe import FakeStripe
from tests.helpers import channel_with_token, error_info, event, hour_start, ts
from tests.test_telemetry import scrape, value

SECRET = "whsec_tally_webhook_tests_0123456789"
DAY = timedelta(days=1)
Code = grpc.StatusCode
CollectionState = payment_service_pb2.CollectionStatus


class SteppedClock:
    """The real time of day plus an offset that tests step forward (days, for dunning)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> int:
        return time.time_ns() // 1_000 + int(self.offset / timedelta(microseconds=1))

    def now(self) -> datetime:
        return datetime.fromtimestamp(self() / 1e6, UTC)

    def seconds(self) -> int:
        return self() // 1_000_000


@dataclasses.dataclass
class Payments:
    server: TallyServer
    clock: SteppedClock
    billing: billing_service_pb2_grpc.BillingServiceStub
    usage: usage_service_pb2_grpc.UsageServiceStub
    collections: payment_service_pb2_grpc.PaymentServiceStub

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}/webhooks/stripe"


_CLOCK = SteppedClock()


@pytest.fixture(scope="module")
def stripe_api() -> Iterator[FakeStripe]:
    """One fake Stripe API for the module's server; each test uses customers and invoices of its own."""
    with FakeStripe() as fake:
        yield fake
    assert not fake.internal_errors, f"the fake Stripe API itself failed: {fake.internal_errors}"


@pytest_asyncio.fixture(scope="module")
async def payments(
    server_config: Config, tmp_path_factory: pytest.TempPathFactory, stripe_api: FakeStripe
) -> AsyncIterator[Payments]:
    """A server of its own: the HTTP listener with the webhook secret, the stepped clock, the fake
    Stripe API for dunning retries, and the outbox run by the tests (`server.outbox.drain()`)."""
    secret_file = tmp_path_factory.mktemp("stripe") / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    config = dataclasses.replace(
        server_config, http_port=0, stripe_webhook_secret_file=secret_file, stripe_api_base=stripe_api.url
    )
    server = TallyServer(config, wall_clock=_CLOCK, environ={"TALLY_STRIPE_API_KEY": stripe_api.api_key})
    await server.start()
    async with channel_with_token(f"127.0.0.1:{server.port}", make_token()) as channel:
        yield Payments(
            server,
            _CLOCK,
            billing_service_pb2_grpc.BillingServiceStub(channel),
            usage_service_pb2_grpc.UsageServiceStub(channel),
            payment_service_pb2_grpc.PaymentServiceStub(channel),
        )
    await server.stop()


@pytest.fixture(autouse=True)
def _real_time_again() -> Iterator[None]:
    _CLOCK.offset = timedelta(0)
    yield
    _CLOCK.offset = timedelta(0)


@dataclasses.dataclass
class Billed:
    """A finalized Tally invoice and the open Stripe invoice the push would have made of it."""

    tenant: str
    invoice_id: str
    name: str
    stripe_invoice: dict[str, Any]


async def billed(
    payments: Payments, db: asyncpg.Pool, fake: FakeStripe, tenant: str, *, card: str = "pm_card_visa"
) -> Billed:
    await payments.usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="5", time=hour_start(-2)))
    )
    draft = (
        await payments.billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-3)),
                period_end_time=ts(hour_start(0)),
            )
        )
    ).invoice
    await payments.billing.FinalizeInvoice(billing_service_pb2.FinalizeInvoiceRequest(name=draft.name))
    invoice_id = draft.name.rsplit("/", 1)[1]
    client = fake.client()
    customer = client.v1.customers.create(params={"invoice_settings": {"default_payment_method": card}})
    stripe_invoice = client.v1.invoices.create(
        params={"customer": customer.id, "auto_advance": False, "metadata": {"tally_invoice_id": invoice_id}}
    )
    client.v1.invoice_items.create(
        params={"customer": customer.id, "invoice": stripe_invoice.id, "amount": 50, "description": "usage"}
    )
    client.v1.invoices.finalize_invoice(stripe_invoice.id)
    # What the push stores once Stripe's invoice is open, its job then done.
    await db.execute(
        "UPDATE outbox_jobs SET state = 'done' WHERE kind = 'stripe.invoice' AND subject = $1", invoice_id
    )
    await db.execute(
        "INSERT INTO invoice_payments (invoice_id, state, stripe_invoice_id) VALUES ($1, 'open', $2)"
        " ON CONFLICT (invoice_id) DO UPDATE SET state = 'open', stripe_invoice_id = $2",
        invoice_id,
        stripe_invoice.id,
    )
    return Billed(tenant, invoice_id, draft.name, fake.get(stripe_invoice.id))


async def deliver(
    payments: Payments, fake: FakeStripe, event: dict[str, Any], *, secret: str = SECRET, age: int = 0
) -> tuple[int, dict[str, Any]]:
    body, header = fake.sign(event, secret, timestamp=payments.clock.seconds() - age)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            payments.url, data=body, headers={"Stripe-Signature": header, "Content-Type": "application/json"}
        ) as answer,
    ):
        return answer.status, await answer.json()


async def invoice_of(payments: Payments, name: str) -> resources_pb2.Invoice:
    return (await payments.billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=name))).invoice


async def stored_event(db: asyncpg.Pool, event_id: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT outcome, invoice_id FROM stripe_events WHERE id = $1", event_id)


async def audit_actions(db: asyncpg.Pool, tenant: str) -> list[tuple[str, str, str]]:
    rows = await db.fetch(
        "SELECT action, principal, request_id FROM audit_events WHERE tenant_id = $1"
        " AND action NOT IN ('invoice_created', 'invoice_finalized') ORDER BY id",
        tenant,
    )
    return [(r["action"], r["principal"], r["request_id"]) for r in rows]


async def retry_job(db: asyncpg.Pool, invoice_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT state FROM outbox_jobs WHERE kind = 'stripe.retry_payment' AND subject = $1",
        invoice_id,
    )


async def collection(payments: Payments, tenant: str) -> payment_service_pb2.CollectionStatus:
    request = payment_service_pb2.GetCollectionStatusRequest(name=f"tenants/{tenant}/collectionStatus")
    return (await payments.collections.GetCollectionStatus(request)).collection_status


# -- signatures --


async def test_signed_invoice_paid_marks_the_invoice_paid_audited_as_stripe(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    paid = stripe_api.event("invoice.paid", bill.stripe_invoice["id"], status="paid")
    assert await deliver(payments, stripe_api, paid) == (200, {"received": True, "outcome": "applied"})
    invoice = await invoice_of(payments, bill.name)
    assert invoice.status == resources_pb2.INVOICE_STATUS_PAID
    assert invoice.payment.state == resources_pb2.PAYMENT_STATE_PAID
    assert invoice.payment.stripe_invoice_id == bill.stripe_invoice["id"]
    assert await audit_actions(db, tenant) == [("invoice_paid", "stripe-webhook", paid["id"])]
    stored = await stored_event(db, paid["id"])
    assert stored is not None and (stored["outcome"], stored["invoice_id"]) == ("applied", bill.invoice_id)


async def test_each_answer_is_counted_on_metrics_and_so_are_the_outbox_steps(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    port = payments.server.http_port

    async def counts() -> tuple[float, ...]:
        samples = await scrape(port)
        return (
            value(samples, "tally_stripe_webhooks_total", outcome="applied"),
            value(samples, "tally_stripe_webhooks_total", outcome="duplicate"),
            value(samples, "tally_stripe_webhooks_total", outcome="refused"),
            value(samples, "tally_outbox_steps_total", kind="stripe.retry_payment", outcome="done"),
        )

    before = await counts()
    bill = await billed(payments, db, stripe_api, tenant)
    failed = stripe_api.event("invoice.payment_failed", bill.stripe_invoice["id"], attempt_count=1)
    await deliver(payments, stripe_api, failed)
    await deliver(payments, stripe_api, failed)
    await deliver(payments, stripe_api, failed, secret="whsec_another_secret_0123456789")
    outbox = payments.server.outbox
    assert outbox is not None
    # Only this test's retry may run: another test's, due by then too, would count as well.
    await db.execute(
        "UPDATE outbox_jobs SET state = 'stopped', last_error = 'not this test''s'"
        " WHERE kind = 'stripe.retry_payment' AND state = 'pending' AND subject <> $1",
        bill.invoice_id,
    )
    payments.clock.offset = 3 * DAY + timedelta(hours=1)
    await outbox.drain()  # the retry is due: it pays (the card works now), the job is done
    after = await counts()
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1, 1]


async def test_delivery_signed_with_another_secret_is_refused_and_nothing_stored(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    paid = stripe_api.event("invoice.paid", bill.stripe_invoice["id"])
    status, answer = await deliver(payments, stripe_api, paid, secret="whsec_not_this_endpoints")
    assert (status, answer["received"]) == (400, False)
    assert await stored_event(db, paid["id"]) is None
    assert (await invoice_of(payments, bill.name)).status == resources_pb2.INVOICE_STATUS_FINALIZED


async def test_delivery_without_a_signature_is_refused(payments: Payments, db: asyncpg.Pool) -> None:
    body = b'{"id": "evt_unsigned", "object": "event", "type": "invoice.paid", "data": {"object": {}}}'
    async with aiohttp.ClientSession() as session, session.post(payments.url, data=body) as answer:
        assert answer.status == 400
    assert await stored_event(db, "evt_unsigned") is None


async def test_delivery_signed_more_than_five_minutes_ago_by_the_servers_clock_is_refused(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    payments.clock.offset = timedelta(days=2)  # the server's clock, not the machine's, decides
    stale = stripe_api.event("invoice.paid", bill.stripe_invoice["id"])
    assert (await deliver(payments, stripe_api, stale, age=330))[0] == 400
    assert await stored_event(db, stale["id"]) is None
    assert (await deliver(payments, stripe_api, stale, age=270))[0] == 200
    assert (await invoice_of(payments, bill.name)).status == resources_pb2.INVOICE_STATUS_PAID


# -- once, in any order --


async def test_redelivered_event_is_applied_once(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    failed = stripe_api.event("invoice.payment_failed", bill.stripe_invoice["id"], attempt_count=1)
    answers = await asyncio.gather(*(deliver(payments, stripe_api, failed) for _ in range(4)))
    answers.append(await deliver(payments, stripe_api, failed))
    outcomes = sorted(answer["outcome"] for status, answer in answers if status == 200)
    assert outcomes == ["applied", "duplicate", "duplicate", "duplicate", "duplicate"]
    assert await audit_actions(db, tenant) == [
        ("payment_failed", "stripe-webhook", failed["id"]),
        ("collection_status_changed", "stripe-webhook", failed["id"]),
    ]
    payment = (await invoice_of(payments, bill.name)).payment
    assert (payment.state, payment.attempt_count) == (resources_pb2.PAYMENT_STATE_FAILED, 1)


async def test_payment_failed_arriving_after_paid_changes_nothing(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    stripe_id = bill.stripe_invoice["id"]
    # Stripe sent them in this order; they arrive the other way round.
    failed = stripe_api.event("invoice.payment_failed", stripe_id, attempt_count=1)
    paid = stripe_api.event("invoice.paid", stripe_id, attempt_count=2)
    assert (await deliver(payments, stripe_api, paid))[1]["outcome"] == "applied"
    assert (await deliver(payments, stripe_api, failed))[1]["outcome"] == "unchanged"
    invoice = await invoice_of(payments, bill.name)
    assert invoice.status == resources_pb2.INVOICE_STATUS_PAID
    assert invoice.payment.state == resources_pb2.PAYMENT_STATE_PAID
    assert not invoice.payment.HasField("next_attempt_time")
    assert (await collection(payments, tenant)).state == CollectionState.STATE_GOOD_STANDING
    # The retry job the failure asked for finds the payment settled and ends without calling Stripe.
    job = await retry_job(db, bill.invoice_id)
    assert job is None or job["state"] == "pending"


async def test_failures_arriving_out_of_order_keep_the_latest_attempt_and_the_first_failure_time(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    stripe_id = bill.stripe_invoice["id"]
    first = int(payments.clock.seconds())
    one = stripe_api.event("invoice.payment_failed", stripe_id, attempt_count=1) | {"created": first}
    two = stripe_api.event("invoice.payment_failed", stripe_id, attempt_count=2)
    two["created"] = first + 3 * 86_400
    await deliver(payments, stripe_api, two)
    await deliver(payments, stripe_api, one)
    payment = (await invoice_of(payments, bill.name)).payment
    assert payment.attempt_count == 2
    # Attempt 3 is due 5 days after the first failure, whichever event came first.
    assert payment.next_attempt_time.ToSeconds() == first + 5 * 86_400
    assert (await collection(payments, tenant)).state == CollectionState.STATE_PAST_DUE


async def test_each_new_failed_attempt_is_published_to_subscribers_once(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    subscription = f"ws_{uuid.uuid4().hex}"
    await db.execute(
        "INSERT INTO webhook_subscriptions (id, url, secret, event_types, description, create_time)"
        " VALUES ($1, 'http://127.0.0.1:9/none', 'secret-0123456789abcdef', $2, '', now())",
        subscription,
        ["invoice.payment_failed"],
    )
    try:
        bill = await billed(payments, db, stripe_api, tenant)
        stripe_id = bill.stripe_invoice["id"]
        one = stripe_api.event("invoice.payment_failed", stripe_id, attempt_count=1)
        await deliver(payments, stripe_api, one)
        await deliver(payments, stripe_api, one)  # a redelivery: not news
        await deliver(
            payments, stripe_api, stripe_api.event("invoice.payment_failed", stripe_id, attempt_count=2)
        )
        published = await db.fetch(
            "SELECT data FROM webhook_events WHERE type = 'invoice.payment_failed'"
            " AND data->>'invoice' = $1 ORDER BY create_time, data->>'attempt_count'",
            bill.name,
        )
    finally:
        await db.execute("DELETE FROM webhook_subscriptions WHERE id = $1", subscription)
    data = [json.loads(row["data"]) for row in published]
    assert [(d["attempt_count"], d["payment_state"], d["tenant_id"]) for d in data] == [
        ("1", "failed", tenant),
        ("2", "failed", tenant),
    ]
    assert all(d["next_attempt_time"] for d in data)


async def test_marked_uncollectible_then_paid_ends_paid_and_in_good_standing(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    stripe_id = bill.stripe_invoice["id"]
    gone = stripe_api.event("invoice.marked_uncollectible", stripe_id)
    assert (await deliver(payments, stripe_api, gone))[1]["outcome"] == "applied"
    status = await collection(payments, tenant)
    assert (status.state, list(status.uncollectible_invoices)) == (
        CollectionState.STATE_DELINQUENT,
        [bill.name],
    )
    assert (await invoice_of(payments, bill.name)).status == resources_pb2.INVOICE_STATUS_UNCOLLECTIBLE
    await deliver(payments, stripe_api, stripe_api.event("invoice.paid", stripe_id))
    assert (await invoice_of(payments, bill.name)).status == resources_pb2.INVOICE_STATUS_PAID
    status = await collection(payments, tenant)
    assert (status.state, list(status.uncollectible_invoices)) == (CollectionState.STATE_GOOD_STANDING, [])
    assert [a for a, _, _ in await audit_actions(db, tenant)] == [
        "invoice_uncollectible",
        "collection_status_changed",
        "invoice_paid",
        "collection_status_changed",
    ]


async def test_voided_invoice_is_void_and_a_late_paid_changes_nothing(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    stripe_id = bill.stripe_invoice["id"]
    await deliver(payments, stripe_api, stripe_api.event("invoice.voided", stripe_id))
    assert (await deliver(payments, stripe_api, stripe_api.event("invoice.paid", stripe_id)))[1] == {
        "received": True,
        "outcome": "unchanged",
    }
    invoice = await invoice_of(payments, bill.name)
    assert (invoice.status, invoice.payment.state) == (
        resources_pb2.INVOICE_STATUS_VOID,
        resources_pb2.PAYMENT_STATE_VOID,
    )


async def test_invoice_marked_paid_by_hand_is_settled_for_a_late_payment_failure_too(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    await payments.billing.MarkInvoicePaid(billing_service_pb2.MarkInvoicePaidRequest(name=bill.name))
    failed = stripe_api.event("invoice.payment_failed", bill.stripe_invoice["id"], attempt_count=1)
    assert (await deliver(payments, stripe_api, failed))[1]["outcome"] == "unchanged"
    payment = (await invoice_of(payments, bill.name)).payment
    assert (payment.state, payment.attempt_count) == (resources_pb2.PAYMENT_STATE_OPEN, 0)
    assert await retry_job(db, bill.invoice_id) is None
    assert (await collection(payments, tenant)).state == CollectionState.STATE_GOOD_STANDING


async def test_written_off_invoice_paid_by_hand_ends_the_delinquency(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    gone = stripe_api.event("invoice.marked_uncollectible", bill.stripe_invoice["id"])
    await deliver(payments, stripe_api, gone)
    assert (await collection(payments, tenant)).state == CollectionState.STATE_DELINQUENT
    await payments.billing.MarkInvoicePaid(billing_service_pb2.MarkInvoicePaidRequest(name=bill.name))
    status = await collection(payments, tenant)
    assert (status.state, list(status.uncollectible_invoices)) == (CollectionState.STATE_GOOD_STANDING, [])


async def test_action_required_is_past_due_with_its_attempt(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    action = stripe_api.event("invoice.payment_action_required", bill.stripe_invoice["id"], attempt_count=1)
    await deliver(payments, stripe_api, action)
    payment = (await invoice_of(payments, bill.name)).payment
    assert (payment.state, payment.attempt_count) == (resources_pb2.PAYMENT_STATE_ACTION_REQUIRED, 1)
    assert (await collection(payments, tenant)).past_due_invoices == [bill.name]


async def test_refund_and_dispute_of_a_paid_invoice_are_recorded_and_it_stays_paid(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    charge_id = f"ch_{uuid.uuid4().hex[:14]}"
    paid = stripe_api.event("invoice.paid", bill.stripe_invoice["id"], charge=charge_id)
    await deliver(payments, stripe_api, paid)
    # Charges and disputes of recent API versions do not name the invoice: the charge id does.
    charge = {"id": charge_id, "object": "charge", "amount_refunded": 25, "currency": "usd", "metadata": {}}
    dispute = {
        "id": f"dp_{charge_id}",
        "object": "dispute",
        "charge": charge_id,
        "amount": 50,
        "currency": "usd",
    }
    for incident in (
        stripe_api.event("charge.refunded", charge),
        stripe_api.event("charge.dispute.created", dispute),
    ):
        assert (await deliver(payments, stripe_api, incident))[1]["outcome"] == "applied"
    assert (await invoice_of(payments, bill.name)).status == resources_pb2.INVOICE_STATUS_PAID
    rows = await db.fetch(
        "SELECT action, after ->> 'amount_refunded' AS refunded, after ->> 'amount_disputed' AS disputed"
        " FROM audit_events WHERE tenant_id = $1 AND action LIKE 'payment_%' ORDER BY id",
        tenant,
    )
    assert [(r["action"], r["refunded"], r["disputed"]) for r in rows] == [
        ("payment_refunded", "0.25", None),
        ("payment_disputed", None, "0.50"),
    ]


async def test_event_about_an_invoice_tally_never_pushed_is_acknowledged_as_unmatched(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe
) -> None:
    foreign = {"id": "in_foreign", "object": "invoice", "metadata": {}, "attempt_count": 1}
    event = stripe_api.event("invoice.payment_failed", foreign)
    assert await deliver(payments, stripe_api, event) == (200, {"received": True, "outcome": "unmatched"})
    stored = await stored_event(db, event["id"])
    assert stored is not None and (stored["outcome"], stored["invoice_id"]) == ("unmatched", None)


async def test_event_of_a_type_tally_does_not_act_on_is_stored_and_ignored(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe
) -> None:
    event = stripe_api.event("customer.created", {"id": "cus_x", "object": "customer"})
    assert await deliver(payments, stripe_api, event) == (200, {"received": True, "outcome": "ignored"})
    assert (await stored_event(db, event["id"]) or {})["outcome"] == "ignored"


# -- collection status by gRPC --


async def test_collection_status_of_a_tenant_never_billed_is_good_standing(payments: Payments) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:12]}"
    status = await collection(payments, tenant)
    assert (status.name, status.state) == (
        f"tenants/{tenant}/collectionStatus",
        CollectionState.STATE_GOOD_STANDING,
    )
    assert not status.HasField("update_time")


async def test_collection_status_needs_a_well_formed_name_and_the_tenant(
    payments: Payments, tenant: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await payments.collections.GetCollectionStatus(
            payment_service_pb2.GetCollectionStatusRequest(name=f"tenants/{tenant}")
        )
    assert bad.value.code() == Code.INVALID_ARGUMENT
    other = make_token([f"{tenant}-other"])
    async with channel_with_token(f"127.0.0.1:{payments.server.port}", other) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await payment_service_pb2_grpc.PaymentServiceStub(channel).GetCollectionStatus(
                payment_service_pb2.GetCollectionStatusRequest(name=f"tenants/{tenant}/collectionStatus")
            )
    assert denied.value.code() == Code.PERMISSION_DENIED
    info = error_info(denied.value)
    assert info is not None and info.reason == "TENANT_NOT_PERMITTED"


# -- dunning --


async def test_declined_payment_is_retried_3_5_and_7_days_after_the_first_failure_then_written_off(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant, card="pm_card_chargeDeclined")
    stripe_id = bill.stripe_invoice["id"]
    with pytest.raises(stripe.CardError):  # the push's first charge: declined
        stripe_api.client().v1.invoices.pay(stripe_id)
    failures = stripe_api.events("invoice.payment_failed")
    first = next(e for e in reversed(failures) if e["data"]["object"]["id"] == stripe_id)
    assert (await deliver(payments, stripe_api, first))[1]["outcome"] == "applied"
    t0 = datetime.fromtimestamp(first["created"], UTC)
    outbox = payments.server.outbox
    assert outbox is not None
    pay_path = f"/v1/invoices/{stripe_id}/pay"

    for attempt, day, next_day in ((2, 3, 5), (3, 5, 7), (4, 7, None)):
        payments.clock.offset = day * DAY - timedelta(hours=1)  # an hour early: nothing happens
        await outbox.drain()
        assert len(stripe_api.requests("POST", pay_path)) == attempt - 1
        payments.clock.offset = day * DAY + timedelta(hours=1)
        await outbox.drain()
        keys = [r.idempotency_key for r in stripe_api.requests("POST", pay_path)[1:]]
        assert keys == [f"tally-{bill.invoice_id}-pay-attempt-{n}" for n in range(2, attempt + 1)]
        payment = (await invoice_of(payments, bill.name)).payment
        assert payment.attempt_count == attempt
        if next_day is not None:
            assert payment.state == resources_pb2.PAYMENT_STATE_FAILED
            assert payment.next_attempt_time.ToDatetime(UTC) == t0 + next_day * DAY
            assert (await collection(payments, tenant)).state == CollectionState.STATE_PAST_DUE

    invoice = await invoice_of(payments, bill.name)
    assert (invoice.status, invoice.payment.state) == (
        resources_pb2.INVOICE_STATUS_UNCOLLECTIBLE,
        resources_pb2.PAYMENT_STATE_UNCOLLECTIBLE,
    )
    assert not invoice.payment.HasField("next_attempt_time")
    status = await collection(payments, tenant)
    assert status.state == CollectionState.STATE_DELINQUENT
    assert list(status.uncollectible_invoices) == [bill.name]
    assert stripe_api.get(stripe_id)["attempt_count"] == 4
    job = await retry_job(db, bill.invoice_id)
    assert job is not None and job["state"] == "done"
    assert [(a, p) for a, p, _ in await audit_actions(db, tenant)] == [
        ("payment_failed", "stripe-webhook"),
        ("collection_status_changed", "stripe-webhook"),
        ("payment_failed", "tally-dunning"),
        ("payment_failed", "tally-dunning"),
        ("invoice_uncollectible", "tally-dunning"),
        ("payment_failed", "tally-dunning"),
        ("collection_status_changed", "tally-dunning"),
    ]
    # Stripe's webhooks for the retries arrive afterwards: old news.
    for late in stripe_api.events("invoice.payment_failed"):
        if late["data"]["object"]["id"] == stripe_id and late["id"] != first["id"]:
            assert (await deliver(payments, stripe_api, late))[1]["outcome"] == "unchanged"
    assert (await collection(payments, tenant)).state == CollectionState.STATE_DELINQUENT


async def test_retry_refused_for_the_api_key_halts_every_stripe_kind_and_reports_it(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant, card="pm_card_chargeDeclined")
    failed = stripe_api.event("invoice.payment_failed", bill.stripe_invoice["id"], attempt_count=1)
    assert (await deliver(payments, stripe_api, failed))[1]["outcome"] == "applied"

    class RefusedKey:
        async def pay(self, stripe_invoice_id: str, idempotency_key: str) -> AttemptOutcome:
            raise stripe.AuthenticationError("Invalid API Key provided", http_status=401)

    refusals: list[str] = []

    async def refused(reason: str) -> None:
        refusals.append(reason)

    handler = retry_handler(payments.server.payments, RefusedKey(), refused)
    payments.clock.offset = 3 * DAY + timedelta(hours=1)  # the retry is due
    async with db.acquire() as conn, conn.transaction():
        job = await outbox_store.get(conn, RETRY_KIND, bill.invoice_id)
        assert job is not None
        outcome = await handler(conn, job)
    assert isinstance(outcome, Halt) and outcome.kinds == STRIPE_KINDS
    assert outcome.reason.startswith("Stripe refused the API key (401)") and refusals == [outcome.reason]
    payment = (await invoice_of(payments, bill.name)).payment
    assert (payment.state, payment.attempt_count) == (
        resources_pb2.PAYMENT_STATE_FAILED,
        1,
    )  # nothing counted


async def test_retry_job_of_a_payment_paid_meanwhile_ends_without_calling_stripe(
    payments: Payments, db: asyncpg.Pool, stripe_api: FakeStripe, tenant: str
) -> None:
    bill = await billed(payments, db, stripe_api, tenant)
    stripe_id = bill.stripe_invoice["id"]
    await deliver(
        payments, stripe_api, stripe_api.event("invoice.payment_failed", stripe_id, attempt_count=1)
    )
    await deliver(payments, stripe_api, stripe_api.event("invoice.paid", stripe_id))
    payments.clock.offset = 4 * DAY
    outbox = payments.server.outbox
    assert outbox is not None
    await outbox.drain()
    assert stripe_api.requests("POST", f"/v1/invoices/{stripe_id}/pay") == []
    job = await retry_job(db, bill.invoice_id)
    assert job is not None and job["state"] == "done"
