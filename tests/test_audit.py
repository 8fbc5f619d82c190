"""The audit trail: every rate change and invoice generation leaves an entry, written with the change."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from server.domain.access import BILLING_ADMIN
from server.domain.audit import AuditAction
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc, resources_pb2, usage_service_pb2
from tests.conftest import make_token, new_tenant
from tests.helpers import channel_with_token, event, hour_start, ts


def admin(tally: Any, tenants: Any = "all", subject: str = "finance-admin") -> grpc.aio.Channel:
    return channel_with_token(
        f"127.0.0.1:{tally.port}", make_token(tenants, (BILLING_ADMIN,), subject=subject)
    )


async def trail(
    billing: billing_service_pb2_grpc.BillingServiceStub, **filters: Any
) -> list[resources_pb2.AuditEvent]:
    events, token = [], ""
    while True:
        page = await billing.ListAuditEvents(
            billing_service_pb2.ListAuditEventsRequest(page_size=2, page_token=token, **filters)
        )
        events += page.audit_events
        token = page.next_page_token
        if not token:
            return events


async def test_set_rate_records_who_when_which_request_and_the_prices_before_and_after(tally: Any) -> None:
    usage_type = f"audited_{uuid.uuid4().hex[:8]}"
    async with admin(tally) as channel:
        billing = billing_service_pb2_grpc.BillingServiceStub(channel)
        start = ts(hour_start(0))
        await billing.SetRate(
            billing_service_pb2.SetRateRequest(service="compute", usage_type=usage_type, unit_price="1.25"),
            metadata=(("x-request-id", "change-1"),),
        )
        await billing.SetRate(
            billing_service_pb2.SetRateRequest(
                service="compute", usage_type=usage_type, unit_price="1.50", effective_time=ts(hour_start(2))
            ),
            metadata=(("x-request-id", "change-2"),),
        )
        entries = [e for e in await trail(billing, start_time=start) if usage_type in e.resource]
    assert [(e.principal, e.request_id, e.action, e.tenant_id) for e in entries] == [
        ("finance-admin", "change-1", resources_pb2.AUDIT_ACTION_RATE_SET, ""),
        ("finance-admin", "change-2", resources_pb2.AUDIT_ACTION_RATE_SET, ""),
    ]
    first, second = (MessageToDict(e) for e in entries)
    assert "before" not in first and first["after"]["unit_price"] == "1.25"
    assert (second["before"]["unit_price"], second["after"]["unit_price"]) == ("1.25", "1.50")
    assert second["after"]["effective_time"] == hour_start(2).isoformat()


async def test_invoice_generation_and_recomputation_are_recorded_with_totals(
    tally: Any, usage: Any, tenant: str
) -> None:
    period = {
        "parent": f"tenants/{tenant}",
        "period_start_time": ts(hour_start(-3)),
        "period_end_time": ts(hour_start(0)),
    }
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(-2))))
    async with admin(tally, [tenant], subject="biller") as channel:
        billing = billing_service_pb2_grpc.BillingServiceStub(channel)
        created = await billing.GenerateInvoice(billing_service_pb2.GenerateInvoiceRequest(**period))
        await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="2", time=hour_start(-2)))
        )
        await billing.GenerateInvoice(billing_service_pb2.GenerateInvoiceRequest(**period))
        entries = await trail(billing, tenant_id=tenant)
    assert [(e.action, e.principal, e.resource) for e in entries] == [
        (
            resources_pb2.AUDIT_ACTION_INVOICE_CREATED,
            "biller",
            f"invoices/{created.invoice.name.rpartition('/')[2]}",
        ),
        (
            resources_pb2.AUDIT_ACTION_INVOICE_RECOMPUTED,
            "biller",
            f"invoices/{created.invoice.name.rpartition('/')[2]}",
        ),
    ]
    recomputed = MessageToDict(entries[1])
    assert (recomputed["before"]["total"], recomputed["after"]["total"]) == ("0.10", "0.30")
    assert len(entries[0].request_id) == 32  # generated when the client sent none


async def test_failed_change_leaves_no_entry(tally: Any, usage: Any, db: asyncpg.Pool, tenant: str) -> None:
    async with admin(tally) as channel:
        billing = billing_service_pb2_grpc.BillingServiceStub(channel)
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(hour_start(-4)),
                period_end_time=ts(hour_start(-2)),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # overlaps the first invoice
            await billing.GenerateInvoice(
                billing_service_pb2.GenerateInvoiceRequest(
                    parent=f"tenants/{tenant}",
                    period_start_time=ts(hour_start(-3)),
                    period_end_time=ts(hour_start(-1)),
                )
            )
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await db.fetchval("SELECT count(*) FROM audit_events WHERE tenant_id = $1", tenant) == 1


async def test_trail_is_append_only(db: asyncpg.Pool, billing: Any, tenant: str) -> None:
    await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{tenant}",
            period_start_time=ts(hour_start(-2)),
            period_end_time=ts(hour_start(-1)),
        )
    )
    for statement in (
        "UPDATE audit_events SET principal = 'someone' WHERE tenant_id = $1",
        "DELETE FROM audit_events WHERE tenant_id = $1",
    ):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await db.execute(statement, tenant)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("TRUNCATE audit_events")


async def test_tenant_admin_sees_its_tenants_and_the_rate_card_only(
    tally: Any, billing: Any, tenant: str
) -> None:
    other = new_tenant()
    for who in (tenant, other):
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{who}",
                period_start_time=ts(hour_start(-2)),
                period_end_time=ts(hour_start(-1)),
            )
        )
    async with admin(tally, [tenant]) as channel:
        scoped = billing_service_pb2_grpc.BillingServiceStub(channel)
        seen = {e.tenant_id for e in await trail(scoped, start_time=ts(hour_start(-1)))}
        assert tenant in seen and other not in seen and seen <= {tenant, ""}
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await scoped.ListAuditEvents(billing_service_pb2.ListAuditEventsRequest(tenant_id=other))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_listing_checks_its_arguments(billing: Any, tenant: str) -> None:
    for request in (
        billing_service_pb2.ListAuditEventsRequest(start_time=ts(hour_start(0)), end_time=ts(hour_start(-1))),
        billing_service_pb2.ListAuditEventsRequest(page_size=-1),
        billing_service_pb2.ListAuditEventsRequest(page_token="garbage"),
        billing_service_pb2.ListAuditEventsRequest(tenant_id=" padded "),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await billing.ListAuditEvents(request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_audit_actions_in_the_code_are_the_actions_in_the_contract() -> None:
    in_proto = {v.name for v in resources_pb2.AuditAction.DESCRIPTOR.values} - {"AUDIT_ACTION_UNSPECIFIED"}
    assert {f"AUDIT_ACTION_{action.name}" for action in AuditAction} == in_proto
