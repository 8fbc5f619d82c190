"""The typed client against the real server: exact values in and out, typed errors with their details."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from server.domain.access import SCOPES
from tally_client import (
    AsyncTallyClient,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ReportOutcome,
    TallyClient,
    TimeBucket,
    UnauthenticatedError,
    UsageEvent,
)
from tests.conftest import make_token
from tests.helpers import hour_start, totals


async def test_report_usage_records_once_and_then_answers_duplicate(
    client: AsyncTallyClient, db: asyncpg.Pool, tenant: str
) -> None:
    event = UsageEvent(tenant, "analytics", "query", Decimal("0.000000001"), event_time=hour_start(-1))
    first = await client.report_usage(event)
    again = await client.report_usage(event)
    assert (first.tenant_id, first.event_id, first.outcome) == (
        tenant,
        event.event_id,
        ReportOutcome.RECORDED,
    )
    assert again.outcome is ReportOutcome.DUPLICATE
    assert await totals(db, tenant) == (1, Decimal("0.000000001"), 1, Decimal("0.000000001"))


async def test_summary_comes_back_as_exact_decimals_and_aware_datetimes(
    client: AsyncTallyClient, tenant: str
) -> None:
    start = hour_start(-3)
    for offset, region in ((0, "eu"), (0, "us"), (1, "eu")):
        await client.report_usage(
            UsageEvent(
                tenant,
                "storage",
                "gb_hour",
                Decimal("0.1"),
                event_time=start + timedelta(hours=offset, minutes=5),
                dimensions={"region": region},
            )
        )
    summary = await client.get_usage_summary(
        tenant, start, start + timedelta(hours=3), bucket=TimeBucket.HOUR, group_by_dimension="region"
    )
    assert summary.name == f"tenants/{tenant}/usageSummary"
    assert summary.start_time == start and summary.start_time.tzinfo is not None
    assert [
        (a.bucket_start_time, a.dimension_value, a.quantity, a.event_count) for a in summary.aggregates
    ] == [
        (start, "eu", Decimal("0.1"), 1),
        (start, "us", Decimal("0.1"), 1),
        (start + timedelta(hours=1), "eu", Decimal("0.1"), 1),
    ]
    whole = await client.get_usage_summary(tenant, start, start + timedelta(hours=3))
    assert [(a.quantity, a.bucket_start_time) for a in whole.aggregates] == [(Decimal("0.3"), None)]


async def test_invoice_generation_is_exact_and_a_retry_with_the_request_id_changes_nothing(
    client: AsyncTallyClient, tenant: str
) -> None:
    start = hour_start(-2)
    for quantity in ("1", "2.5"):
        await client.report_usage(
            UsageEvent(tenant, "compute", "cpu_hour", Decimal(quantity), event_time=start)
        )
    request_id = uuid.uuid4().hex
    generated = await client.generate_invoice(
        tenant, start, start + timedelta(hours=1), request_id=request_id
    )
    retried = await client.generate_invoice(tenant, start, start + timedelta(hours=1), request_id=request_id)
    invoice = generated.invoice
    assert generated.created and retried.created and retried.invoice == invoice
    assert invoice.name == f"tenants/{tenant}/invoices/{invoice.invoice_id}"
    [line] = invoice.line_items
    assert (line.quantity, line.unit_price, line.amount) == (Decimal("3.5"), Decimal("0.50"), Decimal("1.75"))
    assert invoice.total == Decimal("1.75") and invoice.status == "draft"
    assert await client.get_invoice(tenant, invoice.invoice_id) == invoice
    assert [i.name async for i in client.list_invoices(tenant)] == [invoice.name]
    audit = [e async for e in client.list_audit_events(tenant_id=tenant)]
    assert [(e.action, e.resource.startswith("invoices/")) for e in audit] == [("invoice_created", True)]


async def test_rate_card_pages_are_followed_and_prices_are_decimals(client: AsyncTallyClient) -> None:
    rates = [r async for r in client.list_rates(page_size=2)]
    by_type = {(r.service, r.usage_type): r for r in rates}
    assert len(rates) == len(by_type) >= 7  # every page, no repeats
    assert by_type["analytics", "query"].unit_price == Decimal("0.01")
    assert by_type["analytics", "query"].name.startswith("services/analytics/usageTypes/query/rates/")


async def test_new_usage_type_gets_its_rate_with_an_exact_price(client: AsyncTallyClient) -> None:
    usage_type = f"t_{uuid.uuid4().hex[:12]}"
    rate = await client.set_rate("compute", usage_type, Decimal("0.000000000001"))
    assert (rate.service, rate.usage_type, rate.unit_price) == (
        "compute",
        usage_type,
        Decimal("0.000000000001"),
    )
    assert rate.effective_time == datetime(1970, 1, 1, tzinfo=UTC)


async def test_invalid_event_raises_invalid_argument_with_the_field_and_reason(
    client: AsyncTallyClient, tenant: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.report_usage(UsageEvent(tenant, "analytics", "query", Decimal("-1")))
    error = caught.value
    assert error.reason == "FIELD_INVALID"
    assert [v.field for v in error.field_violations] == ["event.quantity"]
    assert error.request_id and len(error.request_id) == 32
    assert "event.quantity" in str(error)


async def test_unknown_invoice_raises_not_found_with_its_reason(
    client: AsyncTallyClient, tenant: str
) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_invoice(tenant, "inv_missing")
    assert caught.value.reason == "INVOICE_NOT_FOUND"


async def test_token_for_another_tenant_raises_permission_denied(address: str, tenant: str) -> None:
    async with AsyncTallyClient(address, token=make_token(["someone-else"], SCOPES)) as other:
        with pytest.raises(PermissionDeniedError) as caught:
            await other.report_usage(UsageEvent(tenant, "analytics", "query", Decimal("1")))
    assert caught.value.reason == "TENANT_NOT_PERMITTED"


async def test_missing_token_raises_unauthenticated(address: str, tenant: str) -> None:
    async with AsyncTallyClient(address, token=None) as anonymous:
        with pytest.raises(UnauthenticatedError) as caught:
            await anonymous.get_usage_summary(tenant, hour_start(-1), hour_start())
    assert caught.value.reason == "TOKEN_MISSING"


def test_floats_and_naive_datetimes_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(TypeError, match="not float"):
        UsageEvent("acme", "analytics", "query", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone-aware"):
        UsageEvent("acme", "analytics", "query", Decimal("1"), event_time=datetime(2026, 11, 1))
    assert UsageEvent("acme", "analytics", "query", 3).quantity == Decimal(3)  # type: ignore[arg-type]


async def test_sync_client_reports_and_summarises(address: str, db: asyncpg.Pool, tenant: str) -> None:
    start = hour_start(-1)

    def script() -> list[Decimal]:
        # The blocking client runs in a thread: the session's server shares this event loop.
        with TallyClient(address, token=make_token([tenant], SCOPES)) as sync:
            sync.report_usage(UsageEvent(tenant, "analytics", "query", Decimal("2.25"), event_time=start))
            summary = sync.get_usage_summary(tenant, start, start + timedelta(hours=1))
            return [a.quantity for a in summary.aggregates]

    assert await asyncio.to_thread(script) == [Decimal("2.25")]
    assert (await totals(db, tenant))[:2] == (1, Decimal("2.25"))


async def test_sync_client_raises_the_same_typed_errors(address: str, tenant: str) -> None:
    def script() -> InvalidArgumentError:
        with TallyClient(address, token=make_token()) as sync:
            try:
                sync.report_usage(UsageEvent(tenant, "analytics", "no_such_type", Decimal("1")))
            except InvalidArgumentError as exc:
                return exc
        raise AssertionError("no error")

    error = await asyncio.to_thread(script)
    assert error.reason == "FIELD_INVALID" and [v.field for v in error.field_violations] == [
        "event.usage_type"
    ]
