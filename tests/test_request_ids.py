"""Request ids (AIP-155): a retried SetRate or GenerateInvoice is answered with its first result.

Each test checks what is stored (rate rows, audit entries, request_ids rows), not only the
answers: a change applied twice would show there even if the second answer looked right.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from server.domain.access import BILLING_ADMIN
from server.domain.errors import ErrorReason
from tally.v1 import billing_service_pb2, billing_service_pb2_grpc, usage_service_pb2
from tests.conftest import make_token
from tests.helpers import channel_with_token, error_info, event, field_violations, hour_start, ts

Code = grpc.StatusCode


def set_rate(usage_type: str, price: str, request_id: str = "") -> billing_service_pb2.SetRateRequest:
    # No effective time: the first rate of a new usage type takes effect at the epoch, a later
    # one at the next hour, so a second application would add a second row.
    return billing_service_pb2.SetRateRequest(
        service="retried", usage_type=usage_type, unit_price=price, request_id=request_id
    )


async def rate_rows(db: asyncpg.Pool, usage_type: str) -> list[str]:
    rows = await db.fetch(
        "SELECT unit_price::text AS p FROM rates WHERE service = 'retried' AND usage_type = $1"
        " ORDER BY effective_from",
        usage_type,
    )
    return [row["p"] for row in rows]


async def audit_count(db: asyncpg.Pool, *, resource_part: str = "", tenant_id: str = "") -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM audit_events WHERE ($1 = '' OR resource LIKE '%' || $1 || '%')"
        " AND ($2 = '' OR tenant_id = $2)",
        resource_part,
        tenant_id,
    )
    return count


def generate(tenant: str, request_id: str, hours: tuple[int, int] = (-3, 0)) -> Any:
    return billing_service_pb2.GenerateInvoiceRequest(
        parent=f"tenants/{tenant}",
        period_start_time=ts(hour_start(hours[0])),
        period_end_time=ts(hour_start(hours[1])),
        request_id=request_id,
    )


async def test_retried_set_rate_applies_once(billing: Any, db: asyncpg.Pool) -> None:
    usage_type = f"u{uuid.uuid4().hex[:12]}"
    request_id = str(uuid.uuid4())
    first = await billing.SetRate(set_rate(usage_type, "1.25", request_id))
    retried = await billing.SetRate(set_rate(usage_type, "1.25", request_id))
    assert retried == first
    assert await rate_rows(db, usage_type) == ["1.25"]
    assert await audit_count(db, resource_part=f"/{usage_type}/") == 1
    # The same change under a new request_id is a new change: the next hour's rate.
    await billing.SetRate(set_rate(usage_type, "1.25", str(uuid.uuid4())))
    assert await rate_rows(db, usage_type) == ["1.25", "1.25"]
    assert await audit_count(db, resource_part=f"/{usage_type}/") == 2


async def test_retried_generate_invoice_answers_the_first_result(
    billing: Any, usage: Any, db: asyncpg.Pool, tenant: str
) -> None:
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(-2))))
    request_id = str(uuid.uuid4())
    first = await billing.GenerateInvoice(generate(tenant, request_id))
    assert (first.created, first.invoice.total) == (True, "0.10")
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(-2))))
    retried = await billing.GenerateInvoice(generate(tenant, request_id))
    assert retried == first  # not recomputed: the retry gets what the lost answer said
    assert await audit_count(db, tenant_id=tenant) == 1
    recomputed = await billing.GenerateInvoice(generate(tenant, ""))
    assert (recomputed.created, recomputed.invoice.total) == (False, "0.20")
    assert await audit_count(db, tenant_id=tenant) == 2


async def test_concurrent_double_send_applies_once(
    billing: Any, usage: Any, db: asyncpg.Pool, tenant: str
) -> None:
    usage_type = f"u{uuid.uuid4().hex[:12]}"
    rate_id, invoice_id = str(uuid.uuid4()), str(uuid.uuid4())
    await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, time=hour_start(-2))))
    rates = await asyncio.gather(*(billing.SetRate(set_rate(usage_type, "2", rate_id)) for _ in range(4)))
    invoices = await asyncio.gather(
        *(billing.GenerateInvoice(generate(tenant, invoice_id)) for _ in range(4))
    )
    assert all(r == rates[0] for r in rates) and all(i == invoices[0] for i in invoices)
    assert invoices[0].created
    assert await rate_rows(db, usage_type) == ["2"]
    assert await audit_count(db, resource_part=f"/{usage_type}/") == 1
    assert await audit_count(db, tenant_id=tenant) == 1


async def test_reused_request_id_with_other_parameters_is_refused_and_changes_nothing(
    billing: Any, db: asyncpg.Pool, tenant: str
) -> None:
    usage_type = f"u{uuid.uuid4().hex[:12]}"
    request_id = str(uuid.uuid4())
    await billing.SetRate(set_rate(usage_type, "1", request_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.SetRate(set_rate(usage_type, "2", request_id))
    info = error_info(raised.value)
    assert raised.value.code() == Code.FAILED_PRECONDITION
    assert info is not None and (info.reason, dict(info.metadata)) == (
        ErrorReason.REQUEST_ID_REUSED.value,
        {"requestId": request_id},
    )
    assert await rate_rows(db, usage_type) == ["1"]
    assert await audit_count(db, resource_part=f"/{usage_type}/") == 1
    # A request_id is scoped to its method: GenerateInvoice may use the same one.
    assert (await billing.GenerateInvoice(generate(tenant, request_id))).created


async def test_request_ids_belong_to_their_principal(tally: Any, db: asyncpg.Pool) -> None:
    usage_type = f"u{uuid.uuid4().hex[:12]}"
    request_id = str(uuid.uuid4())
    for subject in ("admin-a", "admin-b"):
        token = make_token(scopes=(BILLING_ADMIN,), subject=subject)
        async with channel_with_token(f"127.0.0.1:{tally.port}", token) as channel:
            await billing_service_pb2_grpc.BillingServiceStub(channel).SetRate(
                set_rate(usage_type, "3", request_id)
            )
    assert await rate_rows(db, usage_type) == ["3", "3"]


async def test_failed_change_does_not_keep_its_request_id(
    billing: Any, db: asyncpg.Pool, tenant: str
) -> None:
    await billing.GenerateInvoice(generate(tenant, "", (-4, -2)))
    request_id = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.GenerateInvoice(generate(tenant, request_id, (-3, -1)))  # overlaps
    assert raised.value.code() == Code.FAILED_PRECONDITION
    assert await db.fetchval("SELECT count(*) FROM request_ids WHERE request_id = $1", request_id) == 0
    # Nothing was stored, so the id is free for the corrected request.
    assert (await billing.GenerateInvoice(generate(tenant, request_id, (-2, -1)))).created


@pytest.mark.parametrize("request_id", ["has space", "x" * 129, "é"])
async def test_malformed_request_id_is_invalid_argument(billing: Any, request_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await billing.SetRate(set_rate("whatever", "1", request_id))
    assert raised.value.code() == Code.INVALID_ARGUMENT
    assert "request_id" in field_violations(raised.value)
