"""Exactly once under concurrency, and totals that do not depend on how events arrive.

The properties generate a set of events, then deliver them in arbitrary batches, order,
duplicates and resends, over IngestUsage or StreamUsage; the summary and the invoice
must equal those computed from the distinct events alone.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    resources_pb2,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tests.conftest import new_tenant
from tests.helpers import event, hour_start, totals, ts

PRICES = {"wpk_upload": Decimal("0.10"), "wpk_review": Decimal("0.05")}
BASE = hour_start(-24 * 20)


async def stream_batches(
    usage: usage_service_pb2_grpc.UsageServiceStub, batches: list[list[resources_pb2.UsageEvent]]
) -> list[usage_service_pb2.StreamUsageResponse]:
    call = usage.StreamUsage()
    acks = []
    for sequence, batch in enumerate(batches):
        await call.write(usage_service_pb2.StreamUsageRequest(sequence=sequence, events=batch))
        acks.append(await call.read())
    await call.done_writing()
    return acks


async def test_two_streams_sending_overlapping_events_count_each_once(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    events = [
        event(tenant, f"o{i}", quantity="0.5", time=BASE + timedelta(minutes=i % 120)) for i in range(2_000)
    ]
    # Both streams send every event, in opposite orders and in batches of different sizes.
    forward = [events[i : i + 250] for i in range(0, 2_000, 250)]
    backward = [list(reversed(events))[i : i + 160] for i in range(0, 2_000, 160)]
    acks_a, acks_b = await asyncio.gather(stream_batches(usage, forward), stream_batches(usage, backward))
    accepted = sum(a.accepted_count for a in acks_a + acks_b)
    duplicates = sum(a.duplicate_count for a in acks_a + acks_b)
    assert (accepted, duplicates) == (2_000, 2_000)
    assert await totals(db, tenant) == (2_000, Decimal("1000"), 2_000, Decimal("1000"))


async def test_many_concurrent_reports_of_one_event_record_it_once(
    usage: usage_service_pb2_grpc.UsageServiceStub, db: asyncpg.Pool, tenant: str
) -> None:
    same = event(tenant, "contended", quantity="7")
    responses = await asyncio.gather(
        *[usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=same)) for _ in range(20)]
    )
    outcomes = [r.outcome for r in responses]
    assert outcomes.count(usage_service_pb2.REPORT_OUTCOME_RECORDED) == 1
    assert outcomes.count(usage_service_pb2.REPORT_OUTCOME_DUPLICATE) == 19
    assert await totals(db, tenant) == (1, Decimal("7"), 1, Decimal("7"))


# An event here: (usage type, quantity in thousandths, minute offset within 6 hours).
event_specs = st.lists(
    st.tuples(st.sampled_from(sorted(PRICES)), st.integers(0, 5_000_000), st.integers(0, 6 * 60 - 1)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=event_specs, data=st.data())
async def test_totals_do_not_depend_on_batching_order_duplicates_or_resends(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    billing: billing_service_pb2_grpc.BillingServiceStub,
    specs: list[tuple[str, int, int]],
    data: st.DataObject,
) -> None:
    tenant = new_tenant()
    events = [
        event(
            tenant,
            f"p{i}",
            usage_type=kind,
            quantity=str(Decimal(milli) / 1000),
            time=BASE + timedelta(minutes=m),
        )
        for i, (kind, milli, m) in enumerate(specs)
    ]
    # Expected from the distinct events alone.
    quantity: dict[str, Decimal] = defaultdict(Decimal)
    for kind, milli, _ in specs:
        quantity[kind] += Decimal(milli) / 1000
    expected_total = sum(
        ((q * PRICES[k]).quantize(Decimal("0.01"), rounding="ROUND_HALF_UP") for k, q in quantity.items()),
        Decimal("0.00"),
    )

    # Deliver: every event at least once, some several times, shuffled, in random batches.
    resends = data.draw(st.lists(st.sampled_from(range(len(events))), max_size=20), label="resends")
    delivery = data.draw(st.permutations([*range(len(events)), *resends]), label="order")
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(delivery) - 1)), max_size=6), label="cuts"))
    batches = [
        [events[i] for i in delivery[a:b]] for a, b in zip([0, *cuts], [*cuts, len(delivery)], strict=True)
    ]
    batches = [b for b in batches if b]
    if data.draw(st.booleans(), label="bidirectional"):
        acks = await stream_batches(usage, batches)
        accepted = sum(a.accepted_count for a in acks)
        duplicates = sum(a.duplicate_count for a in acks)
    else:

        async def requests():  # type: ignore[no-untyped-def]
            for batch in batches:
                yield usage_service_pb2.IngestUsageRequest(events=batch)

        response = await usage.IngestUsage(requests())
        accepted, duplicates = response.accepted_count, response.duplicate_count
    assert (accepted, duplicates) == (len(events), len(resends))

    summary = (
        await usage.GetUsageSummary(
            usage_service_pb2.GetUsageSummaryRequest(
                name=f"tenants/{tenant}/usageSummary",
                start_time=ts(BASE),
                end_time=ts(BASE + timedelta(hours=6)),
            )
        )
    ).summary
    assert {a.usage_type: Decimal(a.quantity) for a in summary.aggregates} == dict(quantity)
    assert sum(a.event_count for a in summary.aggregates) == len(events)

    invoice = (
        await billing.GenerateInvoice(
            billing_service_pb2.GenerateInvoiceRequest(
                parent=f"tenants/{tenant}",
                period_start_time=ts(BASE),
                period_end_time=ts(BASE + timedelta(hours=6)),
            )
        )
    ).invoice
    assert Decimal(invoice.total) == expected_total
    assert invoice.total == f"{expected_total:.2f}"
