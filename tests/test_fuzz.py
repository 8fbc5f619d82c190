"""Arbitrary input never looks like a server fault, and odd but valid ids are kept verbatim.

Hypothesis builds messages of the real request types, field by field from their
descriptors (strings full of quotes, SQL and unicode, out-of-range numbers and times),
and raw bytes that may not be protobuf at all, and sends them to every RPC with a token
that passes authentication. No answer may be UNKNOWN or INTERNAL; afterwards the server
is still SERVING and a control tenant's totals and invoice are unchanged.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.domain.access import SCOPES
from tally.v1 import billing_service_pb2, usage_service_pb2
from tests.conftest import make_token, new_tenant
from tests.helpers import event, hour_start, totals, ts
from tests.rpcs import RPCS, Rpc, invoke

SERVER_FAULTS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
NASTY = [
    "",
    " ",
    "'",
    '"',
    "'; DROP TABLE usage_events; --",
    '" OR 1=1 --',
    "$1",
    "%s%n",
    "\\",
    "\x00",
    "\u202e\u0301ü🧾",
    "a" * 129,
    "0.000000001",
    "-1",
    "1e3",
    "NaN",
    "999999999999999999.999999999",
    "inv_" + "0" * 32,
    "marketplace",
    "wpk_upload",
    "fuzz",
    "region",
]
TEXT = st.one_of(st.sampled_from(NASTY), st.text(max_size=40), st.text(max_size=300))
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1]))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 2**63 - 1]))
# The real rate card must not change under the other tests' feet: SetRate goes to other services.
PROTECTED_SERVICES = {"marketplace", "analytics", "storage", "compute"}

_SCALARS = {
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_ENUM: st.one_of(st.integers(-1, 5), INT32),
}


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    if descriptor.full_name == "google.protobuf.Timestamp":
        message.seconds = draw(
            st.one_of(st.integers(-(2**40), 2**40), st.just(int(hour_start(-1).timestamp())))
        )
        message.nanos = draw(st.one_of(st.just(0), INT32))
        return message
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                entries = draw(st.dictionaries(TEXT, TEXT, max_size=20))
                getattr(message, field.name).update(entries)
            elif depth < 3:
                count = draw(st.integers(0, 3)) if field.is_repeated else 1
                values = [draw(messages(field.message_type, depth + 1)) for _ in range(count)]
                if field.is_repeated:
                    getattr(message, field.name).extend(values)
                else:
                    getattr(message, field.name).CopyFrom(values[0])
        else:
            strategy = _SCALARS[field.type]
            if field.is_repeated:
                getattr(message, field.name).extend(draw(st.lists(strategy, max_size=5)))
            else:
                setattr(message, field.name, draw(strategy))
    if descriptor.name == "SetRateRequest" and message.service in PROTECTED_SERVICES:
        message.service = "fuzz"
    return message


@pytest_asyncio.fixture(scope="module")
async def control(usage: Any, billing: Any, db: asyncpg.Pool) -> tuple[str, tuple[Any, ...], str]:
    """A tenant with usage and an invoice: (tenant, its totals, its invoice as bytes)."""
    tenant = new_tenant()
    await usage.ReportUsage(
        usage_service_pb2.ReportUsageRequest(event=event(tenant, quantity="7", time=hour_start(-2)))
    )
    invoice = await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{tenant}",
            period_start_time=ts(hour_start(-3)),
            period_end_time=ts(hour_start(-1)),
        )
    )
    invoice.invoice.ClearField("compute_time")  # a draft is priced again on every read
    return tenant, await totals(db, tenant), invoice.invoice.SerializeToString()


async def assert_unharmed(
    health: Any, billing: Any, db: asyncpg.Pool, control: tuple[str, tuple[Any, ...], str]
) -> None:
    tenant, before, invoice = control
    # Polled, not asserted at once: on a loaded machine one probe of the database may take longer
    # than its 2 s timeout, and health reads NOT_SERVING until the next probe.
    deadline = time.monotonic() + 60
    while (
        await health.Check(health_pb2.HealthCheckRequest())
    ).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health stayed NOT_SERVING"
        await asyncio.sleep(0.1)
    assert await totals(db, tenant) == before
    listed = await billing.ListInvoices(billing_service_pb2.ListInvoicesRequest(parent=f"tenants/{tenant}"))
    for listed_invoice in listed.invoices:
        listed_invoice.ClearField("compute_time")  # when it was read: the rest must be as generated
    assert [i.SerializeToString() for i in listed.invoices] == [invoice]


async def send(channel: grpc.aio.Channel, rpc: Rpc, requests: list[Any]) -> None:
    try:
        await invoke(channel, rpc, requests, token=make_token("all", SCOPES, subject="fuzzer"))
    except grpc.aio.AioRpcError as error:
        assert error.code() not in SERVER_FAULTS, (error.code(), error.details())


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name.split("/")[1])
@FUZZ
@given(data=st.data())
async def test_arbitrary_messages_never_get_unknown_or_internal(
    bare_channel: grpc.aio.Channel, rpc: Rpc, data: st.DataObject
) -> None:
    count = data.draw(st.integers(1, 3)) if rpc.client_streaming else 1
    requests = [data.draw(messages(rpc.request_type.DESCRIPTOR)) for _ in range(count)]
    await send(bare_channel, rpc, requests)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name.split("/")[1])
@FUZZ
@given(data=st.data())
async def test_arbitrary_bytes_never_get_unknown_or_internal(
    bare_channel: grpc.aio.Channel, rpc: Rpc, data: st.DataObject
) -> None:
    count = data.draw(st.integers(1, 3)) if rpc.client_streaming else 1
    blobs = [
        data.draw(
            st.one_of(st.binary(max_size=300), st.sampled_from([b"\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb"]))
        )
        for _ in range(count)
    ]
    await send(bare_channel, rpc, blobs)


async def test_server_is_unharmed_by_the_fuzzing(
    health: Any,
    billing: Any,
    db: asyncpg.Pool,
    control: tuple[str, tuple[Any, ...], str],
    bare_channel: grpc.aio.Channel,
) -> None:
    # Runs after the fuzz tests of this module (pytest keeps file order); the control tenant
    # was created before them.
    await assert_unharmed(health, billing, db, control)


async def test_ids_and_dimensions_full_of_quotes_sql_and_unicode_are_kept_verbatim(
    usage: Any, billing: Any, db: asyncpg.Pool, bare_channel: grpc.aio.Channel
) -> None:
    tenant = 'Robert\'); DROP TABLE usage_events;-- "ü" 🧾 ' + new_tenant()
    event_ids = ['it\'s "quoted"', "1' OR '1'='1", "ünï\u0301cödé 🧾", "$1::text", "back\\slash %_"]
    key, value = "ré'gion\"; --", "eu-wést-1' OR 1=1; -- ☃"
    for event_id in event_ids:
        response = await usage.ReportUsage(
            usage_service_pb2.ReportUsageRequest(
                event=event(tenant, event_id, time=hour_start(-1), dimensions={key: value})
            )
        )
        assert (response.tenant_id, response.event_id) == (tenant, event_id)
    stored = await db.fetch(
        "SELECT event_id, dimensions ->> $2 AS v FROM usage_events WHERE tenant_id = $1", tenant, key
    )
    assert sorted((r["event_id"], r["v"]) for r in stored) == sorted((e, value) for e in event_ids)

    # A token naming exactly this tenant reads it back verbatim.
    token = make_token([tenant], SCOPES)
    summary_rpc = next(r for r in RPCS if r.name.endswith("/GetUsageSummary"))
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary",
        start_time=ts(hour_start(-1)),
        end_time=ts(hour_start(0)),
        group_by_dimension=key,
    )
    [answer] = await invoke(bare_channel, summary_rpc, [request], token=token)
    assert answer.summary.tenant_id == tenant
    assert [(a.dimension_value, a.quantity, a.event_count) for a in answer.summary.aggregates] == [
        (value, "5", 5)
    ]
    invoice = await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=f"tenants/{tenant}",
            period_start_time=ts(hour_start(-1)),
            period_end_time=ts(hour_start(0)),
        )
    )
    assert (invoice.invoice.tenant_id, Decimal(invoice.invoice.total)) == (tenant, Decimal("0.50"))
    audit = await billing.ListAuditEvents(billing_service_pb2.ListAuditEventsRequest(tenant_id=tenant))
    assert [e.tenant_id for e in audit.audit_events] == [tenant]
