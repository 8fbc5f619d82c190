"""The ingestion window: events older than --max-event-age are refused unless backfilled, and a
backfill needs its own scope, is audited, and creates storage only for the months it fills."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Set
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import grpc
import pytest

from server.app import TallyServer
from server.cli import config_from_args, parse_args
from server.domain.access import USAGE_BACKFILL, USAGE_WRITE
from server.domain.audit import AuditEntry
from server.domain.events import EventColumns, EventKey, EventRow, EventRules, RawEvent, check_event
from server.domain.timeutil import MICROS_PER_DAY
from server.lanes import Lane
from server.storage.usage import AuditHook
from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.conftest import make_token, new_tenant
from tests.helpers import channel_with_token, event, field_violations, hour_start, totals

NOTHING = (0, Decimal(0), 0, Decimal(0))


class Catalog:
    def first_effective(self, service: str, usage_type: str) -> int | None:
        return 0


def test_the_window_ends_exactly_max_age_before_the_clock_and_a_backfill_skips_it() -> None:
    rules = EventRules(max_age_micros=35 * MICROS_PER_DAY)
    now = 1_000 * MICROS_PER_DAY

    def problems(time_micros: int, backfill: bool = False) -> dict[str, str]:
        raw = RawEvent("t", "e", "s", "u", "1", time_micros, {})
        return {v.field: v.description for v in check_event(raw, Catalog(), rules, now, backfill=backfill)}

    oldest = now - 35 * MICROS_PER_DAY
    assert problems(oldest) == {}
    assert "35 days before the server's clock" in problems(oldest - 1)["event_time"]
    assert "backfill" in problems(oldest - 1)["event_time"]
    assert problems(oldest - 1, backfill=True) == {}
    assert problems(1, backfill=True) == {}
    assert (
        "ahead" in problems(now + 3600 * 1_000_000, backfill=True)["event_time"]
    )  # the future is never backfilled


async def ingest(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    events: list[resources_pb2.UsageEvent],
    *,
    backfill: bool,
    request_id: str | None = None,
) -> usage_service_pb2.IngestUsageResponse:
    async def requests() -> AsyncIterator[usage_service_pb2.IngestUsageRequest]:
        yield usage_service_pb2.IngestUsageRequest(events=events, backfill=backfill)

    metadata = None if request_id is None else (("x-request-id", request_id),)
    response: usage_service_pb2.IngestUsageResponse = await usage.IngestUsage(requests(), metadata=metadata)
    return response


async def audit_rows(db: asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT principal, request_id, action, resource, before, after::text AS after"
        " FROM audit_events WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    return rows


async def test_an_event_older_than_the_window_is_rejected_with_the_reason_and_nothing_stored(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    too_old = datetime.now(UTC) - timedelta(days=36)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, "r", time=too_old)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason = field_violations(raised.value)["event.event_time"]
    assert "more than 35 days before the server's clock" in reason and "backfill" in reason

    response = await ingest(usage, [event(tenant, "i", time=too_old)], backfill=False)
    assert (response.accepted_count, response.rejected_count) == (0, 1)
    assert (response.rejections[0].field, response.rejections[0].reason) == ("event_time", reason)
    assert await totals(db, tenant) == NOTHING
    assert await audit_rows(db, tenant) == []

    inside = await ingest(usage, [event(tenant, "in", time=hour_start(-24 * 34))], backfill=False)
    assert inside.accepted_count == 1


async def test_a_backfill_records_old_usage_and_audits_who_and_how_much(
    tally: TallyServer, usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    old = hour_start(-24 * 400)
    request_id = f"backfill-{uuid.uuid4().hex}"
    first = await ingest(
        usage,
        [
            event(tenant, "a", quantity="2", time=old),
            event(tenant, "b", quantity="3", time=old + timedelta(days=3)),
        ],
        backfill=True,
        request_id=request_id,
    )
    assert (first.accepted_count, first.duplicate_count, first.rejected_count) == (2, 0, 0)
    again = await ingest(usage, [event(tenant, "a", quantity="2", time=old)], backfill=True)
    assert (again.accepted_count, again.duplicate_count) == (0, 1)
    assert await totals(db, tenant) == (2, Decimal(5), 2, Decimal(5))

    # One entry for the batch that changed something; none for the resend of a duplicate.
    rows = await audit_rows(db, tenant)
    assert [(r["principal"], r["request_id"], r["action"], r["resource"], r["before"]) for r in rows] == [
        ("test-service", request_id, "usage_backfilled", f"tenants/{tenant}/usage", None)
    ]
    assert json.loads(rows[0]["after"]) == {
        "accepted_count": 2,
        "duplicate_count": 0,
        "first_event_time": old.isoformat(),
        "last_event_time": (old + timedelta(days=3)).isoformat(),
        "usage_types": ["marketplace/wpk_upload"],
    }
    async with channel_with_token(f"127.0.0.1:{tally.port}", make_token()) as channel:
        listed = await billing_service_pb2_grpc.BillingServiceStub(channel).ListAuditEvents(
            billing_service_pb2.ListAuditEventsRequest(tenant_id=tenant)
        )
    assert [e.action for e in listed.audit_events] == [resources_pb2.AUDIT_ACTION_USAGE_BACKFILLED]


async def test_stream_usage_backfills_batch_by_batch(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    old = hour_start(-24 * 100)
    call = usage.StreamUsage()
    await call.write(usage_service_pb2.StreamUsageRequest(sequence=1, events=[event(tenant, "x", time=old)]))
    refused = await call.read()
    await call.write(
        usage_service_pb2.StreamUsageRequest(sequence=2, events=[event(tenant, "x", time=old)], backfill=True)
    )
    accepted = await call.read()
    await call.done_writing()
    assert (refused.rejected_count, refused.rejections[0].field) == (1, "event_time")
    assert accepted.accepted_count == 1
    assert await totals(db, tenant) == (1, Decimal(1), 1, Decimal(1))
    assert [r["action"] for r in await audit_rows(db, tenant)] == ["usage_backfilled"]


async def test_a_backfill_without_its_scope_is_refused_and_writes_nothing(
    tally: TallyServer, db: asyncpg.Pool, tenant: str
) -> None:
    old = hour_start(-24 * 400)
    async with channel_with_token(f"127.0.0.1:{tally.port}", make_token([tenant], (USAGE_WRITE,))) as channel:
        stub = usage_service_pb2_grpc.UsageServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await ingest(stub, [event(tenant, "a", time=old)], backfill=True)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert USAGE_BACKFILL in (raised.value.details() or "")
        call = stub.StreamUsage()
        await call.write(
            usage_service_pb2.StreamUsageRequest(
                sequence=1, events=[event(tenant, "b", time=old)], backfill=True
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call.read()
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await totals(db, tenant) == NOTHING
    assert await audit_rows(db, tenant) == []


async def test_a_tenant_token_with_the_scope_backfills_only_its_tenant(
    tally: TallyServer, db: asyncpg.Pool, tenant: str
) -> None:
    other = new_tenant()
    old = hour_start(-24 * 400)
    token = make_token([tenant], (USAGE_WRITE, USAGE_BACKFILL), subject="tenant-admin")
    async with channel_with_token(f"127.0.0.1:{tally.port}", token) as channel:
        stub = usage_service_pb2_grpc.UsageServiceStub(channel)
        response = await ingest(
            stub, [event(tenant, "a", time=old), event(other, "b", time=old)], backfill=True
        )
    assert (response.accepted_count, response.rejected_count) == (1, 1)
    assert response.rejections[0].cause == resources_pb2.REJECTION_CAUSE_PERMISSION_DENIED
    assert await totals(db, other) == NOTHING
    assert [r["principal"] for r in await audit_rows(db, tenant)] == ["tenant-admin"]
    assert await audit_rows(db, other) == []


async def test_a_batch_with_two_far_apart_months_creates_exactly_two_partitions(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    # Months that no other test uses; the range between them would be 54 partitions.
    early, late = datetime(1987, 3, 10, tzinfo=UTC), datetime(1991, 8, 20, tzinfo=UTC)
    response = await ingest(
        usage, [event(tenant, "e", time=early), event(tenant, "l", time=late)], backfill=True
    )
    assert response.accepted_count == 2
    names = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'usage_events'::regclass"
        " AND c.relname BETWEEN 'usage_events_1987_03' AND 'usage_events_1991_08' ORDER BY 1"
    )
    assert [r["relname"] for r in names] == ["usage_events_1987_03", "usage_events_1991_08"]


def test_max_event_age_comes_from_the_flag_the_environment_or_35_days(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def configured(*flags: str) -> int:
        return config_from_args(parse_args(["serve", *flags])).max_event_age_seconds

    monkeypatch.delenv("TALLY_MAX_EVENT_AGE", raising=False)
    assert configured() == 35 * 86_400
    assert configured("--max-event-age", "7d") == 7 * 86_400
    monkeypatch.setenv("TALLY_MAX_EVENT_AGE", "12h")
    assert configured() == 12 * 3_600
    monkeypatch.setenv("TALLY_MAX_EVENT_AGE", "soon")
    with pytest.raises(SystemExit, match="TALLY_MAX_EVENT_AGE"):
        configured()


async def test_a_backfilled_batch_is_written_alone_in_its_place_in_the_lane() -> None:
    """Batches waiting on a lane share a transaction, except a backfill: its audit entries must
    count exactly its own new events, so it gets a transaction of its own, in stream order."""
    writes: list[tuple[list[str], bool]] = []
    release = asyncio.Event()

    class Store:
        async def record_new_keys(
            self, columns: EventColumns, audit: AuditHook | None = None
        ) -> set[EventKey]:
            writes.append((list(columns.event_ids), audit is not None))
            await release.wait()
            keys = set(zip(columns.tenant_ids, columns.event_ids, strict=True))
            if audit is not None:
                audit(keys)
            return keys

    def rows(*ids: str) -> dict[EventKey, EventRow]:
        return {("t", i): EventRow("t", i, "s", "u", "1", 0, "{}") for i in ids}

    audited: list[set[EventKey]] = []

    def audit(keys: Set[EventKey]) -> list[AuditEntry]:
        audited.append(set(keys))
        return []

    lane = Lane(Store(), max_events=100)  # type: ignore[arg-type]
    first = lane.submit(rows("a"))
    await asyncio.sleep(0)  # the lane starts writing "a"; the rest queue behind it
    waiting = [
        lane.submit(rows("b")),
        lane.submit(rows("c", "d"), audit),
        lane.submit(rows("e")),
        lane.submit(rows("f")),
    ]
    release.set()
    assert [await f for f in (first, *waiting)] == [1, 1, 2, 1, 1]
    assert writes == [(["a"], False), (["b"], False), (["c", "d"], True), (["e", "f"], False)]
    assert audited == [{("t", "c"), ("t", "d")}]
