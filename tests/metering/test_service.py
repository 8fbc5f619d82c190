"""Metering (server.metering.service) on in-memory stores: its use cases without gRPC or PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from server.auth.limits import Limiter
from server.config import LimitSettings
from server.domain.access import ALL_TENANTS, USAGE_WRITE, Caller, Principal
from server.domain.errors import ErrorReason, InvalidArgument, PermissionDenied, ResourceExhausted
from server.domain.events import EventRules, RawEvent
from server.domain.inputs import SummaryQuery
from server.domain.models import Rate
from server.domain.pagination import PageTokens
from server.domain.timeutil import MICROS_PER_HOUR, to_micros
from server.metering import BatchOutcome, Metering
from server.metering.meters import MeterCatalog
from server.metering.pipeline import EventBudget
from server.ratecard import RateCardCache
from tests.memory_stores import EPOCH, FakeLedger, FakeMeterBook, FakeRateBook

NOW = to_micros(datetime(2026, 3, 1, 12, tzinfo=UTC))


class StillClock:
    """A limiter clock that never moves: spent rate never comes back within a test."""

    def __call__(self) -> float:
        return 1_000.0

    def wall(self) -> float:
        return 1_000.0


@dataclass
class Batch:
    """An IncomingBatch that counts how often its events were decoded."""

    raw: list[RawEvent]
    backfill: bool = False
    decoded: int = 0

    @property
    def size(self) -> int:
        return len(self.raw)

    def events(self) -> list[RawEvent]:
        self.decoded += 1
        return list(self.raw)


def event(tenant: str, event_id: str, quantity: str = "1") -> RawEvent:
    return RawEvent(tenant, event_id, "api", "calls", quantity, NOW - MICROS_PER_HOUR, {})


def caller(tenants: frozenset[str] | str = ALL_TENANTS) -> Caller:
    return Caller(Principal("svc", tenants, frozenset({USAGE_WRITE})), "req-1")  # type: ignore[arg-type]


async def metering(
    ledger: FakeLedger, *, max_batch_size: int = 100, events_per_second: float = 0
) -> Metering:
    rate_card = RateCardCache(FakeRateBook(Rate("api", "calls", Decimal("0.5"), "USD", EPOCH, EPOCH)))
    await rate_card.reload()
    meters = MeterCatalog(FakeMeterBook(), rate_card, PageTokens(b"k" * 32))
    limits = LimitSettings(tenant_events_per_second=events_per_second, principal_events_per_second=0)
    return Metering(
        ledger,
        rate_card,
        EventRules(max_batch_size=max_batch_size),
        lambda: NOW,
        meters,
        limiter=Limiter(limits, StillClock()),
        budget=EventBudget(10_000),
    )


async def stream(service: Metering, who: Caller, *batches: Batch) -> list[BatchOutcome]:
    async def messages() -> AsyncIterator[Batch]:
        for batch in batches:
            yield batch

    async with contextlib.aclosing(service.record_stream(who, messages(), lambda b: b)) as outcomes:
        return [outcome async for _, outcome in outcomes]


async def test_a_stream_records_each_event_once_and_answers_in_order() -> None:
    ledger = FakeLedger()
    service = await metering(ledger)
    first = Batch([event("t1", "a"), event("t1", "b")])
    second = Batch([event("t1", "b"), event("t2", "c"), event("t2", "c")])
    outcomes = await stream(service, caller(), first, second)
    await service.drain()
    assert [(o.accepted, o.duplicates, o.rejections) for o in outcomes] == [(2, 0, []), (1, 2, [])]
    assert sorted(ledger.events) == [("t1", "a"), ("t1", "b"), ("t2", "c")]


async def test_an_oversized_batch_is_refused_once_before_its_events_are_decoded() -> None:
    service = await metering(FakeLedger(), max_batch_size=2)
    oversized = Batch([event("t1", str(i)) for i in range(3)])
    with pytest.raises(InvalidArgument) as raised:
        await stream(service, caller(), oversized)
    assert raised.value.reason is ErrorReason.BATCH_TOO_LARGE
    assert raised.value.metadata == {"maxBatchSize": "2"}
    assert oversized.decoded == 0


async def test_events_for_another_tenant_are_rejected_one_by_one() -> None:
    ledger = FakeLedger()
    service = await metering(ledger)
    (outcome,) = await stream(service, caller(frozenset({"t1"})), Batch([event("t1", "a"), event("t2", "b")]))
    await service.drain()
    assert (outcome.accepted, [(r.index, r.field) for r in outcome.rejections]) == (1, [(1, "tenant_id")])
    assert list(ledger.events) == [("t1", "a")]


async def test_a_report_beyond_the_tenants_event_rate_is_refused_and_not_recorded() -> None:
    ledger = FakeLedger()
    service = await metering(ledger, events_per_second=1)  # a bucket of one event, never refilled
    assert await service.report(event("t1", "a"), caller().principal) is True
    with pytest.raises(ResourceExhausted) as raised:
        await service.report(event("t1", "b"), caller().principal)
    assert raised.value.reason is ErrorReason.RATE_LIMITED
    assert list(ledger.events) == [("t1", "a")]


async def test_a_summary_checks_the_caller_before_the_query() -> None:
    service = await metering(FakeLedger())
    bad_range = SummaryQuery(None, None)
    with pytest.raises(PermissionDenied):
        await service.summary("t2", bad_range, caller(frozenset({"t1"})).principal)
    with pytest.raises(InvalidArgument):
        await service.summary("t1", bad_range, caller(frozenset({"t1"})).principal)


async def test_a_summary_reads_only_the_parts_its_query_asks_for() -> None:
    ledger = FakeLedger()
    service = await metering(ledger)
    await stream(service, caller(), Batch([event("t1", "a", "2.5")]))
    await service.drain()
    principal = caller().principal
    whole = await service.summary("t1", SummaryQuery(NOW - MICROS_PER_HOUR, NOW), principal)
    assert [a.quantity for a in whole.aggregates] == ["2.5"]
    assert ledger.reads == {"summarize": 1, "summarize_meters": 1}
    meters_only = SummaryQuery(NOW - MICROS_PER_HOUR, NOW, with_aggregates=False)
    assert (await service.summary("t1", meters_only, principal)).aggregates == ()
    usage_only = SummaryQuery(NOW - MICROS_PER_HOUR, NOW, with_meter_values=False)
    assert [s.tenant_id async for s in service.summaries(["t1"], usage_only, principal)] == ["t1"]
    assert ledger.reads == {"summarize": 2, "summarize_meters": 2}


async def test_a_restricted_caller_listing_no_tenant_gets_its_own_tenants_with_usage() -> None:
    ledger = FakeLedger()
    service = await metering(ledger)
    await stream(service, caller(), Batch([event("t1", "a", "2.5"), event("t2", "b"), event("t3", "c")]))
    await service.drain()
    query = SummaryQuery(NOW - 2 * MICROS_PER_HOUR, NOW)
    principal = caller(frozenset({"t1", "t2", "t9"})).principal
    summaries = [s async for s in service.summaries([], query, principal)]
    assert [(s.tenant_id, [(a.quantity, a.event_count) for a in s.aggregates]) for s in summaries] == [
        ("t1", [("2.5", 1)]),
        ("t2", [("1", 1)]),
    ]
