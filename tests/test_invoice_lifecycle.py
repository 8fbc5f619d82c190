"""The invoice lifecycle through the service: finalize, void, paid, uncollectible, numbers, credit notes.

Numbers are checked against the sequence rows and the invoices stored, and concurrent
finalizations run through two Tally servers on one database, as two `tally serve`
processes would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from server.app import TallyServer
from server.config import Config
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc, resources_pb2, usage_service_pb2
from tests.conftest import make_token
from tests.helpers import channel_with_token, error_info, event, hour_start, ts

Code = grpc.StatusCode
Billing = billing_service_pb2_grpc.BillingServiceStub
S = resources_pb2


async def draft(usage: Any, billing: Billing, tenant: str, quantity: str = "5") -> resources_pb2.Invoice:
    """A draft for the last three hours with `quantity` uploads (0.10 each)."""
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity=quantity, time=hour_start(-2)))
    )
    response = await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{tenant}",
            period_start_time=ts(hour_start(-3)),
            period_end_time=ts(hour_start(0)),
        )
    )
    return response.invoice


def finalize(billing: Billing, name: str, request_id: str = "") -> Awaitable[Any]:
    return billing.FinalizeInvoice(
        billing_service_pb2.FinalizeInvoiceRequest(name=name, request_id=request_id)
    )


MOVES: dict[str, Callable[[Billing, str], Awaitable[Any]]] = {
    "finalized": lambda b, n: finalize(b, n),
    "void": lambda b, n: b.VoidInvoice(billing_service_pb2.VoidInvoiceRequest(name=n)),
    "paid": lambda b, n: b.MarkInvoicePaid(billing_service_pb2.MarkInvoicePaidRequest(name=n)),
    "uncollectible": lambda b, n: b.MarkInvoiceUncollectible(
        billing_service_pb2.MarkInvoiceUncollectibleRequest(name=n)
    ),
}
# Paths from a draft to each status, through the RPCs.
PATHS = {
    "draft": [],
    "finalized": ["finalized"],
    "paid": ["finalized", "paid"],
    "void": ["void"],
    "uncollectible": ["finalized", "uncollectible"],
}
ALLOWED = {
    ("draft", "finalized"),
    ("draft", "void"),
    ("finalized", "paid"),
    ("finalized", "void"),
    ("finalized", "uncollectible"),
    ("uncollectible", "paid"),
    ("uncollectible", "void"),
}
STATUS = {
    "draft": S.INVOICE_STATUS_DRAFT,
    "finalized": S.INVOICE_STATUS_FINALIZED,
    "paid": S.INVOICE_STATUS_PAID,
    "void": S.INVOICE_STATUS_VOID,
    "uncollectible": S.INVOICE_STATUS_UNCOLLECTIBLE,
}


async def test_finalized_invoice_is_numbered_and_shows_issuer_and_customer(
    usage: Any, billing: Billing, tenant: str
) -> None:
    invoice = (await finalize(billing, (await draft(usage, billing, tenant)).name)).invoice
    assert invoice.status == S.INVOICE_STATUS_FINALIZED
    year = datetime.now(UTC).year
    assert re.fullmatch(rf"TALLY-{year}-\d{{6}}", invoice.number), invoice.number
    assert invoice.total == "0.50"
    assert invoice.issuer.name == "Tally"
    assert (invoice.customer.tenant_id, invoice.customer.name) == (tenant, tenant)  # no profile: the id
    assert invoice.HasField("finalize_time")
    assert invoice.compute_time == invoice.finalize_time


async def test_finalized_invoice_never_changes(
    usage: Any, billing: Billing, db: asyncpg.Pool, tenant: str
) -> None:
    invoice = (await finalize(billing, (await draft(usage, billing, tenant)).name)).invoice
    # More usage for its period, and a regeneration: the finalized invoice stays as it was.
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(-2))))
    again = await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{tenant}",
            period_start_time=ts(hour_start(-3)),
            period_end_time=ts(hour_start(0)),
        )
    )
    assert not again.created and again.invoice == invoice
    got = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=invoice.name))).invoice
    assert got == invoice and got.total == "0.50"
    # The database itself refuses to change it.
    invoice_id = invoice.name.rsplit("/", 1)[1]
    with pytest.raises(asyncpg.RaiseError, match="finalized"):
        await db.execute("UPDATE invoices SET total = 0 WHERE id = $1", invoice_id)
    with pytest.raises(asyncpg.RaiseError, match="finalized"):
        await db.execute("DELETE FROM invoice_line_items WHERE invoice_id = $1", invoice_id)


@pytest.mark.parametrize("start", list(PATHS))
@pytest.mark.parametrize("target", ["finalized", "void", "paid", "uncollectible"])
async def test_each_status_allows_exactly_its_transitions(
    usage: Any, billing: Billing, db: asyncpg.Pool, tenant: str, start: str, target: str
) -> None:
    name = (await draft(usage, billing, tenant)).name
    for step in PATHS[start]:
        await MOVES[step](billing, name)
    before = await db.fetchrow(
        "SELECT status, number, total FROM invoices WHERE id = $1", name.rsplit("/", 1)[1]
    )
    audit_before = await db.fetchval("SELECT count(*) FROM audit_events WHERE tenant_id = $1", tenant)
    if (start, target) in ALLOWED:
        invoice = (await MOVES[target](billing, name)).invoice
        assert invoice.status == STATUS[target]
        assert (
            await db.fetchval("SELECT count(*) FROM audit_events WHERE tenant_id = $1", tenant)
            == audit_before + 1
        )
        return
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await MOVES[target](billing, name)
    assert raised.value.code() == Code.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info is not None and info.reason == "INVOICE_STATUS_INVALID"
    assert (info.metadata["status"], info.metadata["requestedStatus"]) == (start, target)
    after = await db.fetchrow(
        "SELECT status, number, total FROM invoices WHERE id = $1", name.rsplit("/", 1)[1]
    )
    assert after == before
    assert await db.fetchval("SELECT count(*) FROM audit_events WHERE tenant_id = $1", tenant) == audit_before


async def test_every_transition_is_audited_with_before_and_after(
    usage: Any, billing: Billing, tenant: str
) -> None:
    name = (await draft(usage, billing, tenant)).name
    await finalize(billing, name)
    await MOVES["uncollectible"](billing, name)
    await MOVES["paid"](billing, name)
    events = (
        await billing.ListAuditEvents(billing_service_pb2.ListAuditEventsRequest(tenant_id=tenant))
    ).audit_events
    actions = [e.action for e in events]
    assert actions == [
        S.AUDIT_ACTION_INVOICE_CREATED,
        S.AUDIT_ACTION_INVOICE_FINALIZED,
        S.AUDIT_ACTION_INVOICE_UNCOLLECTIBLE,
        S.AUDIT_ACTION_INVOICE_PAID,
    ]
    finalized = events[1]
    assert finalized.before["status"] == "draft" and finalized.after["status"] == "finalized"
    assert finalized.after["number"].startswith("TALLY-")
    assert (events[3].before["status"], events[3].after["status"]) == ("uncollectible", "paid")
    assert all(e.principal == "test-service" and e.request_id for e in events)


async def test_retried_finalize_is_answered_once(
    usage: Any, billing: Billing, db: asyncpg.Pool, tenant: str
) -> None:
    name = (await draft(usage, billing, tenant)).name
    key = uuid.uuid4().hex
    first, second = await finalize(billing, name, key), await finalize(billing, name, key)
    assert first == second
    assert (
        await db.fetchval(
            "SELECT count(*) FROM audit_events WHERE tenant_id = $1 AND action = 'invoice_finalized'", tenant
        )
        == 1
    )


async def test_credit_notes_credit_up_to_the_total_and_are_numbered(
    usage: Any, billing: Billing, tenant: str
) -> None:
    name = (await draft(usage, billing, tenant, quantity="12.5")).name  # 1.25

    def credit(amount: str, reason: str = "goodwill") -> Awaitable[Any]:
        return billing.CreateCreditNote(
            billing_service_pb2.CreateCreditNoteRequest(invoice=name, amount=amount, reason=reason)
        )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credit("0.25")  # a draft cannot be credited
    assert raised.value.code() == Code.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "INVOICE_STATUS_INVALID"  # type: ignore[union-attr]
    await finalize(billing, name)
    first = (await credit("1.00")).credit_note
    assert (first.amount, first.currency_code, first.invoice, first.reason) == (
        "1.00",
        "USD",
        name,
        "goodwill",
    )
    assert re.fullmatch(rf"TALLY-CN-{datetime.now(UTC).year}-\d{{6}}", first.number)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credit("0.26")
    assert raised.value.code() == Code.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info is not None and (info.reason, info.metadata["creditable"]) == (
        "CREDIT_EXCEEDS_INVOICE",
        "0.25",
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credit("0.001")  # finer than a cent
    assert raised.value.code() == Code.INVALID_ARGUMENT
    second = (await credit("0.25", "rest")).credit_note
    assert int(second.number[-6:]) == int(first.number[-6:]) + 1 or second.number[:-6] == first.number[:-6]
    listed = await billing.ListCreditNotes(
        billing_service_pb2.ListCreditNotesRequest(parent=f"tenants/{tenant}")
    )
    assert [n.amount for n in listed.credit_notes] == ["1.00", "0.25"]


async def test_rate_change_inside_a_finalized_period_is_refused(
    usage: Any, billing: Billing, tenant: str
) -> None:
    kind = f"t_{uuid.uuid4().hex[:10]}"
    await billing.SetRate(
        billing_service_pb2.SetRateRequest(service="metered", usage_type=kind, unit_price="1")
    )
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(
            event=event(tenant, service="metered", usage_type=kind, quantity="2", time=hour_start(-2))
        )
    )
    name = (
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-3)),
                period_end_time=ts(hour_start(0)),
            )
        )
    ).invoice.name
    await finalize(billing, name)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.SetRate(
            billing_service_pb2.SetRateRequest(
                service="metered",
                usage_type=kind,
                unit_price="3",
                effective_time=ts(hour_start(-1)),
                reprice_past_usage=True,
            )
        )
    assert raised.value.code() == Code.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info is not None and (info.reason, info.metadata["invoice"]) == ("PERIOD_FINALIZED", name)
    # After the period, the change is fine.
    await billing.SetRate(
        billing_service_pb2.SetRateRequest(
            service="metered", usage_type=kind, unit_price="3", effective_time=ts(hour_start(1))
        )
    )


async def test_voided_invoice_frees_its_period(usage: Any, billing: Billing, tenant: str) -> None:
    name = (await draft(usage, billing, tenant)).name
    await finalize(billing, name)
    await MOVES["void"](billing, name)
    again = await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{tenant}",
            period_start_time=ts(hour_start(-3)),
            period_end_time=ts(hour_start(0)),
        )
    )
    assert again.created and again.invoice.name != name and again.invoice.total == "0.50"


async def test_concurrent_finalizations_on_two_servers_take_every_number_once(
    server_config: Config, usage: Any, billing: Billing, db: asyncpg.Pool
) -> None:
    issuer = f"issuer-{uuid.uuid4().hex[:8]}"  # a sequence of this test's own
    config = dataclasses.replace(server_config, issuer_name=issuer, period_close_interval_seconds=0)
    servers = [TallyServer(config), TallyServer(config)]
    for server in servers:
        await server.start()
    try:
        tenants = [f"tenant-{uuid.uuid4().hex[:16]}" for _ in range(16)]
        names = [(await draft(usage, billing, t)).name for t in tenants]
        token = make_token()
        async with (
            channel_with_token(f"127.0.0.1:{servers[0].port}", token) as one,
            channel_with_token(f"127.0.0.1:{servers[1].port}", token) as two,
        ):
            stubs = [Billing(one), Billing(two)]
            results = await asyncio.gather(*(finalize(stubs[i % 2], name) for i, name in enumerate(names)))
    finally:
        for server in servers:
            await server.stop()
    numbers = sorted(int(r.invoice.number[-6:]) for r in results)
    assert numbers == list(range(1, len(names) + 1))  # no gap, no repeat
    prefix = results[0].invoice.number[:-6]
    assert await db.fetchval(
        "SELECT last_number FROM document_sequences WHERE issuer = $1 AND prefix = $2", issuer, prefix
    ) == len(names)


async def test_finalize_time_and_numbers_follow_the_injected_clock(
    server_config: Config, usage: Any, billing: Billing, tenant: str
) -> None:
    later = datetime(2031, 1, 1, 12, tzinfo=UTC) + timedelta(hours=1)
    config = dataclasses.replace(
        server_config, issuer_name=f"issuer-{uuid.uuid4().hex[:8]}", period_close_interval_seconds=0
    )
    server = TallyServer(config, wall_clock=lambda: int(later.timestamp() * 1_000_000))
    name = (await draft(usage, billing, tenant)).name
    await server.start()
    try:
        async with channel_with_token(f"127.0.0.1:{server.port}", make_token()) as chan:
            invoice = (await finalize(Billing(chan), name)).invoice
    finally:
        await server.stop()
    assert invoice.number == "TALLY-2031-000001"
    assert invoice.finalize_time.ToDatetime(tzinfo=UTC) == later
