"""Pushing finalized invoices to Stripe: the real SDK against the fake Stripe API (tests/fake_stripe).

Handler tests build finalized invoices straight in the database and run the stripe.* jobs with an
Outbox of their own on a fake clock; end-to-end tests run a Tally server with a Stripe key pointed at
the fake and go through the RPCs. A "crash" is the worker's task cancelled while Stripe holds the
answer to a request it has already carried out: the claiming transaction rolls back whole, as when a
process dies and its connection drops, and the next worker resumes from what was committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import TallyServer
from server.billing.lifecycle import Lifecycle
from server.billing.pricer import InvoicePricer
from server.config import Config
from server.domain.lifecycle import Issuer
from server.domain.models import Invoice, PaymentState
from server.domain.pagination import PageTokens
from server.domain.pricing import LineItem
from server.payments.collection import Collection
from server.payments.dunning import DunningSchedule
from server.payments.health import PAYMENTS_SERVICE
from server.payments.kinds import STRIPE_CREDIT_NOTE, STRIPE_INVOICE, STRIPE_KINDS, STRIPE_RETRY_PAYMENT
from server.payments.ledger import PaymentLedger
from server.payments.outbox import Outbox
from server.payments.retries import OutboxRetryJobs
from server.payments.stripe_push import RequestPacer, StripePush, StripeSettings
from server.storage import outbox as jobs
from server.storage import payments
from server.storage.credit_notes import CreditNoteStore
from server.storage.invoices import InvoiceStore
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.billing_helpers import set_profile
from tests.conftest import make_token
from tests.fake_stripe import FakeStripe
from tests.helpers import channel_with_token, event, hour_start, ts
from tests.test_outbox import Clock

R = resources_pb2


@pytest.fixture(autouse=True)
async def _no_stripe_jobs_of_earlier_tests(db: asyncpg.Pool) -> None:
    """Each test's workers see only its own jobs: anything an earlier test left pending is stopped."""
    await db.execute(
        "UPDATE outbox_jobs SET state = 'stopped', last_error = 'left by an earlier test'"
        " WHERE kind = ANY($1::text[]) AND state = 'pending'",
        list(STRIPE_KINDS),
    )


# -- building finalized invoices in the database --

PERIOD = datetime(2026, 1, 1, tzinfo=UTC)


async def finalized(
    db: asyncpg.Pool,
    tenant: str,
    amounts: list[str],
    *,
    currency: str = "USD",
    period: int = 0,
    email: str = "billing@example.com",
) -> Invoice:
    """A finalized invoice of `tenant` with one usage line per amount, queued for Stripe (live mode)."""
    lines = tuple(
        LineItem(
            service=f"svc{i % 7}",
            usage_type=f"type{i}",
            quantity=Decimal(1),
            unit_price=Decimal(amount),
            amount=Decimal(amount),
            event_count=1,
            period_start=PERIOD,
            period_end=PERIOD + timedelta(days=1),
        )
        for i, amount in enumerate(amounts)
    )
    invoice_id = f"inv_{uuid.uuid4().hex}"
    start = PERIOD + timedelta(days=31 * period)
    at = PERIOD + timedelta(days=40)
    async with InvoiceStore(db).tenant_transaction(tenant) as tx:
        await tx.save(
            invoice_id,
            tenant,
            start,
            start + timedelta(days=31),
            currency,
            sum(line.amount for line in lines),
            lines,
        )
        parties = {
            "issuer": {"name": "Tally-stripe-tests"},
            "customer": {"name": f"Customer {tenant}", "email": email, "tenant_id": tenant},
        }
        invoice = await tx.finalize(invoice_id, f"T-{uuid.uuid4().hex[:12]}", parties, [], at, lines)
        await Collection(live=True).invoice_finalized(tx, invoice, at)
    return invoice


def push_outbox(
    db: asyncpg.Pool,
    fake: FakeStripe,
    clock: Clock,
    *,
    retries: int = 0,
    timeout: float = 30.0,
    settings: StripeSettings | None = None,
    on_auth_failure: Any = None,
) -> Outbox:
    push = StripePush(
        fake.client(max_network_retries=retries, timeout=timeout),
        clock,
        settings=settings or StripeSettings(),
        on_auth_failure=on_auth_failure,
        attempts=payment_ledger(db, clock),
    )
    return Outbox(db, push.handlers(), clock)


def payment_ledger(db: asyncpg.Pool, clock: Clock) -> PaymentLedger:
    """The ledger the server gives the push: declines go to dunning (retries 3, 5, 7 days on)."""
    invoices = InvoiceStore(db)
    lifecycle = Lifecycle(
        invoices,
        CreditNoteStore(db),
        InvoicePricer("USD"),
        Issuer(name="Tally"),
        PageTokens(b"k" * 32),
        clock,
    )
    schedule = DunningSchedule.of_seconds([3 * 86_400, 5 * 86_400, 7 * 86_400])
    return PaymentLedger(invoices, lifecycle, schedule, OutboxRetryJobs(), clock)


async def push_job(db: asyncpg.Pool, invoice_id: str) -> jobs.Job:
    job = await jobs.get(db, STRIPE_INVOICE, invoice_id)
    assert job is not None
    return job


async def until(condition: Callable[[], bool]) -> None:
    """Wait for something another thread does (the fake's server); the bound is a backstop only."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 (set by the fake's own threads, not by a task)
            await asyncio.sleep(0.01)


def assert_stripe_has_exactly(fake: FakeStripe, invoice: Invoice) -> dict[str, Any]:
    """One customer, one invoice, its items exactly Tally's lines in order, its total Tally's."""
    (customer,) = fake.objects("customer")
    (remote,) = fake.objects("invoice")
    items = sorted(fake.objects("invoiceitem"), key=lambda item: int(item["metadata"]["tally_item"]))
    assert [item["amount"] for item in items] == [int(line.amount * 100) for line in invoice.lines]
    assert [item["invoice"] for item in items] == [remote["id"]] * len(invoice.lines)
    assert remote["total"] == int(invoice.total * 100)
    assert remote["customer"] == customer["id"]
    assert remote["metadata"]["tally_invoice_id"] == invoice.id
    assert remote["auto_advance"] is False
    return remote


# -- the steps, exactly once --

CRASH_POINTS = [
    ("POST", "/v1/customers", 0),
    ("POST", "/v1/invoices", 0),
    ("POST", "/v1/invoiceitems", 0),
    ("POST", "/v1/invoiceitems", 2),
    ("POST", "/v1/invoices/*/finalize", 0),
    ("POST", "/v1/invoices/*/pay", 0),
]


@pytest.mark.parametrize(("method", "path", "skip"), CRASH_POINTS)
async def test_worker_killed_after_any_stripe_request_resumes_without_duplicates(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str, method: str, path: str, skip: int
) -> None:
    invoice = await finalized(db, tenant, ["1.25", "0.10", "40.00"])
    clock = Clock()
    fake_stripe.delay_next(path, method=method, after=True, skip=skip)
    dying = asyncio.create_task(push_outbox(db, fake_stripe, clock).drain())
    # The request has run at Stripe (and is stored under its key); its answer is held: kill the worker.
    await until(lambda: len(fake_stripe.requests(method, path)) > skip)
    dying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dying
    fake_stripe.release()
    assert (await push_job(db, invoice.id)).state == "pending"

    await push_outbox(db, fake_stripe, clock).drain()  # a new worker, as after a restart
    remote = assert_stripe_has_exactly(fake_stripe, invoice)
    assert remote["attempt_count"] == 1  # charged once: the repeated pay got Stripe's stored answer
    job = await push_job(db, invoice.id)
    assert (job.state, job.last_error) == ("done", None)
    payment = await payments.get(db, invoice.id)
    assert payment is not None
    assert (payment.state, payment.stripe_invoice_id, payment.attempt_count) == (
        PaymentState.FAILED,  # Tally's customer has no card at Stripe: declined, once
        remote["id"],
        1,
    )


async def test_a_tenants_customer_is_created_once_and_kept_on_its_billing_profile(
    db: asyncpg.Pool, billing: Any, fake_stripe: FakeStripe, tenant: str
) -> None:
    await set_profile(billing, tenant, email="ap@example.com")
    first = await finalized(db, tenant, ["3.00"], period=0, email="ap@example.com")
    second = await finalized(db, tenant, ["4.00"], period=1, email="ap@example.com")
    outbox = push_outbox(db, fake_stripe, Clock())
    await outbox.drain()
    (customer,) = fake_stripe.objects("customer")
    assert (customer["email"], customer["metadata"]) == ("ap@example.com", {"tally_tenant_id": tenant})
    async with db.acquire() as conn:
        assert await payments.stripe_customer(conn, tenant) == customer["id"]
    assert sorted(i["metadata"]["tally_invoice_id"] for i in fake_stripe.objects("invoice")) == sorted(
        [first.id, second.id]
    )
    assert {i["customer"] for i in fake_stripe.objects("invoice")} == {customer["id"]}


async def test_a_paid_charge_marks_the_payment_and_the_invoice_paid_with_an_audit_entry(
    db: asyncpg.Pool, billing: Any, fake_stripe: FakeStripe, tenant: str
) -> None:
    await set_profile(billing, tenant)
    customer = fake_stripe.client().v1.customers.create(params={"name": tenant})
    fake_stripe.set_default_payment_method(customer.id, "pm_card_visa")
    await db.execute(
        "UPDATE billing_profiles SET stripe_customer_id = $2 WHERE tenant_id = $1", tenant, customer.id
    )
    invoice = await finalized(db, tenant, ["19.99", "0.01"])
    await push_outbox(db, fake_stripe, Clock()).drain()
    remote = assert_stripe_has_exactly(fake_stripe, invoice)
    assert (remote["status"], remote["amount_paid"]) == ("paid", 2000)
    payment = await payments.get(db, invoice.id)
    assert payment is not None and payment.state is PaymentState.PAID
    row = await db.fetchrow("SELECT status, paid_time FROM invoices WHERE id = $1", invoice.id)
    assert row["status"] == "paid" and row["paid_time"] is not None
    audit = await db.fetchrow(
        "SELECT principal, action FROM audit_events WHERE resource = $1 AND action = 'invoice_paid'",
        f"invoices/{invoice.id}",
    )
    assert (audit["principal"], audit["action"]) == ("tally-stripe", "invoice_paid")


async def test_a_card_decline_marks_the_payment_failed_once_without_looping(
    db: asyncpg.Pool, billing: Any, fake_stripe: FakeStripe, tenant: str
) -> None:
    await set_profile(billing, tenant)
    customer = fake_stripe.client().v1.customers.create(params={"name": tenant})
    fake_stripe.set_default_payment_method(customer.id, "pm_card_chargeDeclinedInsufficientFunds")
    await db.execute(
        "UPDATE billing_profiles SET stripe_customer_id = $2 WHERE tenant_id = $1", tenant, customer.id
    )
    invoice = await finalized(db, tenant, ["12.00"])
    clock = Clock()
    outbox = push_outbox(db, fake_stripe, clock)
    await outbox.drain()
    clock.advance(timedelta(days=1))
    assert await outbox.drain() == 0  # nothing left to retry: dunning's business, not the push's
    assert len(fake_stripe.requests("POST", "/v1/invoices/*/pay")) == 1
    payment = await payments.get(db, invoice.id)
    assert payment is not None
    assert (payment.state, payment.attempt_count, payment.last_failure) == (
        PaymentState.FAILED,
        1,
        "Your card has insufficient funds.",
    )
    assert await db.fetchval("SELECT status FROM invoices WHERE id = $1", invoice.id) == "finalized"
    assert (await push_job(db, invoice.id)).state == "done"


async def test_a_declined_first_charge_starts_dunning_without_waiting_for_a_webhook(
    db: asyncpg.Pool, billing: Any, fake_stripe: FakeStripe, tenant: str
) -> None:
    await set_profile(billing, tenant)
    customer = fake_stripe.client().v1.customers.create(params={"name": tenant})
    fake_stripe.set_default_payment_method(customer.id, "pm_card_chargeDeclinedInsufficientFunds")
    await db.execute(
        "UPDATE billing_profiles SET stripe_customer_id = $2 WHERE tenant_id = $1", tenant, customer.id
    )
    invoice = await finalized(db, tenant, ["12.00"])
    clock = Clock()
    await push_outbox(db, fake_stripe, clock).drain()

    row = await db.fetchrow(
        "SELECT state, attempt_count, first_failure_time, next_attempt_time, last_failure"
        " FROM invoice_payments WHERE invoice_id = $1",
        invoice.id,
    )
    assert (row["state"], row["attempt_count"], row["last_failure"]) == (
        "failed",
        1,
        "Your card has insufficient funds.",
    )
    assert row["first_failure_time"] == clock.at
    assert row["next_attempt_time"] == clock.at + timedelta(days=3)  # the schedule's first retry
    retry = await jobs.get(db, STRIPE_RETRY_PAYMENT, invoice.id)
    assert retry is not None and (retry.state, retry.next_attempt_time) == (
        "pending",
        clock.at + timedelta(days=3),
    )
    assert (
        await db.fetchval("SELECT state FROM tenant_collections WHERE tenant_id = $1", tenant) == "past_due"
    )
    audited = await db.fetch(
        "SELECT action, principal FROM audit_events WHERE tenant_id = $1 AND action LIKE ANY($2) ORDER BY id",
        tenant,
        ["payment_%", "collection_%"],
    )
    assert [(a["action"], a["principal"]) for a in audited] == [
        ("payment_failed", "tally-stripe"),
        ("collection_status_changed", "tally-stripe"),
    ]
    assert len(fake_stripe.requests("POST", "/v1/invoices/*/pay")) == 1
    assert (await push_job(db, invoice.id)).state == "done"


async def test_server_errors_and_dropped_answers_are_retried_by_the_sdk_under_one_key(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    invoice = await finalized(db, tenant, ["5.00", "6.00"])
    fake_stripe.fail_next("/v1/invoices", 500, method="POST")
    fake_stripe.fail_next("/v1/invoices/*/finalize", 409)
    fake_stripe.disconnect_next("/v1/invoiceitems", method="POST")  # ran at Stripe, answer lost
    await push_outbox(db, fake_stripe, Clock(), retries=2).drain()
    assert_stripe_has_exactly(fake_stripe, invoice)
    creates = fake_stripe.requests("POST", "/v1/invoices")
    assert [r.status for r in creates] == [500, 200]
    assert len({r.idempotency_key for r in creates}) == 1
    first_item = [
        r
        for r in fake_stripe.requests("POST", "/v1/invoiceitems")
        if r.params["metadata"]["tally_item"] == "0"
    ]
    assert [(r.status, r.replayed) for r in first_item] == [(None, False), (200, True)]
    assert (await push_job(db, invoice.id)).attempts == 0  # the outbox never saw a failure


async def test_errors_left_after_the_sdks_retries_are_retried_by_the_outbox_with_backoff(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    invoice = await finalized(db, tenant, ["5.00"])
    clock = Clock()
    fake_stripe.fail_next("/v1/invoices", 503, method="POST", times=3)  # the first try and 2 SDK retries
    outbox = push_outbox(db, fake_stripe, clock, retries=2)
    await outbox.drain()
    job = await push_job(db, invoice.id)
    assert (job.state, job.step, job.attempts) == ("pending", "invoice", 1)
    assert job.next_attempt_time == clock.at + timedelta(seconds=5)
    assert "Stripe unavailable" in (job.last_error or "")
    assert fake_stripe.objects("invoice") == []
    clock.advance(timedelta(seconds=5))
    await outbox.drain()
    assert_stripe_has_exactly(fake_stripe, invoice)


async def test_rate_limit_is_backed_off_by_tally_not_retried_by_the_sdk(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    invoice = await finalized(db, tenant, ["5.00"])
    clock = Clock()
    fake_stripe.fail_next("/v1/invoiceitems", 429, method="POST")
    outbox = push_outbox(db, fake_stripe, clock, retries=2)
    await outbox.drain()
    assert len(fake_stripe.requests("POST", "/v1/invoiceitems")) == 1  # the SDK did not retry it
    job = await push_job(db, invoice.id)
    assert (job.step, job.attempts, job.next_attempt_time) == ("items", 1, clock.at + timedelta(seconds=1))
    clock.advance(timedelta(seconds=1))
    await outbox.drain()
    assert_stripe_has_exactly(fake_stripe, invoice)


async def test_a_request_timing_out_is_retried_and_creates_one_invoice(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    invoice = await finalized(db, tenant, ["5.00"])
    clock = Clock()
    # Held after it ran, far past the client's timeout: the client gives up, Stripe has the invoice.
    fake_stripe.delay_next("/v1/invoices", method="POST", after=True)
    outbox = push_outbox(db, fake_stripe, clock, timeout=0.5)
    await outbox.drain()
    fake_stripe.release()
    job = await push_job(db, invoice.id)
    assert (job.step, job.attempts) == ("invoice", 1)
    clock.advance(timedelta(seconds=5))
    await outbox.drain()
    assert_stripe_has_exactly(fake_stripe, invoice)


async def test_a_total_that_differs_at_stripe_stops_the_push_before_finalizing(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    invoice = await finalized(db, tenant, ["5.00", "2.50"])
    outbox = push_outbox(db, fake_stripe, Clock())
    while (await push_job(db, invoice.id)).step != "finalize":
        assert await outbox.run_once()
    # Someone adds an item in Stripe's dashboard meanwhile.
    (remote,) = fake_stripe.objects("invoice")
    fake_stripe.client().v1.invoice_items.create(
        params={"customer": remote["customer"], "invoice": remote["id"], "amount": 100, "currency": "usd"}
    )
    with caplog.at_level(logging.ERROR, logger="server.payments.outbox"):
        await outbox.drain()
    job = await push_job(db, invoice.id)
    assert job.state == "stopped"
    assert job.last_error == (
        f"Stripe's total of {remote['id']} is 850 minor units of USD, Tally's is 750: not finalized at Stripe"
    )
    assert any(job.last_error in record.getMessage() for record in caplog.records)
    assert fake_stripe.get(remote["id"])["status"] == "draft"
    payment = await payments.get(db, invoice.id)
    assert payment is not None and (payment.state, payment.last_failure) == (
        PaymentState.PENDING,
        job.last_error,
    )


async def test_more_than_250_lines_are_grouped_into_at_most_250_items_with_the_same_total(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    amounts = [f"{i % 97}.{i % 100:02d}" for i in range(300)]  # 7 services: grouped per service
    invoice = await finalized(db, tenant, amounts)
    await push_outbox(db, fake_stripe, Clock()).drain()
    (remote,) = fake_stripe.objects("invoice")
    items = fake_stripe.objects("invoiceitem")
    assert len(items) == 7
    assert remote["total"] == int(invoice.total * 100) == sum(item["amount"] for item in items)
    assert remote["status"] == "open"


async def test_two_workers_pushing_together_send_each_request_once(
    db: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    invoices = [await finalized(db, f"tenant-{uuid.uuid4().hex[:12]}", ["1.00", "2.00"]) for _ in range(4)]
    clock = Clock()
    workers = [push_outbox(db, fake_stripe, clock) for _ in range(2)]
    await asyncio.gather(*(w.drain() for w in workers))
    keys = [r.idempotency_key for r in fake_stripe.requests("POST")]
    assert len(keys) == len(set(keys))  # no request sent twice: no job ran on both workers
    assert len(fake_stripe.objects("invoice")) == len(invoices)
    assert len(fake_stripe.objects("invoiceitem")) == 2 * len(invoices)


async def test_a_refused_key_halts_stripe_jobs_and_reports_it_without_retrying(
    db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    invoice = await finalized(db, tenant, ["5.00"])
    other = await finalized(db, f"tenant-{uuid.uuid4().hex[:12]}", ["6.00"])
    refusals: list[str] = []

    async def refused(reason: str) -> None:
        refusals.append(reason)

    fake_stripe.revoke_api_key()
    outbox = push_outbox(db, fake_stripe, Clock(), retries=2, on_auth_failure=refused)
    assert await outbox.drain() == 1  # one job tried, then no more
    assert len(fake_stripe.requests()) == 1  # the SDK does not retry a 401 either
    assert set(outbox.halted) == STRIPE_KINDS
    assert len(refusals) == 1 and refusals[0].startswith("Stripe refused the API key (401)")
    for job in (await push_job(db, invoice.id), await push_job(db, other.id)):
        assert (job.state, job.attempts) == ("pending", 0)


def test_the_pacer_keeps_requests_within_the_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def run() -> None:
        pacer = RequestPacer(25.0, monotonic=lambda: now[0], sleep=sleep)
        for _ in range(75):
            await pacer.wait()

    asyncio.run(run())
    # A second's worth at once, then one every 1/25 s: 75 requests take 2 s.
    assert len(slept) == 50
    assert now[0] == pytest.approx(102.0)


# -- the server, end to end --


@pytest.fixture
def live_clock() -> Clock:
    return Clock(datetime.now(UTC))


@pytest_asyncio.fixture
async def live(
    server_config: Config, fake_stripe: FakeStripe, tmp_path: Path, live_clock: Clock
) -> AsyncIterator[TallyServer]:
    """A Tally server with a Stripe key (from a file), pointed at the fake; its outbox run by the test
    on the server's wall clock, `live_clock`."""
    key_file = tmp_path / "stripe-key"
    key_file.write_text(fake_stripe.api_key + "\n")
    config = dataclasses.replace(
        server_config,
        stripe_api_key_file=key_file,
        stripe_api_base=fake_stripe.url,
        outbox_interval_seconds=0,
    )
    server = TallyServer(config, wall_clock=live_clock)
    await server.start()
    yield server
    await server.stop()


async def test_a_finalized_invoice_reaches_stripe_once_and_its_payment_shows_on_the_invoice(
    live: TallyServer, db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    async with channel_with_token(f"127.0.0.1:{live.port}", make_token()) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        billing = billing_service_pb2_grpc.BillingServiceStub(channel)
        await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="7", time=hour_start(-2)))
        )
        draft = (
            await billing.GenerateInvoice(
                billing_service_pb2.GenerateInvoiceRequest(
                    parent=f"tenants/{tenant}",
                    period_start_time=ts(hour_start(-3)),
                    period_end_time=ts(hour_start(0)),
                )
            )
        ).invoice
        assert not draft.HasField("payment")
        final = (
            await billing.FinalizeInvoice(billing_service_pb2.FinalizeInvoiceRequest(name=draft.name))
        ).invoice
        assert final.payment.state == R.PAYMENT_STATE_PENDING
        assert live.outbox is not None
        await live.outbox.drain()
        await live.outbox.drain()  # nothing more to do: still one of each at Stripe
        shown = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=draft.name))).invoice
    (remote,) = fake_stripe.objects("invoice")
    assert len(fake_stripe.objects("customer")) == 1
    assert remote["total"] == 70 and final.total == "0.70"
    assert [i["amount"] for i in fake_stripe.objects("invoiceitem")] == [70]
    assert shown.payment.state == R.PAYMENT_STATE_FAILED  # the new customer has no card at Stripe
    assert (shown.payment.stripe_invoice_id, shown.payment.attempt_count) == (remote["id"], 1)
    assert shown.payment.last_failure == "Cannot charge a customer that has no active card"


async def test_credit_notes_and_voids_are_mirrored_to_stripe(
    live: TallyServer, live_clock: Clock, db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    assert live.outbox is not None
    async with channel_with_token(f"127.0.0.1:{live.port}", make_token()) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        billing = billing_service_pb2_grpc.BillingServiceStub(channel)
        await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="30", time=hour_start(-2)))
        )
        draft = (
            await billing.GenerateInvoice(
                billing_service_pb2.GenerateInvoiceRequest(
                    parent=f"tenants/{tenant}",
                    period_start_time=ts(hour_start(-3)),
                    period_end_time=ts(hour_start(0)),
                )
            )
        ).invoice
        await billing.FinalizeInvoice(billing_service_pb2.FinalizeInvoiceRequest(name=draft.name))
        # Credited before the push ran: the credit note waits for the invoice to be open at Stripe.
        await billing.CreateCreditNote(
            billing_service_pb2.CreateCreditNoteRequest(invoice=draft.name, amount="1.20", reason="goodwill")
        )
        # A worker that takes the credit note first finds the invoice not yet at Stripe: it waits.
        notes_first = StripePush(fake_stripe.client(), live_clock, attempts=payment_ledger(db, live_clock))
        assert await Outbox(db, {STRIPE_CREDIT_NOTE: notes_first.push_credit_note}, live_clock).drain() == 1
        await live.outbox.drain()
        (remote,) = fake_stripe.objects("invoice")
        assert fake_stripe.objects("credit_note") == []
        live_clock.advance(timedelta(seconds=30))
        await live.outbox.drain()
        (note,) = fake_stripe.objects("credit_note")
        assert (note["invoice"], note["amount"], note["memo"]) == (remote["id"], 120, "goodwill")
        await billing.VoidInvoice(billing_service_pb2.VoidInvoiceRequest(name=draft.name))
        await live.outbox.drain()
        shown = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=draft.name))).invoice
    assert fake_stripe.get(remote["id"])["status"] == "void"
    assert len(fake_stripe.requests("POST", "/v1/invoices/*/void")) == 1
    assert shown.payment.state == R.PAYMENT_STATE_VOID


async def test_a_refused_key_turns_only_the_payments_health_service_not_serving(
    live: TallyServer, db: asyncpg.Pool, fake_stripe: FakeStripe, tenant: str
) -> None:
    await finalized(db, tenant, ["5.00"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{live.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        assert await status(PAYMENTS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        fake_stripe.revoke_api_key()
        assert live.outbox is not None
        await live.outbox.drain()
        assert await status(PAYMENTS_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("") == health_pb2.HealthCheckResponse.SERVING


# -- simulation mode --


async def test_without_a_key_a_finalized_invoice_is_simulated_and_nothing_is_queued(
    tally: TallyServer, usage: Any, billing: Any, db: asyncpg.Pool, tenant: str
) -> None:
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(-2))))
    draft = (
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-3)),
                period_end_time=ts(hour_start(0)),
            )
        )
    ).invoice
    final = (
        await billing.FinalizeInvoice(billing_service_pb2.FinalizeInvoiceRequest(name=draft.name))
    ).invoice
    assert final.payment.state == R.PAYMENT_STATE_SIMULATED and final.payment.stripe_invoice_id == ""
    invoice_id = draft.name.rsplit("/", 1)[1]
    await billing.CreateCreditNote(
        billing_service_pb2.CreateCreditNoteRequest(invoice=draft.name, amount="0.05", reason="x")
    )
    await billing.VoidInvoice(billing_service_pb2.VoidInvoiceRequest(name=draft.name))
    assert (
        await db.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE subject = $1 OR payload->>'invoice_id' = $1", invoice_id
        )
        == 0
    )
    shown = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=draft.name))).invoice
    assert shown.payment.state == R.PAYMENT_STATE_SIMULATED


async def test_simulation_mode_is_announced_by_one_log_line(
    server_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    server = TallyServer(server_config, environ={})
    with caplog.at_level(logging.INFO, logger="server.app"):
        await server.start()
    try:
        lines = [r.getMessage() for r in caplog.records if "simulation mode" in r.getMessage()]
        assert len(lines) == 1 and "TALLY_STRIPE_API_KEY" in lines[0]
        assert server.outbox is not None and server.outbox.halted == {}
    finally:
        await server.stop()
