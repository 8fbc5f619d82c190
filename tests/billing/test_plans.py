"""Plans (server.billing.plans) on an in-memory plan store, without PostgreSQL.

The store runs each use case as one unit of work (Transactions of PlanTransaction); the
SQL and the retry policy keep their end-to-end tests (tests/test_plans.py).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from server.billing.plans import Plans, ProfileInput
from server.domain.access import ALL_TENANTS, BILLING_ADMIN, Caller, Principal
from server.domain.audit import AuditAction
from server.domain.charges import Charge, PerUnit
from server.domain.errors import AlreadyExists, ErrorReason, FailedPrecondition, InvalidArgument
from server.domain.models import Rate
from server.domain.pagination import PageTokens
from server.domain.plans import Plan, PlanAssignment, PlanCharge, UsageTypeRef
from server.domain.requests import Once, Replayed, RequestKey
from server.domain.timeutil import to_micros
from tests.memory_stores import EPOCH, FakePlans, FakeRateBook

NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
HOUR = timedelta(hours=1)
THIS_HOUR = NOW.replace(minute=0)
ADMIN = Caller(Principal("finance", ALL_TENANTS, frozenset({BILLING_ADMIN})), "req-1")
UPLOADS = (PlanCharge(Charge("uploads", "Uploads", PerUnit(Decimal("0.10"))), UsageTypeRef("m", "upload")),)
CHEAPER = (PlanCharge(Charge("uploads", "Uploads", PerUnit(Decimal("0.08"))), UsageTypeRef("m", "upload")),)


def plans_on(store: FakePlans) -> Plans:
    rates = FakeRateBook(Rate("m", "upload", Decimal("0.5"), "USD", EPOCH, EPOCH))
    return Plans(store, rates, PageTokens(b"k" * 32), lambda: to_micros(NOW), "USD", timedelta(hours=1))


def once(request_id: str) -> Once[Plan]:
    key = RequestKey("finance", "CreatePlan", request_id, hashlib.sha256(request_id.encode()).digest())
    return Once(key, lambda plan: plan.plan_id.encode())


def profile(tenant: str, plan_id: str, *, effective: datetime | None = None) -> ProfileInput:
    return ProfileInput(
        tenant_id=tenant,
        display_name="Acme",
        email="billing@acme.test",
        currency="",
        plan_id=plan_id,
        plan_effective_micros=None if effective is None else to_micros(effective),
        anchor_day=1,
        billing_start_micros=to_micros(datetime(2026, 3, 1, tzinfo=UTC)),
        tax_percentage="",
        spend_threshold="",
        overrides=(),
    )


async def test_a_plan_starts_at_the_current_hour_audited_and_a_retry_replays_it() -> None:
    store = FakePlans(NOW)
    plans = plans_on(store)
    created = await plans.create_plan("pro", "Pro", "USD", UPLOADS, "0", None, ADMIN, once("r1"))
    assert isinstance(created, Plan)
    assert [(v.version, v.effective_from) for v in created.versions] == [(1, THIS_HOUR)]
    assert [e.action for e in store.state.audited] == [AuditAction.PLAN_CREATED]
    again = await plans.create_plan("pro", "Pro", "USD", UPLOADS, "0", None, ADMIN, once("r1"))
    assert again == Replayed(b"pro")
    assert len(store.state.audited) == 1 and list(store.state.plans) == ["pro"]
    with pytest.raises(AlreadyExists):
        await plans.create_plan("pro", "Pro again", "USD", UPLOADS, "0", None, ADMIN, once("r2"))
    assert store.state.plans["pro"].display_name == "Pro" and len(store.state.audited) == 1


async def test_a_version_must_follow_the_latest_and_never_reach_into_a_billed_period() -> None:
    store = FakePlans(NOW)
    plans = plans_on(store)
    await plans.create_plan("pro", "Pro", "USD", UPLOADS, "0", None, ADMIN)
    with pytest.raises(InvalidArgument) as raised:
        await plans.create_version("pro", CHEAPER, "0", to_micros(THIS_HOUR - 2 * HOUR), ADMIN)
    assert [v.field for v in raised.value.violations] == ["effective_time"]
    # An invoice of this plan billed a period ending after the new version's time.
    store.state.billed.append(("tenants/t1/invoices/inv_1", "t1", ("pro",), THIS_HOUR + 24 * HOUR))
    with pytest.raises(FailedPrecondition) as refused:
        await plans.create_version("pro", CHEAPER, "0", to_micros(THIS_HOUR + 5 * HOUR), ADMIN)
    assert refused.value.reason is ErrorReason.PERIOD_FINALIZED
    assert len(store.state.plans["pro"].versions) == 1  # nothing written
    after_billed = to_micros(THIS_HOUR + 24 * HOUR)
    updated = await plans.create_version("pro", CHEAPER, "0", after_billed, ADMIN)
    assert isinstance(updated, Plan)
    assert [v.version for v in updated.versions] == [1, 2]
    assert [e.action for e in store.state.audited] == [
        AuditAction.PLAN_CREATED,
        AuditAction.PLAN_VERSION_CREATED,
    ]


async def test_the_default_plan_is_the_rate_card_and_read_only() -> None:
    plans = plans_on(FakePlans(NOW))
    default = await plans.get_plan("default")
    assert [c.charge.key for c in default.versions[0].charges] == ["m/upload"]
    with pytest.raises(FailedPrecondition) as refused:
        await plans.create_version("default", CHEAPER, "0", None, ADMIN)
    assert refused.value.reason is ErrorReason.PLAN_READ_ONLY


async def test_a_plan_change_takes_effect_at_the_next_hour_and_never_inside_a_billed_period() -> None:
    store = FakePlans(NOW)
    plans = plans_on(store)
    await plans.create_plan("pro", "Pro", "USD", UPLOADS, "0", None, ADMIN)
    first = await plans.set_profile(profile("t1", "default"), ADMIN)
    assert not isinstance(first, Replayed)
    march = datetime(2026, 3, 1, tzinfo=UTC)
    assert store.state.assignments["t1"] == [PlanAssignment(march, "default")]  # from the billing start
    changed = await plans.set_profile(profile("t1", "pro"), ADMIN)
    assert not isinstance(changed, Replayed) and changed.plan_id == "pro"
    next_hour = THIS_HOUR + HOUR
    assert store.state.assignments["t1"] == [
        PlanAssignment(march, "default"),
        PlanAssignment(next_hour, "pro"),
    ]
    # A change back that would take effect inside an invoiced period is refused whole.
    store.state.billed.append(("tenants/t1/invoices/inv_1", "t1", ("pro",), NOW + 48 * HOUR))
    with pytest.raises(FailedPrecondition) as refused:
        await plans.set_profile(profile("t1", "default", effective=THIS_HOUR + 2 * HOUR), ADMIN)
    assert refused.value.reason is ErrorReason.PERIOD_FINALIZED
    assert store.state.assignments["t1"][-1] == PlanAssignment(next_hour, "pro")
    assert [e.action for e in store.state.audited].count(AuditAction.BILLING_PROFILE_SET) == 2
