"""BillingService: the rate card, rate changes over time, and invoices to the cent."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import grpc
import pytest

from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.helpers import current_hour, event, field_violations, hour_start, server_page_tokens, ts

DEFAULT_RATES = {
    ("marketplace", "wpk_upload"): "0.10",
    ("marketplace", "wpk_review"): "0.05",
    ("analytics", "query"): "0.01",
    ("analytics", "report"): "0.25",
    ("storage", "gb_hour"): "0.02",
    ("compute", "cpu_hour"): "0.50",
    ("compute", "memory_gb_hour"): "0.10",
}


async def report(usage: usage_service_pb2_grpc.UsageServiceStub, *events) -> None:  # type: ignore[no-untyped-def]
    for e in events:
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=e))


def generate_request(tenant: str, start, end) -> billing_service_pb2.GenerateInvoiceRequest:  # type: ignore[no-untyped-def]
    return billing_service_pb2.GenerateInvoiceRequest(
        parent=f"tenants/{tenant}", period_start_time=ts(start), period_end_time=ts(end)
    )


def new_usage_type() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


async def test_fresh_rate_card_holds_the_default_rates_in_usd(
    billing: billing_service_pb2_grpc.BillingServiceStub,
) -> None:
    rates = (await billing.ListRates(billing_service_pb2.ListRatesRequest(page_size=1000))).rates
    found = {(r.service, r.usage_type): (r.unit_price, r.currency_code) for r in rates}
    for key, price in DEFAULT_RATES.items():
        assert found[key] == (price, "USD")


async def test_seed_example_five_uploads_cost_fifty_cents(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    tenant: str,
) -> None:
    start = hour_start(-3)
    await report(
        usage, *[event(tenant, f"u{i}", quantity="1.0", time=start + timedelta(minutes=i)) for i in range(5)]
    )
    response = await billing.GenerateInvoice(generate_request(tenant, start, hour_start(0)))
    invoice = response.invoice
    assert response.created
    assert invoice.total == "0.50" and invoice.currency_code == "USD"
    assert [
        (li.service, li.usage_type, li.quantity, li.unit_price, li.amount, li.event_count)
        for li in invoice.line_items
    ] == [("marketplace", "wpk_upload", "5", "0.10", "0.50", 5)]
    assert invoice.status == resources_pb2.INVOICE_STATUS_DRAFT


async def test_line_amounts_round_half_away_from_zero_and_total_is_their_sum(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    tenant: str,
) -> None:
    start = hour_start(-10)
    await report(
        usage,
        event(
            tenant, "q", service="analytics", usage_type="query", quantity="0.5", time=start
        ),  # 0.005 -> 0.01
        event(
            tenant, "s", service="storage", usage_type="gb_hour", quantity="0.125", time=start
        ),  # 0.0025 -> 0.00
        event(
            tenant, "c", service="compute", usage_type="cpu_hour", quantity="1.001", time=start
        ),  # 0.5005 -> 0.50
        event(
            tenant, "r", service="analytics", usage_type="report", quantity="0.03", time=start
        ),  # 0.0075 -> 0.01
    )
    invoice = (
        await billing.GenerateInvoice(generate_request(tenant, start, start + timedelta(hours=1)))
    ).invoice
    amounts = {(li.service, li.usage_type): li.amount for li in invoice.line_items}
    assert amounts == {
        ("analytics", "query"): "0.01",
        ("analytics", "report"): "0.01",
        ("compute", "cpu_hour"): "0.50",
        ("storage", "gb_hour"): "0.00",
    }
    assert invoice.total == "0.52"


async def test_rate_change_applies_from_its_effective_hour_only(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    tenant: str,
) -> None:
    kind = new_usage_type()
    start = hour_start(-6)
    first = await billing.SetRate(
        billing_service_pb2.SetRateRequest(service="metered", usage_type=kind, unit_price="1.5")
    )
    assert first.rate.effective_time.seconds == 0  # a new usage type's first rate covers all its usage
    await billing.SetRate(
        billing_service_pb2.SetRateRequest(
            service="metered",
            usage_type=kind,
            unit_price="2.25",
            effective_time=ts(start + timedelta(hours=2)),
            reprice_past_usage=True,
        )
    )
    await report(
        usage,
        event(
            tenant,
            "before",
            service="metered",
            usage_type=kind,
            quantity="2",
            time=start + timedelta(minutes=59, hours=1),
        ),
        event(
            tenant, "after", service="metered", usage_type=kind, quantity="4", time=start + timedelta(hours=2)
        ),
    )
    invoice = (await billing.GenerateInvoice(generate_request(tenant, start, hour_start(0)))).invoice
    assert [(li.unit_price, li.quantity, li.amount) for li in invoice.line_items] == [
        ("1.50", "2", "3.00"),
        ("2.25", "4", "9.00"),
    ]
    assert invoice.total == "12.00"

    history = await billing.ListRates(billing_service_pb2.ListRatesRequest(show_history=True, page_size=1000))
    assert [r.unit_price for r in history.rates if r.usage_type == kind] == ["1.50", "2.25"]
    then = await billing.ListRates(billing_service_pb2.ListRatesRequest(as_of_time=ts(start), page_size=1000))
    assert [r.unit_price for r in then.rates if r.usage_type == kind] == ["1.50"]
    now = await billing.ListRates(billing_service_pb2.ListRatesRequest(page_size=1000))
    assert [r.unit_price for r in now.rates if r.usage_type == kind] == ["2.25"]


async def test_changing_a_known_rate_defaults_to_the_next_hour(
    billing: billing_service_pb2_grpc.BillingServiceStub,
) -> None:
    kind = new_usage_type()
    await billing.SetRate(
        billing_service_pb2.SetRateRequest(service="metered", usage_type=kind, unit_price="1")
    )
    before = current_hour()
    changed = await billing.SetRate(
        billing_service_pb2.SetRateRequest(service="metered", usage_type=kind, unit_price="3")
    )
    after = current_hour()  # the server's clock may have crossed an hour since `before`
    effective = changed.rate.effective_time.ToDatetime(tzinfo=UTC)
    assert effective in {before + timedelta(hours=1), after + timedelta(hours=1)}


async def test_event_before_the_first_rate_of_its_type_is_rejected(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    tenant: str,
) -> None:
    kind = new_usage_type()
    await billing.SetRate(
        billing_service_pb2.SetRateRequest(
            service="metered",
            usage_type=kind,
            unit_price="1",
            effective_time=ts(hour_start(-1)),
            reprice_past_usage=True,
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await report(usage, event(tenant, service="metered", usage_type=kind, time=hour_start(-2)))
    assert "event.event_time" in field_violations(raised.value)
    await report(usage, event(tenant, service="metered", usage_type=kind, time=hour_start(-1)))


async def test_past_effective_time_without_reprice_flag_is_refused_and_writes_nothing(
    billing: billing_service_pb2_grpc.BillingServiceStub, db: asyncpg.Pool
) -> None:
    kind = new_usage_type()
    await billing.SetRate(
        billing_service_pb2.SetRateRequest(service="metered", usage_type=kind, unit_price="1")
    )
    rates_before = await db.fetch(
        "SELECT effective_from, unit_price FROM rates WHERE usage_type = $1 ORDER BY 1", kind
    )
    audit_before = await db.fetchval(
        "SELECT count(*) FROM audit_events WHERE resource LIKE $1", f"%/{kind}/%"
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.SetRate(
            billing_service_pb2.SetRateRequest(
                service="metered", usage_type=kind, unit_price="5", effective_time=ts(hour_start(-1))
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "re-price usage already reported" in field_violations(raised.value)["effective_time"]
    assert (
        await db.fetch("SELECT effective_from, unit_price FROM rates WHERE usage_type = $1 ORDER BY 1", kind)
        == rates_before
    )
    assert (
        await db.fetchval("SELECT count(*) FROM audit_events WHERE resource LIKE $1", f"%/{kind}/%")
        == audit_before
    )


async def test_repricing_past_usage_on_request_changes_the_invoice_and_is_audited(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    db: asyncpg.Pool,
    tenant: str,
) -> None:
    kind = new_usage_type()
    await billing.SetRate(
        billing_service_pb2.SetRateRequest(service="metered", usage_type=kind, unit_price="1")
    )
    await report(usage, event(tenant, service="metered", usage_type=kind, quantity="3", time=hour_start(-2)))
    repriced = await billing.SetRate(
        billing_service_pb2.SetRateRequest(
            service="metered",
            usage_type=kind,
            unit_price="1.10",
            effective_time=ts(hour_start(-2)),
            reprice_past_usage=True,
        ),
        metadata=(("x-request-id", f"reprice-{kind}"),),
    )
    assert repriced.rate.effective_time.ToDatetime() == hour_start(-2).replace(tzinfo=None)
    invoice = (await billing.GenerateInvoice(generate_request(tenant, hour_start(-3), hour_start(0)))).invoice
    assert invoice.total == "3.30"
    after = json.loads(
        await db.fetchval("SELECT after FROM audit_events WHERE request_id = $1", f"reprice-{kind}")
    )
    assert (after["unit_price"], after["reprice_past_usage"]) == ("1.10", True)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"service": ""}, "service"),
        ({"service": "bad name"}, "service"),
        ({"usage_type": "x" * 65}, "usage_type"),
        ({"unit_price": "-1"}, "unit_price"),
        ({"unit_price": "0.1234567890123"}, "unit_price"),
        ({"unit_price": "1e2"}, "unit_price"),
        ({"currency_code": "EUR"}, "currency_code"),
        ({"effective_minutes": 30}, "effective_time"),
    ],
)
async def test_bad_rate_is_invalid_argument_and_changes_nothing(
    billing: billing_service_pb2_grpc.BillingServiceStub,
    db: asyncpg.Pool,
    changes: dict[str, object],
    field: str,
) -> None:
    request = billing_service_pb2.SetRateRequest(
        service="metered", usage_type=new_usage_type(), unit_price="1"
    )
    for name, value in changes.items():
        if name == "effective_minutes":
            request.effective_time.CopyFrom(ts(hour_start(2) + timedelta(minutes=value)))  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    before = await db.fetchval("SELECT count(*) FROM rates")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.SetRate(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    assert await db.fetchval("SELECT count(*) FROM rates") == before


async def test_generating_again_returns_the_same_invoice_recomputed(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    db: asyncpg.Pool,
    tenant: str,
) -> None:
    start, end = hour_start(-4), hour_start(0)
    await report(usage, event(tenant, "one", time=start))
    first = await billing.GenerateInvoice(generate_request(tenant, start, end))
    await report(usage, event(tenant, "late", quantity="3", time=start + timedelta(hours=1)))
    second = await billing.GenerateInvoice(generate_request(tenant, start, end))
    assert first.created and not second.created
    assert second.invoice.name == first.invoice.name
    assert (first.invoice.total, second.invoice.total) == ("0.10", "0.40")
    assert await db.fetchval("SELECT count(*) FROM invoices WHERE tenant_id = $1", tenant) == 1
    lines = await db.fetch(
        "SELECT quantity, amount FROM invoice_line_items WHERE invoice_id = $1",
        first.invoice.name.rpartition("/")[2],
    )
    assert [(str(r["quantity"]), str(r["amount"])) for r in lines] == [("4", "0.40")]


async def test_concurrent_generation_creates_one_invoice(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    db: asyncpg.Pool,
    tenant: str,
) -> None:
    import asyncio

    start, end = hour_start(-4), hour_start(0)
    await report(usage, event(tenant, time=start))
    results = await asyncio.gather(
        *[billing.GenerateInvoice(generate_request(tenant, start, end)) for _ in range(6)]
    )
    assert len({r.invoice.name for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert await db.fetchval("SELECT count(*) FROM invoices WHERE tenant_id = $1", tenant) == 1


async def test_overlapping_period_is_a_failed_precondition(
    billing: billing_service_pb2_grpc.BillingServiceStub, tenant: str
) -> None:
    await billing.GenerateInvoice(generate_request(tenant, hour_start(-10), hour_start(-5)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GenerateInvoice(generate_request(tenant, hour_start(-6), hour_start(-2)))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Adjacent periods do not overlap.
    await billing.GenerateInvoice(generate_request(tenant, hour_start(-5), hour_start(-2)))


async def test_invoice_without_usage_is_zero(
    billing: billing_service_pb2_grpc.BillingServiceStub, tenant: str
) -> None:
    invoice = (
        await billing.GenerateInvoice(generate_request(tenant, hour_start(-2), hour_start(-1)))
    ).invoice
    assert (list(invoice.line_items), invoice.total) == ([], "0.00")


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [(-3, -3, "period_end_time"), (-2, -3, "period_end_time"), (-24 * 400, 0, "period_end_time")],
)
async def test_bad_period_is_invalid_argument(
    billing: billing_service_pb2_grpc.BillingServiceStub, tenant: str, start: int, end: int, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GenerateInvoice(generate_request(tenant, hour_start(start), hour_start(end)))
    assert field in field_violations(raised.value)


async def test_missing_period_and_tenant_are_named(
    billing: billing_service_pb2_grpc.BillingServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GenerateInvoice(billing_service_pb2.GenerateInvoiceRequest())
    assert "parent" in field_violations(raised.value)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GenerateInvoice(billing_service_pb2.GenerateInvoiceRequest(parent="tenants/t"))
    assert set(field_violations(raised.value)) == {"period_start_time", "period_end_time"}


async def test_get_invoice_and_unknown_invoice_is_not_found(
    billing: billing_service_pb2_grpc.BillingServiceStub, tenant: str
) -> None:
    made = (await billing.GenerateInvoice(generate_request(tenant, hour_start(-2), hour_start(-1)))).invoice
    assert made.compute_time == made.update_time
    got = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=made.name))).invoice
    assert got.compute_time.ToDatetime() >= made.compute_time.ToDatetime()
    got.ClearField("compute_time")
    made.ClearField("compute_time")
    assert got == made
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GetInvoice(
            billing_service_pb2.GetInvoiceRequest(name=f"tenants/{tenant}/invoices/inv_missing")
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reading_a_draft_shows_usage_reported_since_it_was_generated(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    db: asyncpg.Pool,
    tenant: str,
) -> None:
    start, end = hour_start(-3), hour_start(0)
    await report(usage, event(tenant, "first", quantity="3", time=start))  # 3 x 0.10
    generated = (await billing.GenerateInvoice(generate_request(tenant, start, end))).invoice
    assert generated.total == "0.30"
    audit_before = await db.fetchval("SELECT count(*) FROM audit_events WHERE tenant_id = $1", tenant)
    await report(
        usage,
        event(tenant, "later", quantity="2.25", time=start + timedelta(hours=1)),  # 0.225 -> 0.23
        event(
            tenant,
            "query",
            service="analytics",
            usage_type="query",
            quantity="7",
            time=end - timedelta(minutes=1),
        ),
        event(tenant, "outside", quantity="100", time=end),  # after the period: not on it
    )
    reported_at = datetime.now(UTC)

    got = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=generated.name))).invoice
    assert [(li.usage_type, li.quantity, li.amount, li.event_count) for li in got.line_items] == [
        ("query", "7", "0.07", 1),
        ("wpk_upload", "5.25", "0.53", 2),
    ]
    assert got.total == "0.60"
    assert got.compute_time.ToDatetime(UTC) >= reported_at
    assert got.update_time == generated.update_time  # the stored draft is not rewritten by a read
    listed = (
        await billing.ListInvoices(billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}"))
    ).invoices
    assert [(i.name, i.total) for i in listed] == [(generated.name, "0.60")]
    assert listed[0].compute_time.ToDatetime(UTC) >= reported_at

    # Reads write nothing: the stored draft and the audit trail are as GenerateInvoice left them.
    assert await db.fetchval(
        "SELECT total FROM invoices WHERE id = $1", generated.name.rsplit("/", 1)[1]
    ) == Decimal("0.30")
    assert await db.fetchval("SELECT count(*) FROM audit_events WHERE tenant_id = $1", tenant) == audit_before


async def test_listed_drafts_are_each_priced_from_their_own_period(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    tenant: str,
) -> None:
    older, newer = (hour_start(-4), hour_start(-2)), (hour_start(-2), hour_start(0))
    for start, end in (older, newer):
        await billing.GenerateInvoice(generate_request(tenant, start, end))
    await report(
        usage,
        event(tenant, "old", quantity="1", time=older[0]),  # 0.10
        event(tenant, "new", quantity="4", time=newer[1] - timedelta(minutes=1)),  # 0.40
    )
    listed = (
        await billing.ListInvoices(billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}"))
    ).invoices
    assert [(i.period_start_time.ToDatetime(UTC), i.total) for i in listed] == [
        (newer[0], "0.40"),
        (older[0], "0.10"),
    ]


async def test_list_invoices_newest_first_in_pages(
    billing: billing_service_pb2_grpc.BillingServiceStub, tenant: str
) -> None:
    made = [
        (
            await billing.GenerateInvoice(generate_request(tenant, hour_start(-n - 1), hour_start(-n)))
        ).invoice.name
        for n in range(1, 6)
    ]  # made[0] is the newest period
    seen: list[str] = []
    token = ""
    while True:
        page = await billing.ListInvoices(
            billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}", page_size=2, page_token=token)
        )
        assert len(page.invoices) <= 2
        seen += [i.name for i in page.invoices]
        token = page.next_page_token
        if not token:
            break
    assert seen == made


async def test_page_token_of_another_tenant_or_garbage_is_invalid(
    billing: billing_service_pb2_grpc.BillingServiceStub, tenant: str
) -> None:
    for n in range(1, 3):
        await billing.GenerateInvoice(generate_request(tenant, hour_start(-n - 1), hour_start(-n)))
    page = await billing.ListInvoices(
        billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}", page_size=1)
    )
    for other, token in (("someone-else", page.next_page_token), (tenant, "garbage!"), (tenant, "e30")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await billing.ListInvoices(
                billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{other}", page_token=token)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in field_violations(raised.value)


async def test_list_rates_pages_cover_the_card_once(
    billing: billing_service_pb2_grpc.BillingServiceStub,
) -> None:
    everything = (await billing.ListRates(billing_service_pb2.ListRatesRequest(page_size=1000))).rates
    paged = []
    token = ""
    while True:
        page = await billing.ListRates(billing_service_pb2.ListRatesRequest(page_size=3, page_token=token))
        paged += list(page.rates)
        token = page.next_page_token
        if not token:
            break
    key = lambda r: (r.service, r.usage_type)  # noqa: E731
    assert [key(r) for r in paged] == [key(r) for r in everything]


async def test_values_postgres_cannot_store_are_invalid_not_internal(
    billing: billing_service_pb2_grpc.BillingServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GetInvoice(
            billing_service_pb2.GetInvoiceRequest(name=f"tenants/{tenant}/invoices/inv_\x00")
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A validly signed page token for the right filter that carries a NUL character.
    forged = (await server_page_tokens(db)).encode(f"invoices:{tenant}", [0, "inv_\x00"])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.ListInvoices(
            billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}", page_token=forged)
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
