"""The typed client's meters, cancelled events and multi-tenant summaries against the real server,
sync and async: exact values back, typed errors with their reasons."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from server.domain.access import SCOPES
from tally_client import (
    AlreadyExistsError,
    AsyncTallyClient,
    InvalidArgumentError,
    Meter,
    MeterBackfill,
    NotFoundError,
    PermissionDeniedError,
    TallyClient,
    UsageEvent,
)
from tests.conftest import make_token, new_tenant
from tests.helpers import hour_start, totals


def _definition(meter: Meter) -> Meter:
    """The meter without its state and backfill progress, which move on by themselves."""
    return dataclasses.replace(meter, state="", backfill=MeterBackfill(0, 0, None))


async def test_a_meter_is_created_read_listed_and_archived_with_its_whole_definition(
    client: AsyncTallyClient,
) -> None:
    meter_id = f"m-{uuid.uuid4().hex[:12]}"
    created = await client.create_meter(
        meter_id,
        "analytics",
        "query",
        "unique_count",
        description="premium users",
        filter={"tier": "premium"},
        value_dimension="user_id",
        group_by_dimensions=["region"],
    )
    assert (created.name, created.meter_id, created.description) == (
        f"meters/{meter_id}",
        meter_id,
        "premium users",
    )
    assert (created.service, created.usage_type, created.aggregation, created.value_dimension) == (
        "analytics",
        "query",
        "unique_count",
        "user_id",
    )
    assert (created.filter, created.group_by_dimensions) == ({"tier": "premium"}, ("region",))
    # A UNIQUE_COUNT meter is rebuilt from the earlier events first.
    assert (created.state, created.archive_time, created.backfill.end_time) == ("backfilling", None, None)
    assert created.create_time.tzinfo is not None

    assert _definition(await client.get_meter(f"meters/{meter_id}")) == _definition(created)
    listed = [m async for m in client.list_meters(page_size=3)]
    assert [m.meter_id for m in listed] == sorted(m.meter_id for m in listed)  # meter_id order, every page
    assert meter_id in [m.meter_id for m in listed]

    archived = await client.archive_meter(meter_id)
    assert (archived.state, archived.meter_id) == ("archived", meter_id)
    assert archived.archive_time is not None and archived.archive_time >= created.create_time
    again = await client.archive_meter(meter_id)
    assert (again.state, again.archive_time) == ("archived", archived.archive_time)


async def test_meter_mistakes_fail_with_their_reasons_or_before_anything_is_sent(
    client: AsyncTallyClient, address: str, tenant: str
) -> None:
    meter_id = f"m-{uuid.uuid4().hex[:12]}"
    request_id = uuid.uuid4().hex
    first = await client.create_meter(meter_id, "analytics", "query", "sum", request_id=request_id)
    resent = await client.create_meter(meter_id, "analytics", "query", "sum", request_id=request_id)
    assert resent == first  # a retry of the same call answers the first
    with pytest.raises(AlreadyExistsError) as exists:
        await client.create_meter(meter_id, "analytics", "query", "sum")
    assert exists.value.reason == "METER_EXISTS"
    with pytest.raises(NotFoundError) as missing:
        await client.get_meter("no-such-meter")
    assert missing.value.reason == "METER_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as unpriced:
        await client.create_meter(f"m-{uuid.uuid4().hex[:12]}", "analytics", "no_such_type", "max")
    assert [v.field for v in unpriced.value.field_violations] == ["meter.usage_type"]
    with pytest.raises(ValueError, match="aggregation must be one of sum, count"):
        await client.create_meter(f"m-{uuid.uuid4().hex[:12]}", "analytics", "query", "average")
    async with AsyncTallyClient(address, token=make_token([tenant], SCOPES)) as one_tenant:
        with pytest.raises(PermissionDeniedError) as denied:
            await one_tenant.archive_meter(meter_id)
    assert denied.value.reason == "ALL_TENANTS_REQUIRED"


async def test_a_cancelled_event_stops_counting_and_cancelling_again_answers_the_first_time(
    client: AsyncTallyClient, db: asyncpg.Pool, tenant: str
) -> None:
    start = hour_start(-1)
    for event_id, quantity in (("c-1", "2"), ("c-2", "0.25")):
        event = UsageEvent(
            tenant, "analytics", "query", Decimal(quantity), event_id=event_id, event_time=start
        )
        await client.report_usage(event)
    cancelled = await client.cancel_event(tenant, "c-2")
    assert (cancelled.tenant_id, cancelled.event_id) == (tenant, "c-2")
    assert cancelled.cancel_time.tzinfo is not None
    summary = await client.get_usage_summary(tenant, start, start + timedelta(hours=1))
    assert [(a.quantity, a.event_count) for a in summary.aggregates] == [(Decimal(2), 1)]
    assert (await totals(db, tenant))[2:] == (1, Decimal(2))
    assert await client.cancel_event(tenant, "c-2") == cancelled
    with pytest.raises(NotFoundError) as missing:
        await client.cancel_event(tenant, "never-sent")
    assert missing.value.reason == "EVENT_NOT_FOUND"


async def test_streamed_summaries_carry_the_meters_asked_for_per_tenant(client: AsyncTallyClient) -> None:
    meter_id = f"m-{uuid.uuid4().hex[:12]}"
    await client.create_meter(meter_id, "analytics", "query", "sum", filter={"tier": "premium"})
    first, second = sorted((new_tenant(), new_tenant()))
    start = hour_start(0)
    for tenant, quantity, tier in (
        (first, "0.5", "premium"),
        (first, "2", "basic"),
        (second, "0.25", "premium"),
    ):
        await client.report_usage(
            UsageEvent(
                tenant, "analytics", "query", Decimal(quantity), event_time=start, dimensions={"tier": tier}
            )
        )
    end = start + timedelta(hours=1)
    summaries = [
        s
        async for s in client.stream_usage_summaries(
            start, end, tenant_ids=[first, second], meters=[meter_id]
        )
    ]
    assert [
        (s.tenant_id, [(m.meter, m.aggregation, m.value) for m in s.meter_aggregates]) for s in summaries
    ] == [
        (first, [(f"meters/{meter_id}", "sum", Decimal("0.5"))]),
        (second, [(f"meters/{meter_id}", "sum", Decimal("0.25"))]),
    ]
    assert [a.quantity for a in summaries[0].aggregates] == [Decimal("2.5")]
    with pytest.raises(NotFoundError) as missing:
        [
            s
            async for s in client.stream_usage_summaries(
                start, end, tenant_ids=[first], meters=["no-such-meter"]
            )
        ]
    assert missing.value.reason == "METER_NOT_FOUND"


async def test_the_sync_client_has_the_same_meter_cancel_and_plan_calls(address: str, tenant: str) -> None:
    meter_id = f"m-{uuid.uuid4().hex[:12]}"
    start = hour_start(-2)

    def script() -> tuple[list[Decimal], str, str, list[str], str | None]:
        # The blocking client runs in a thread: the session's server shares this event loop.
        with TallyClient(address, token=make_token()) as sync:
            sync.create_meter(meter_id, "storage", "gb_hour", "max")
            for event_id, quantity in (("g-1", "7.5"), ("g-2", "12")):
                sync.report_usage(
                    UsageEvent(
                        tenant, "storage", "gb_hour", Decimal(quantity), event_id=event_id, event_time=start
                    )
                )
            sync.cancel_event(tenant, "g-2")
            [summary] = sync.stream_usage_summaries(
                start, start + timedelta(hours=1), tenant_ids=[tenant], meters=[f"meters/{meter_id}"]
            )
            state = sync.archive_meter(meter_id).state
            plans = [plan.plan_id for plan in sync.list_plans(page_size=1)]
            try:
                sync.get_billing_profile(tenant)
            except NotFoundError as exc:
                return (
                    [m.value for m in summary.meter_aggregates],
                    state,
                    sync.get_meter(meter_id).state,
                    plans,
                    exc.reason,
                )
        raise AssertionError("no error")

    values, archived, read_back, plans, reason = await asyncio.to_thread(script)
    # The cancelled 12 no longer counts: the max is the remaining 7.5.
    assert (values, archived, read_back) == ([Decimal("7.5")], "archived", "archived")
    assert plans[0] == "default" and len(plans) == len(set(plans))
    assert reason == "BILLING_PROFILE_NOT_FOUND"
