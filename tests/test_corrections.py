"""Cancelling an event whose period is already on a finalized invoice.

The finalized invoice never changes: the next invoice carries an adjustment for that period,
the period priced again without the event minus what it was billed, per charge (the same rule
as late usage, server.domain.adjustments).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from tally.v1 import billing_service_pb2, resources_pb2, usage_service_pb2
from tests.billing_helpers import create_plan, far_anchor_day, flat_fee, graduated_api_charge, set_profile
from tests.helpers import event, hour_start, ts

R = resources_pb2


def _close(billing: Any, tenant: str) -> Any:
    return billing.ClosePeriod(billing_service_pb2.ClosePeriodRequest(parent=f"tenants/{tenant}"))


async def _lines(db: asyncpg.Pool, invoice_name: str) -> list[tuple[str, str, str]]:
    rows = await db.fetch(
        "SELECT l.kind, l.charge_key, l.amount::text AS amount FROM invoice_line_items l"
        " WHERE l.invoice_id = $1 ORDER BY l.position",
        invoice_name.rsplit("/", 1)[-1],
    )
    return [(r["kind"], r["charge_key"], r["amount"]) for r in rows]


async def test_cancelling_a_finalized_periods_event_adjusts_the_next_invoice_and_never_the_finalized_one(
    usage: Any, billing: Any, db: asyncpg.Pool, tenant: str
) -> None:
    plan = await create_plan(billing, [graduated_api_charge(), flat_fee("10")])
    await set_profile(
        billing,
        tenant,
        plan=plan.name,
        billing_anchor_day=far_anchor_day(),
        billing_start_time=ts(hour_start(-5)),
    )
    for event_id, quantity in (("kept", "90"), ("cancelled", "30")):
        await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(
                event=event(tenant, event_id, quantity=quantity, time=hour_start(-3))
            )
        )
    first = (await _close(billing, tenant)).invoice
    # 120 uploads: 100 x 0.10 + 20 x 0.05 = 11.00 (and the fee, prorated over this short first period).
    assert next((li.charge_key, li.amount) for li in first.line_items) == ("uploads", "11.00")
    stored = await _lines(db, first.name)

    await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id="cancelled"))

    got = (await billing.GetInvoice(billing_service_pb2.GetInvoiceRequest(name=first.name))).invoice
    assert got == first  # a finalized invoice never changes
    assert await _lines(db, first.name) == stored
    preview = (
        await billing.PreviewInvoice(billing_service_pb2.PreviewInvoiceRequest(parent=f"tenants/{tenant}"))
    ).invoice
    adjustments = [li for li in preview.line_items if li.kind == R.INVOICE_LINE_KIND_ADJUSTMENT]
    # 90 uploads now cost 9.00; billed 11.00 -> -2.00 (the cancelled 30 were not all at one
    # tier's price: 10 at 0.10 and 20 at 0.05).
    assert [(a.charge_key, a.amount) for a in adjustments] == [("uploads", "-2.00")]
    assert (adjustments[0].period_start_time, adjustments[0].period_end_time) == (
        first.period_start_time,
        first.period_end_time,
    )
    second = (await _close(billing, tenant)).invoice
    assert [(li.kind, li.charge_key, li.amount) for li in second.line_items] == [
        (R.INVOICE_LINE_KIND_USAGE, "uploads", "0.00"),
        (R.INVOICE_LINE_KIND_FLAT_FEE, "platform", "10.00"),
        (R.INVOICE_LINE_KIND_ADJUSTMENT, "uploads", "-2.00"),
    ]
    assert second.total == "8.00"
    # Cancelled again: nothing changes, and the adjustment is billed once.
    await usage.CancelEvent(usage_service_pb2.CancelEventRequest(tenant_id=tenant, event_id="cancelled"))
    third = (await _close(billing, tenant)).invoice
    assert [li.kind for li in third.line_items] == [R.INVOICE_LINE_KIND_USAGE, R.INVOICE_LINE_KIND_FLAT_FEE]
    assert third.total == "10.00"
    assert await _lines(db, first.name) == stored
