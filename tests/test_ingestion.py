"""IngestUsage (client streaming) and StreamUsage (bidirectional with acknowledgements)."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import grpc
import pytest

from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tests.helpers import event, field_violations, hour_start, ingest, totals


async def test_ingest_counts_accepted_duplicates_and_rejections(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    batch1 = [event(tenant, f"e{i}", quantity="1.25") for i in range(10)]
    batch2 = [
        event(tenant, "e3", quantity="1.25"),  # resent from batch 1
        event(tenant, "e10", quantity="2"),
        event(tenant, "e10", quantity="2"),  # repeated within the batch
        event(tenant, "e11", quantity="-1"),  # invalid
        event(tenant, "e12", usage_type="nope"),  # invalid
        event(tenant, "e13", quantity="0.75"),
    ]
    response = await ingest(usage, [batch1, batch2])
    assert (
        response.batch_count,
        response.accepted_count,
        response.duplicate_count,
        response.rejected_count,
    ) == (
        2,
        12,
        2,
        2,
    )
    assert [(r.batch_index, r.event_index, r.event_id, r.field) for r in response.rejections] == [
        (1, 3, "e11", "quantity"),
        (1, 4, "e12", "usage_type"),
    ]
    assert not response.rejections_truncated
    assert await totals(db, tenant) == (12, Decimal("15.25"), 12, Decimal("15.25"))


async def test_ingest_of_nothing_answers_zero(usage: usage_service_pb2_grpc.UsageServiceStub) -> None:
    response = await ingest(usage, [])
    assert response.batch_count == 0 and response.accepted_count == 0


async def test_oversized_batch_fails_the_stream_and_keeps_earlier_batches(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    small = [event(tenant, f"ok{i}") for i in range(3)]
    huge = [event(tenant, f"big{i}") for i in range(2_001)]  # the test server allows 2,000
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ingest(usage, [small, huge])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in field_violations(raised.value)
    assert await totals(db, tenant) == (3, Decimal("3"), 3, Decimal("3"))


async def test_rejection_list_is_capped_but_counts_are_exact(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    bad = [event(tenant, f"b{i}", quantity="x") for i in range(1_500)]
    response = await ingest(usage, [bad[:1_000], bad[1_000:]])
    assert response.rejected_count == 1_500
    assert len(response.rejections) == 1_000
    assert response.rejections_truncated


async def test_stream_acknowledges_each_batch_after_commit_with_its_sequence(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    call = usage.StreamUsage()
    for sequence in range(1, 4):
        await call.write(
            usage_service_pb2.StreamUsageRequest(
                sequence=sequence,
                events=[event(tenant, f"s{sequence}-{i}", quantity="0.5") for i in range(4)],
            )
        )
        ack = await call.read()
        assert (ack.sequence, ack.accepted_count, ack.duplicate_count, ack.rejected_count) == (
            sequence,
            4,
            0,
            0,
        )
        # Acknowledged means committed: the batch is visible to another connection now.
        assert (await totals(db, tenant))[0] == 4 * sequence
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await totals(db, tenant) == (12, Decimal("6"), 12, Decimal("6"))


async def test_stream_reports_rejections_per_batch(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    call = usage.StreamUsage()
    await call.write(
        usage_service_pb2.StreamUsageRequest(
            sequence=9, events=[event(tenant, "fine"), event(tenant, "late", time=hour_start(5))]
        )
    )
    ack = await call.read()
    await call.done_writing()
    assert (ack.sequence, ack.accepted_count, ack.rejected_count) == (9, 1, 1)
    assert (ack.rejections[0].event_index, ack.rejections[0].field) == (1, "event_time")


async def test_resending_unacknowledged_batches_after_reconnect_counts_nothing_twice(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    batches = [[event(tenant, f"r{b}-{i}", quantity="1.1") for i in range(50)] for b in range(4)]
    first = usage.StreamUsage()
    for sequence, batch in enumerate(batches):
        await first.write(usage_service_pb2.StreamUsageRequest(sequence=sequence, events=batch))
    acknowledged = [await first.read(), await first.read()]
    # The connection is lost with batches 2 and 3 unacknowledged: perhaps committed, perhaps still
    # being committed while they are sent again (no pause here, so the two may overlap).
    first.cancel()

    second = usage.StreamUsage()
    for sequence in (2, 3):
        await second.write(usage_service_pb2.StreamUsageRequest(sequence=sequence, events=batches[sequence]))
    resent = [await second.read(), await second.read()]
    await second.done_writing()

    assert [a.sequence for a in acknowledged] == [0, 1]
    assert [a.sequence for a in resent] == [2, 3]
    for ack in resent:
        assert ack.accepted_count + ack.duplicate_count == 50
    assert await totals(db, tenant) == (200, Decimal("220.0"), 200, Decimal("220.0"))


async def test_within_a_stream_the_earliest_batch_wins_even_when_batches_overlap(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    call = usage.StreamUsage()
    for sequence in range(12):  # written without waiting, so the server has several in flight
        batch = [event(tenant, "contested", quantity=str(sequence + 1))]
        batch += [event(tenant, f"filler-{sequence}-{i}") for i in range(300)]
        await call.write(usage_service_pb2.StreamUsageRequest(sequence=sequence, events=batch))
    await call.done_writing()
    acks = [ack async for ack in call]
    assert [a.sequence for a in acks] == list(range(12))
    assert [a.accepted_count for a in acks] == [301] + [300] * 11
    stored = await db.fetchval(
        "SELECT quantity FROM usage_events WHERE tenant_id = $1 AND event_id = 'contested'", tenant
    )
    assert stored == Decimal("1")
