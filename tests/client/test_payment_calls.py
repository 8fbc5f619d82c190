"""The typed client's collection status and webhook subscriptions against the real server, sync and
async: the values back (payment state on invoices included), typed errors with their reasons, and a
secret that is sent once and never comes back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
import pytest_asyncio

from server.app import TallyServer
from server.domain.access import BILLING_READ, SCOPES
from tally_client import (
    AsyncTallyClient,
    CollectionStatus,
    FailedPreconditionError,
    InvalidArgumentError,
    Invoice,
    InvoicePayment,
    NotFoundError,
    PermissionDeniedError,
    TallyClient,
    UsageEvent,
    WebhookSubscription,
)
from tests.client.conftest import Receiver
from tests.conftest import make_token
from tests.helpers import hour_start

SECRET = "whsec-client-0123456789abcdef"


async def _finalized(client: AsyncTallyClient, tenant: str, hours_ago: int, quantity: str) -> Invoice:
    """A finalized invoice of one hour with `quantity` cpu hours at 0.50."""
    start = hour_start(-hours_ago)
    await client.report_usage(UsageEvent(tenant, "compute", "cpu_hour", Decimal(quantity), event_time=start))
    draft = (await client.generate_invoice(tenant, start, start + timedelta(hours=1))).invoice
    assert (draft.payment, draft.finalize_time, draft.issuer) == (None, None, None)  # drafts have none
    return await client.finalize_invoice(tenant, draft.invoice_id)


async def _payment_fails(
    db: asyncpg.Pool, invoice_id: str, state: str, next_attempt: datetime | None
) -> None:
    """What Stripe's payment_failed (or dunning's last retry) leaves on the invoice's payment.

    There is no public call for it: Stripe's webhooks move it (see tests/test_stripe_webhooks.py).
    """
    await db.execute(
        "UPDATE invoice_payments SET state = $2, attempt_count = 2, next_attempt_time = $3,"
        " last_failure = 'Your card was declined.' WHERE invoice_id = $1",
        invoice_id,
        state,
        next_attempt,
    )


async def test_a_fresh_tenant_is_in_good_standing_and_failed_payments_make_it_past_due_then_delinquent(
    client: AsyncTallyClient, tenant: str, db: asyncpg.Pool
) -> None:
    assert await client.get_collection_status(tenant) == CollectionStatus(
        f"tenants/{tenant}/collectionStatus", tenant, "good_standing", (), (), None
    )
    invoice = await _finalized(client, tenant, 3, "3")
    # No Stripe key on the test server: payment is simulated, nothing sent anywhere.
    assert invoice.payment == InvoicePayment("simulated", 0, None, "", "")
    assert (invoice.kind, invoice.total, invoice.paid_time, invoice.void_time) == (
        "final",
        Decimal("1.50"),
        None,
        None,
    )
    assert invoice.finalize_time is not None and invoice.finalize_time >= invoice.create_time
    assert invoice.customer is not None and invoice.customer.tenant_id == tenant
    assert invoice.issuer is not None and invoice.issuer.name

    retry_at = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    await _payment_fails(db, invoice.invoice_id, "failed", retry_at)
    read = await client.get_invoice(tenant, invoice.invoice_id)
    assert read.payment == InvoicePayment("failed", 2, retry_at, "", "Your card was declined.")
    past_due = await client.get_collection_status(tenant)
    assert (past_due.state, past_due.past_due_invoices, past_due.uncollectible_invoices) == (
        "past_due",
        (invoice.invoice_id,),
        (),
    )

    other = await _finalized(client, tenant, 2, "1")
    await _payment_fails(db, other.invoice_id, "uncollectible", None)
    changed = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    await db.execute(
        "INSERT INTO tenant_collections (tenant_id, state, update_time) VALUES ($1, 'delinquent', $2)",
        tenant,
        changed,
    )
    assert await client.get_collection_status(tenant) == CollectionStatus(
        f"tenants/{tenant}/collectionStatus",
        tenant,
        "delinquent",
        (invoice.invoice_id,),
        (other.invoice_id,),
        changed,
    )
    # Paying by hand (the public path) ends both.
    await client.mark_invoice_paid(tenant, invoice.invoice_id)
    paid = await client.mark_invoice_paid(tenant, other.invoice_id)
    assert paid.paid_time is not None and paid.status == "paid"
    settled = await client.get_collection_status(tenant)
    assert (settled.state, settled.past_due_invoices, settled.uncollectible_invoices) == (
        "good_standing",
        (),
        (),
    )


async def test_collection_status_refuses_a_tenant_the_token_does_not_cover_and_a_malformed_tenant(
    client: AsyncTallyClient, address: str, tenant: str
) -> None:
    async with AsyncTallyClient(address, token=make_token([f"{tenant}-other"], (BILLING_READ,))) as other:
        with pytest.raises(PermissionDeniedError) as denied:
            await other.get_collection_status(tenant)
    assert denied.value.reason == "TENANT_NOT_PERMITTED"
    with pytest.raises(InvalidArgumentError) as malformed:
        await client.get_collection_status("")
    assert [v.field for v in malformed.value.field_violations] == ["name"]


@pytest_asyncio.fixture
async def subscriptions(db: asyncpg.Pool) -> AsyncIterator[list[str]]:
    """Ids of subscriptions to delete after the test, so that later tests' events skip them."""
    ids: list[str] = []
    yield ids
    await db.execute("DELETE FROM webhook_subscriptions WHERE id = ANY($1)", ids)


async def test_a_subscription_is_created_once_per_request_id_read_listed_delivered_to_and_deleted(
    client: AsyncTallyClient,
    tally: TallyServer,
    tenant: str,
    db: asyncpg.Pool,
    receiver: Receiver,
    subscriptions: list[str],
) -> None:
    request_id = uuid.uuid4().hex
    created = await client.create_webhook_subscription(
        receiver.url,
        SECRET,
        ["invoice.finalized", "invoice.paid"],
        description="billing",
        request_id=request_id,
    )
    subscriptions.append(created.subscription_id)
    assert created.name == f"webhookSubscriptions/{created.subscription_id}"
    assert created.subscription_id.startswith("ws_")
    assert (created.url, created.event_types, created.description) == (
        receiver.url,
        ("invoice.finalized", "invoice.paid"),
        "billing",
    )
    assert SECRET not in repr(created)  # sent, stored to sign with, never returned
    assert await db.fetchval(
        "SELECT secret FROM webhook_subscriptions WHERE id = $1", created.subscription_id
    ) == (SECRET)
    resent = await client.create_webhook_subscription(
        receiver.url,
        SECRET,
        ["invoice.finalized", "invoice.paid"],
        description="billing",
        request_id=request_id,
    )
    assert resent == created
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions WHERE url = $1", receiver.url) == 1
    with pytest.raises(FailedPreconditionError) as reused:  # the same request id for another subscription
        await client.create_webhook_subscription(
            receiver.url, SECRET, ["invoice.paid"], request_id=request_id
        )
    assert reused.value.reason == "REQUEST_ID_REUSED"

    assert await client.get_webhook_subscription(created.subscription_id) == created
    assert await client.get_webhook_subscription(created.name) == created
    listed = [s async for s in client.list_webhook_subscriptions(page_size=1)]  # a page per subscription
    assert [s for s in listed if s.name == created.name] == [created]
    assert [s.create_time for s in listed] == sorted(s.create_time for s in listed)  # oldest first
    assert [d async for d in client.list_webhook_deliveries(created.name)] == []

    invoice = await _finalized(client, tenant, 3, "2")
    assert tally.outbox is not None
    await tally.outbox.drain()  # the session server's worker does not poll: tests drive it
    [delivery] = [d async for d in client.list_webhook_deliveries(created.subscription_id)]
    assert delivery.name.startswith(f"{created.name}/deliveries/")
    assert (delivery.event_type, delivery.state, delivery.attempt_count) == (
        "invoice.finalized",
        "delivered",
        1,
    )
    assert [(a.status_code, a.error) for a in delivery.attempts] == [(200, "")]
    assert delivery.next_attempt_time is None
    assert delivery.deliver_time is not None and delivery.deliver_time >= delivery.create_time
    assert delivery.expire_time == delivery.create_time + timedelta(days=3)
    [body] = receiver.bodies
    assert invoice.name.encode() in body and delivery.event_id.encode() in body

    await client.delete_webhook_subscription(created.subscription_id)
    for call in (
        client.get_webhook_subscription(created.name),
        client.delete_webhook_subscription(created.name),
        anext(client.list_webhook_deliveries(created.name)),
    ):
        with pytest.raises(NotFoundError) as missing:
            await call
        assert missing.value.reason == "WEBHOOK_SUBSCRIPTION_NOT_FOUND"


async def test_bad_subscriptions_and_tokens_without_notifications_admin_are_refused_with_reasons(
    client: AsyncTallyClient, address: str, tenant: str, db: asyncpg.Pool
) -> None:
    before = await db.fetchval("SELECT count(*) FROM webhook_subscriptions")
    with pytest.raises(InvalidArgumentError) as bad:
        await client.create_webhook_subscription(
            "ftp://hooks.example/x", "short", ["invoice.paid", "invoice.eaten"]
        )
    assert {v.field for v in bad.value.field_violations} == {
        "webhook_subscription.url",
        "webhook_subscription.secret",
        "webhook_subscription.event_types[1]",
    }
    with pytest.raises(TypeError, match="not one string"):
        await client.create_webhook_subscription("https://hooks.example/x", SECRET, "invoice.paid")
    no_admin = tuple(scope for scope in SCOPES if scope != "notifications:admin")
    one_tenant = make_token([tenant], SCOPES)
    for token, reason in (
        (make_token(scopes=no_admin), "SCOPE_MISSING"),
        (one_tenant, "ALL_TENANTS_REQUIRED"),
    ):
        async with AsyncTallyClient(address, token=token) as limited:
            with pytest.raises(PermissionDeniedError) as denied:
                await limited.create_webhook_subscription("https://hooks.example/x", SECRET, ["invoice.paid"])
            assert denied.value.reason == reason
            with pytest.raises(PermissionDeniedError):
                [s async for s in limited.list_webhook_subscriptions()]
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions") == before


async def test_the_blocking_client_makes_the_same_calls(address: str, tenant: str, db: asyncpg.Pool) -> None:
    url = f"https://hooks.example/{uuid.uuid4().hex}"

    def script() -> tuple[str, WebhookSubscription, list[WebhookSubscription], list[object], str]:
        with TallyClient(address, token=make_token()) as sync:
            standing = sync.get_collection_status(tenant).state
            created = sync.create_webhook_subscription(url, SECRET, ["threshold.crossed"])
            listed = [s for s in sync.list_webhook_subscriptions() if s.url == url]
            deliveries: list[object] = list(sync.list_webhook_deliveries(created.subscription_id))
            sync.delete_webhook_subscription(created.name)
            try:
                sync.get_webhook_subscription(created.subscription_id)
            except NotFoundError as exc:
                return standing, created, listed, deliveries, exc.reason
            raise AssertionError("a deleted subscription was found")

    standing, created, listed, deliveries, reason = await asyncio.to_thread(script)
    assert (standing, listed, deliveries, reason) == (
        "good_standing",
        [created],
        [],
        "WEBHOOK_SUBSCRIPTION_NOT_FOUND",
    )
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions WHERE url = $1", url) == 0
