"""ReportUsage: one event, recorded once, with precise errors for bad input."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import grpc
import pytest

from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tests.helpers import event, field_violations, hour_start


async def stored(db: asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT event_id, quantity, event_time, dimensions FROM usage_events"
        " WHERE tenant_id = $1 ORDER BY event_id",
        tenant,
    )


async def test_new_event_is_recorded_and_stored_verbatim(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    when = hour_start(-2) + timedelta(minutes=7, microseconds=123456)
    response = await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(
            event=event(tenant, "evt-1", quantity="1.5", time=when, dimensions={"region": "eu-west-1"})
        )
    )
    assert response.outcome == usage_service_pb2.REPORT_OUTCOME_RECORDED
    assert (response.tenant_id, response.event_id) == (tenant, "evt-1")
    rows = await stored(db, tenant)
    assert len(rows) == 1
    assert str(rows[0]["quantity"]) == "1.5"
    assert rows[0]["event_time"] == when
    assert rows[0]["dimensions"] == '{"region": "eu-west-1"}'


async def test_resent_event_is_a_duplicate_and_changes_nothing(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    first = await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, "same", quantity="2"))
    )
    again = await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, "same", quantity="9"))
    )
    assert first.outcome == usage_service_pb2.REPORT_OUTCOME_RECORDED
    assert again.outcome == usage_service_pb2.REPORT_OUTCOME_DUPLICATE
    rows = await stored(db, tenant)
    assert [str(r["quantity"]) for r in rows] == ["2"]
    rollup = await db.fetchrow(
        "SELECT sum(quantity) AS q, sum(event_count) AS n FROM usage_rollups WHERE tenant_id = $1", tenant
    )
    assert (str(rollup["q"]), rollup["n"]) == ("2", 1)


async def test_missing_time_means_now(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, "now")))
    row = await db.fetchrow("SELECT event_time, received_at FROM usage_events WHERE tenant_id = $1", tenant)
    assert abs((row["received_at"] - row["event_time"]).total_seconds()) < 5


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tenant_id": ""}, "event.tenant_id"),
        ({"tenant_id": " padded"}, "event.tenant_id"),
        ({"tenant_id": "x" * 129}, "event.tenant_id"),
        ({"event_id": ""}, "event.event_id"),
        ({"event_id": "bad\x00id"}, "event.event_id"),
        ({"event_id": "tab\there"}, "event.event_id"),
        ({"service": "nope"}, "event.usage_type"),
        ({"usage_type": "wpk_delete"}, "event.usage_type"),
        ({"service": ""}, "event.service"),
        ({"quantity": ""}, "event.quantity"),
        ({"quantity": "-1"}, "event.quantity"),
        ({"quantity": "abc"}, "event.quantity"),
        ({"quantity": "NaN"}, "event.quantity"),
        ({"quantity": "Infinity"}, "event.quantity"),
        ({"quantity": "1e3"}, "event.quantity"),
        ({"quantity": " 1"}, "event.quantity"),
        ({"quantity": "1.0000000001"}, "event.quantity"),
        ({"quantity": "1" * 19}, "event.quantity"),
        ({"quantity": "\u0661"}, "event.quantity"),  # a digit, but not an ASCII one
        ({"dimensions": {f"k{i}": "v" for i in range(17)}}, "event.dimensions"),
        ({"dimensions": {"region": "x" * 257}}, "event.dimensions[region]"),
        ({"dimensions": {"": "empty key"}}, "event.dimensions"),
    ],
)
async def test_bad_event_is_invalid_argument_naming_the_field_and_writes_nothing(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    db: asyncpg.Pool,
    tenant: str,
    changes: dict[str, object],
    field: str,
) -> None:
    bad = event(tenant, "bad-event")
    for name, value in changes.items():
        if name == "dimensions":
            bad.dimensions.update(value)  # type: ignore[arg-type]
        elif name == "tenant_id":
            bad.tenant_id = value  # type: ignore[assignment]
        else:
            setattr(bad, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM usage_events WHERE event_id = 'bad-event' AND tenant_id = $1", bad.tenant_id
        )
        == 0
    )


async def test_time_far_in_the_future_is_rejected(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(3))))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event.event_time" in field_violations(raised.value)


async def test_malformed_timestamp_is_rejected(
    usage: usage_service_pb2_grpc.UsageServiceStub, tenant: str
) -> None:
    bad = event(tenant)
    bad.event_time.seconds = 10**15
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=bad))
    assert field_violations(raised.value) == {"event.event_time": "is not a valid timestamp"}


async def test_every_bad_field_is_reported_at_once(usage: usage_service_pb2_grpc.UsageServiceStub) -> None:
    bad = event("", quantity="-3", usage_type="unknown")
    bad.event_id = ""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=bad))
    assert set(field_violations(raised.value)) == {
        "event.tenant_id",
        "event.event_id",
        "event.usage_type",
        "event.quantity",
    }


async def test_ids_with_quotes_sql_and_unicode_are_stored_verbatim(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool
) -> None:
    tenant = 't\'; DROP TABLE usage_events; -- "ünïcødé" 租户 🚀'
    event_id = "e\"'\\%_ 🧾"
    dims = {"re'gion": '"eu"; DELETE FROM rates; --', "ключ": "значение"}
    response = await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, event_id, dimensions=dims))
    )
    assert (response.tenant_id, response.event_id) == (tenant, event_id)
    row = await db.fetchrow(
        "SELECT event_id, dimensions::text AS d FROM usage_events WHERE tenant_id = $1", tenant
    )
    assert row["event_id"] == event_id
    import json

    assert json.loads(row["d"]) == dims
    await db.execute("DELETE FROM usage_events WHERE tenant_id = $1", tenant)
    await db.execute("DELETE FROM usage_rollups WHERE tenant_id = $1", tenant)


async def test_bytes_that_are_not_protobuf_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    report = channel.unary_unary("/tally.v1.UsageService/ReportUsage", request_serializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await report(b"\x0a\x05\xff\xfe\xfd\xfc\xfb")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in field_violations(raised.value)

    ingest = channel.stream_unary("/tally.v1.UsageService/IngestUsage", request_serializer=None)

    async def garbage():  # type: ignore[no-untyped-def]
        yield b"\xff"

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ingest(garbage())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
