"""`tally collection-status`, `tally webhooks ...` and the payment state in `tally invoices show`,
against the real server: what they print (tables and JSON), their exit status, what the database holds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest_asyncio

from server.app import TallyServer
from server.domain.access import SCOPES
from tally_client.cli.parser import WEBHOOK_EVENT_TYPES
from tests.client.conftest import Receiver, Tally
from tests.client.test_cli import iso
from tests.client.test_cli_billing import cells
from tests.conftest import make_token

SECRET = "whsec-cli-0123456789abcdef"


@pytest_asyncio.fixture
async def secret_path(tmp_path: Path) -> Path:
    path = tmp_path / "webhook-secret"
    path.write_text(SECRET + "\n")  # as `echo` writes it: the line end is not part of the secret
    return path


@pytest_asyncio.fixture
async def urls(db: asyncpg.Pool) -> AsyncIterator[list[str]]:
    """URLs whose subscriptions are deleted after the test, so that later tests' events skip them."""
    made: list[str] = []
    yield made
    await db.execute("DELETE FROM webhook_subscriptions WHERE url = ANY($1)", made)


async def test_collection_status_prints_a_fresh_tenant_in_good_standing_and_then_past_due(
    cli: Tally, tenant: str, db: asyncpg.Pool
) -> None:
    fresh = await cli("collection-status", tenant, "-o", "json")
    assert fresh.code == 0, fresh.err
    assert json.loads(fresh.out) == {
        "name": f"tenants/{tenant}/collectionStatus",
        "tenant_id": tenant,
        "state": "good_standing",
        "past_due_invoices": [],
        "uncollectible_invoices": [],
        "update_time": None,
    }
    table = await cli("collection-status", tenant)
    assert cells(table.out, tenant)[:2] == [tenant, "good_standing"]

    await cli(
        "report", "--tenant", tenant, "--event-id", "p-1", *("--service", "compute"),
        *("--usage-type", "cpu_hour", "--quantity", "2", "--time", iso(-2, 1)),
    )  # fmt: skip
    generated = await cli("invoices", "generate", "--tenant", tenant, "--start", iso(-2), "--end", iso(-1))
    name = generated.out.splitlines()[0].removeprefix("created ")
    invoice_id = name.rsplit("/", 1)[1]
    draft = json.loads((await cli("invoices", "show", name, "-o", "json")).out)
    assert (draft["payment"], draft["kind"], draft["finalize_time"]) == (None, "final", None)
    finalized = await cli("invoices", "finalize", name, "-o", "json")
    assert json.loads(finalized.out)["payment"]["state"] == "simulated"  # no Stripe key on the test server

    # What Stripe's payment_failed leaves (no public call makes it: see tests/test_stripe_webhooks.py).
    await db.execute(
        "UPDATE invoice_payments SET state = 'failed', attempt_count = 1,"
        " last_failure = 'Your card was declined.' WHERE invoice_id = $1",
        invoice_id,
    )
    shown = await cli("invoices", "show", invoice_id, "--tenant", tenant)
    assert shown.code == 0, shown.err
    assert cells(shown.out, "declined") == ["failed", "1", "", "", "Your card was declined."]
    payment = json.loads((await cli("invoices", "show", name, "-o", "json")).out)["payment"]
    assert payment == {
        "state": "failed",
        "attempt_count": 1,
        "next_attempt_time": None,
        "stripe_invoice_id": "",
        "last_failure": "Your card was declined.",
    }
    past_due = json.loads((await cli("collection-status", tenant, "-o", "json")).out)
    assert (past_due["state"], past_due["past_due_invoices"]) == ("past_due", [invoice_id])
    assert cells((await cli("collection-status", tenant)).out, tenant)[1:3] == ["past_due", invoice_id]

    denied = await cli("collection-status", tenant, token=make_token([f"{tenant}-other"], SCOPES))
    assert denied.code == 1
    assert denied.err.startswith("tally: PERMISSION_DENIED (TENANT_NOT_PERMITTED)")


async def test_webhooks_create_list_deliveries_and_delete_never_print_the_secret(
    cli: Tally, secret_path: Path, db: asyncpg.Pool, urls: list[str]
) -> None:
    url = f"https://hooks.example/{secret_path.parent.name}"
    urls.append(url)
    created_run = await cli(
        "webhooks", "create", "--url", url, "--secret-file", str(secret_path),
        "--event", "invoice.paid", "--event", "threshold.crossed", "--description", "cli", "-o", "json",
    )  # fmt: skip
    assert created_run.code == 0, created_run.err
    created = json.loads(created_run.out)
    assert (created["url"], created["event_types"], created["description"]) == (
        url,
        ["invoice.paid", "threshold.crossed"],
        "cli",
    )
    assert "secret" not in created and SECRET not in created_run.out
    subscription_id = created["subscription_id"]
    assert created["name"] == f"webhookSubscriptions/{subscription_id}"
    # The file's line end was not sent as part of the secret.
    assert await db.fetchval("SELECT secret FROM webhook_subscriptions WHERE url = $1", url) == SECRET

    listed = json.loads((await cli("webhooks", "list", "-o", "json")).out)
    assert [s for s in listed if s["url"] == url] == [created]
    table = await cli("webhooks", "list")
    assert cells(table.out, subscription_id)[:3] == [subscription_id, url, "invoice.paid, threshold.crossed"]
    assert SECRET not in table.out

    deliveries = await cli("webhooks", "deliveries", created["name"], "-o", "json")
    assert (deliveries.code, json.loads(deliveries.out)) == (0, [])

    deleted = await cli("webhooks", "delete", subscription_id)
    assert (deleted.code, deleted.out) == (0, f"deleted webhookSubscriptions/{subscription_id}\n")
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions WHERE url = $1", url) == 0
    again = await cli("webhooks", "delete", subscription_id, "-o", "json")
    assert again.code == 1
    assert again.err.startswith("tally: NOT_FOUND (WEBHOOK_SUBSCRIPTION_NOT_FOUND)")


async def test_webhooks_create_refuses_a_bad_subscription_an_unreadable_secret_and_a_token_without_the_scope(
    cli: Tally, secret_path: Path, tmp_path: Path, db: asyncpg.Pool
) -> None:
    before = await db.fetchval("SELECT count(*) FROM webhook_subscriptions")
    bad = await cli(
        "webhooks", "create", "--url", "ftp://hooks.example/x", "--secret-file", str(secret_path),
        "--event", "invoice.eaten",
    )  # fmt: skip
    assert bad.code == 1
    assert bad.err.startswith("tally: INVALID_ARGUMENT")
    assert "webhook_subscription.url:" in bad.err and "webhook_subscription.event_types[0]:" in bad.err
    missing = await cli(
        "webhooks", "create", "--url", "https://hooks.example/x",
        "--secret-file", str(tmp_path / "absent"), "--event", "invoice.paid",
    )  # fmt: skip
    assert missing.code == 2 and "--secret-file" in missing.err
    no_admin = make_token(scopes=tuple(s for s in SCOPES if s != "notifications:admin"))
    denied = await cli("webhooks", "list", token=no_admin)
    assert denied.code == 1
    assert denied.err.startswith("tally: PERMISSION_DENIED (SCOPE_MISSING)")
    assert await db.fetchval("SELECT count(*) FROM webhook_subscriptions") == before


async def test_webhooks_deliveries_prints_each_delivery_with_its_state_and_last_status(
    cli: Tally, tally: TallyServer, tenant: str, secret_path: Path, receiver: Receiver, urls: list[str]
) -> None:
    urls.append(receiver.url)
    created = await cli(
        "webhooks", "create", "--url", receiver.url, "--secret-file", str(secret_path),
        "--event", "invoice.finalized", "-o", "json",
    )  # fmt: skip
    name = json.loads(created.out)["name"]
    await cli(
        "report", "--tenant", tenant, "--event-id", "w-1", *("--service", "compute"),
        *("--usage-type", "cpu_hour", "--quantity", "1", "--time", iso(-2, 1)),
    )  # fmt: skip
    generated = await cli("invoices", "generate", "--tenant", tenant, "--start", iso(-2), "--end", iso(-1))
    invoice = generated.out.splitlines()[0].removeprefix("created ")
    assert (await cli("invoices", "finalize", invoice)).code == 0
    assert tally.outbox is not None
    await tally.outbox.drain()  # the session server's worker does not poll: tests drive it

    [delivery] = json.loads((await cli("webhooks", "deliveries", name, "-o", "json")).out)
    assert (delivery["event_type"], delivery["state"], delivery["attempt_count"]) == (
        "invoice.finalized",
        "delivered",
        1,
    )
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
    table = await cli("webhooks", "deliveries", name.removeprefix("webhookSubscriptions/"))
    row = cells(table.out, delivery["event_id"])
    assert row[:6] == [
        delivery["name"].rsplit("/", 1)[1],
        "invoice.finalized",
        delivery["event_id"],
        "delivered",
        "1",
        "200",
    ]
    assert [invoice.encode() in body for body in receiver.bodies] == [True]


def test_the_event_types_offered_are_those_the_proto_documents() -> None:
    proto = Path(__file__).parents[2] / "protos" / "tally" / "v1" / "notification_service.proto"
    documented = proto.read_text().split("repeated string event_types")[0].rsplit("// The event types", 1)[1]
    assert [t for t in WEBHOOK_EVENT_TYPES if f'"{t}"' in documented] == list(WEBHOOK_EVENT_TYPES)
