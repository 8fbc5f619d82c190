"""The typed client's invoice life, credit notes, plans, billing profiles and period close, against the
real server: exact values back, typed errors with their reasons, and request ids that make retries safe."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from server.domain.access import BILLING_READ, USAGE_READ
from tally_client import (
    AlreadyExistsError,
    AsyncTallyClient,
    Charge,
    FailedPreconditionError,
    FeeTiming,
    FlatFee,
    Graduated,
    InvalidArgumentError,
    Invoice,
    NotFoundError,
    Package,
    PermissionDeniedError,
    PerUnit,
    PriceOverride,
    PriceTier,
    UsageEvent,
    Volume,
)
from tests.billing_helpers import far_anchor_day
from tests.conftest import make_token
from tests.helpers import hour_start


async def _draft(client: AsyncTallyClient, tenant: str, hours_ago: int, quantity: str) -> Invoice:
    """A draft invoice of one hour with `quantity` cpu hours at 0.50."""
    start = hour_start(-hours_ago)
    await client.report_usage(UsageEvent(tenant, "compute", "cpu_hour", Decimal(quantity), event_time=start))
    return (await client.generate_invoice(tenant, start, start + timedelta(hours=1))).invoice


async def test_an_invoice_goes_from_draft_to_finalized_uncollectible_and_paid_and_a_wrong_move_fails(
    client: AsyncTallyClient, tenant: str, db: asyncpg.Pool
) -> None:
    draft = await _draft(client, tenant, 3, "3.5")
    finalized = await client.finalize_invoice(tenant, draft.invoice_id)
    assert (finalized.name, finalized.status, finalized.total) == (draft.name, "finalized", Decimal("1.75"))
    assert finalized.number.startswith("TALLY-")
    uncollectible = await client.mark_invoice_uncollectible(tenant, draft.invoice_id)
    assert (uncollectible.status, uncollectible.number) == ("uncollectible", finalized.number)
    paid = await client.mark_invoice_paid(tenant, draft.invoice_id)
    assert (paid.status, paid.total) == ("paid", Decimal("1.75"))
    with pytest.raises(FailedPreconditionError) as caught:
        await client.void_invoice(tenant, draft.invoice_id)
    assert caught.value.reason == "INVOICE_STATUS_INVALID"
    assert await db.fetchval("SELECT status FROM invoices WHERE id = $1", draft.invoice_id) == "paid"

    other = await _draft(client, tenant, 1, "1")
    voided = await client.void_invoice(tenant, other.invoice_id)
    assert (voided.status, voided.number) == ("void", "")
    with pytest.raises(NotFoundError) as missing:
        await client.finalize_invoice(tenant, "inv_missing")
    assert missing.value.reason == "INVOICE_NOT_FOUND"


async def test_a_resent_finalize_answers_the_first_call_and_its_request_id_cannot_serve_another_invoice(
    client: AsyncTallyClient, tenant: str
) -> None:
    first = await _draft(client, tenant, 3, "1")
    request_id = uuid.uuid4().hex
    finalized = await client.finalize_invoice(tenant, first.invoice_id, request_id=request_id)
    # Without the request id this second call would fail: the invoice is no longer a draft.
    assert await client.finalize_invoice(tenant, first.invoice_id, request_id=request_id) == finalized
    second = await _draft(client, tenant, 1, "1")
    with pytest.raises(FailedPreconditionError) as caught:
        await client.finalize_invoice(tenant, second.invoice_id, request_id=request_id)
    assert caught.value.reason == "REQUEST_ID_REUSED"


async def test_credit_notes_are_exact_listed_oldest_first_and_never_exceed_the_invoice(
    client: AsyncTallyClient, tenant: str, db: asyncpg.Pool
) -> None:
    invoice = await client.finalize_invoice(tenant, (await _draft(client, tenant, 2, "3.5")).invoice_id)
    first = await client.create_credit_note(tenant, invoice.invoice_id, Decimal("0.5"), "goodwill")
    assert (first.tenant_id, first.invoice_id, first.amount, first.currency_code, first.reason) == (
        tenant,
        invoice.invoice_id,
        Decimal("0.50"),
        "USD",
        "goodwill",
    )
    assert first.name == f"tenants/{tenant}/creditNotes/{first.credit_note_id}"
    second = await client.create_credit_note(tenant, invoice.invoice_id, "1.25", "outage")
    with pytest.raises(FailedPreconditionError) as caught:
        await client.create_credit_note(tenant, invoice.invoice_id, Decimal("0.01"), "one cent too many")
    assert caught.value.reason == "CREDIT_EXCEEDS_INVOICE"
    with pytest.raises(TypeError, match="not float"):
        await client.create_credit_note(tenant, invoice.invoice_id, 0.1, "float")  # type: ignore[arg-type]

    listed = [note async for note in client.list_credit_notes(tenant, page_size=1)]
    assert listed == [first, second]
    rows = await db.fetch("SELECT amount FROM credit_notes WHERE tenant_id = $1 ORDER BY amount", tenant)
    assert [r["amount"] for r in rows] == [Decimal("0.50"), Decimal("1.25")]


GRADUATED = Charge(
    "uploads",
    Graduated((PriceTier(Decimal("0.10"), up_to=Decimal(100)), PriceTier(Decimal("0.05")))),
    service="marketplace",
    usage_type="wpk_upload",
    description="Uploads",
)


async def test_every_price_model_comes_back_exactly_and_a_new_version_follows_the_first(
    client: AsyncTallyClient,
) -> None:
    plan_id = f"plan-{uuid.uuid4().hex[:12]}"
    charges = [
        Charge("queries", PerUnit(Decimal("0.000000000001")), service="analytics", usage_type="query"),
        GRADUATED,
        Charge(
            "cpu",
            Volume((PriceTier(Decimal("0.5"), Decimal(10), Decimal(1)), PriceTier(Decimal("0.4")))),
            service="compute",
            usage_type="cpu_hour",
            included_quantity=Decimal("2.5"),
        ),
        Charge("storage", Package(Decimal(1000), Decimal("2.5")), service="storage", usage_type="gb_hour"),
        Charge("platform", FlatFee(Decimal(10), FeeTiming.IN_ADVANCE), description="Platform fee"),
    ]
    plan = await client.create_plan(
        plan_id, "Every model", "USD", charges=charges, minimum_amount="5", effective_time=hour_start(-24)
    )
    assert (plan.name, plan.plan_id, plan.display_name, plan.currency_code) == (
        f"plans/{plan_id}",
        plan_id,
        "Every model",
        "USD",
    )
    [first] = plan.versions
    # Decimals compare by value: "0.10" as sent and "0.1" read back are one price.
    assert (first.version, first.effective_time, first.minimum_amount) == (1, hour_start(-24), Decimal(5))
    assert list(first.charges) == charges
    assert str(first.charges[1].model.tiers[0].unit_price) == "0.10"  # type: ignore[union-attr]

    changed = await client.create_plan_version(
        f"plans/{plan_id}", charges=[GRADUATED], effective_time=hour_start(2)
    )
    assert [(v.version, v.effective_time, len(v.charges)) for v in changed.versions] == [
        (1, hour_start(-24), 5),
        (2, hour_start(2), 1),
    ]
    assert await client.get_plan(plan_id) == changed
    plans = [p async for p in client.list_plans(page_size=2)]
    assert plans[0].plan_id == "default" and changed in plans


async def test_plan_mistakes_fail_with_their_reasons_and_a_resent_create_answers_the_first_call(
    client: AsyncTallyClient,
) -> None:
    plan_id = f"plan-{uuid.uuid4().hex[:12]}"
    request_id = uuid.uuid4().hex
    created = await client.create_plan(plan_id, "P", "USD", request_id=request_id)
    assert await client.create_plan(plan_id, "P", "USD", request_id=request_id) == created
    with pytest.raises(AlreadyExistsError) as exists:
        await client.create_plan(plan_id, "P", "USD")
    assert exists.value.reason == "PLAN_EXISTS"
    with pytest.raises(NotFoundError) as missing:
        await client.get_plan("no-such-plan")
    assert missing.value.reason == "PLAN_NOT_FOUND"
    with pytest.raises(FailedPreconditionError) as read_only:
        await client.create_plan_version("default", charges=[GRADUATED])
    assert read_only.value.reason == "PLAN_READ_ONLY"
    with pytest.raises(InvalidArgumentError) as invalid:
        await client.create_plan_version(
            plan_id, charges=[Charge("neg", PerUnit(Decimal(-1)), "analytics", "query")]
        )
    assert [v.field for v in invalid.value.field_violations] == ["charges[0].per_unit.unit_price"]


async def test_a_tenants_profile_plan_preview_and_period_close(client: AsyncTallyClient, tenant: str) -> None:
    plan_id = f"plan-{uuid.uuid4().hex[:12]}"
    await client.create_plan(plan_id, "Uploads", "USD", charges=[GRADUATED], effective_time=hour_start(-48))
    anchor_day = far_anchor_day()
    profile = await client.set_billing_profile(
        tenant,
        f"Customer {tenant}",
        email="billing@example.com",
        plan=plan_id,
        billing_anchor_day=anchor_day,
        billing_start_time=hour_start(-5),
        tax_percentage=Decimal(20),
        price_overrides=[PriceOverride("uploads", PerUnit(Decimal("0.09")), included_quantity=Decimal(10))],
    )
    assert (profile.name, profile.tenant_id, profile.plan_id, profile.currency_code) == (
        f"tenants/{tenant}/billingProfile",
        tenant,
        plan_id,
        "USD",
    )
    assert (profile.billing_anchor_day, profile.billing_start_time) == (anchor_day, hour_start(-5))
    assert (profile.tax_percentage, profile.spend_threshold) == (Decimal(20), None)
    assert profile.price_overrides == (PriceOverride("uploads", PerUnit(Decimal("0.09")), Decimal(10)),)
    assert await client.get_billing_profile(tenant) == profile

    await client.report_usage(
        UsageEvent(tenant, "marketplace", "wpk_upload", Decimal(120), event_time=hour_start(-3))
    )
    # (120 - 10 included) x 0.09 = 9.90, tax 20% = 1.98.
    preview = await client.preview_invoice(tenant)
    assert (preview.name, preview.invoice_id, preview.status, preview.total) == (
        "",
        "",
        "draft",
        Decimal("11.88"),
    )
    assert [(line.kind, line.amount) for line in preview.line_items] == [
        ("usage", Decimal("9.90")),
        ("tax", Decimal("1.98")),
    ]
    closed = await client.close_period(tenant)
    assert (closed.status, closed.total, closed.tenant_id) == ("finalized", Decimal("11.88"), tenant)
    assert await client.get_invoice(tenant, closed.invoice_id) == closed


async def test_a_tenant_without_a_profile_has_none_to_show_and_no_period_to_close(
    client: AsyncTallyClient, tenant: str
) -> None:
    with pytest.raises(NotFoundError) as no_profile:
        await client.get_billing_profile(tenant)
    assert no_profile.value.reason == "BILLING_PROFILE_NOT_FOUND"
    with pytest.raises(NotFoundError) as no_close:
        await client.close_period(tenant)
    assert no_close.value.reason == "BILLING_PROFILE_NOT_FOUND"


async def test_a_read_only_token_cannot_change_billing(address: str, tenant: str) -> None:
    async with AsyncTallyClient(address, token=make_token([tenant], (USAGE_READ, BILLING_READ))) as reader:
        assert (await reader.preview_invoice(tenant)).total == Decimal(0)
        with pytest.raises(PermissionDeniedError) as caught:
            await reader.set_billing_profile(tenant, "Nobody")
    assert caught.value.reason == "SCOPE_MISSING"


async def test_a_price_set_in_the_past_needs_reprice_past_usage(client: AsyncTallyClient) -> None:
    usage_type = f"t_{uuid.uuid4().hex[:12]}"  # a usage type of its own: the rate card is shared
    await client.set_rate("compute", usage_type, Decimal("0.1"))
    with pytest.raises(InvalidArgumentError) as caught:
        await client.set_rate("compute", usage_type, Decimal("0.2"), effective_time=hour_start(-2))
    assert caught.value.reason == "FIELD_INVALID"
    assert [v.field for v in caught.value.field_violations] == ["effective_time"]
    repriced = await client.set_rate(
        "compute", usage_type, Decimal("0.2"), effective_time=hour_start(-2), reprice_past_usage=True
    )
    assert (repriced.unit_price, repriced.effective_time) == (Decimal("0.2"), hour_start(-2))
