"""Every status Tally returns carries google.rpc.ErrorInfo: domain tally.v1 and a stable reason (AIP-193).

The statuses that a test can provoke on the wire are; the others (a rate limit, an idle
stream, a lost database, a persistent conflict, a bug) are raised by the real code that
raises them and mapped by server.api.errors, the one mapper, without a server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn, cast

import asyncpg
import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from server.api.calls import _incoming
from server.api.errors import status_for
from server.auth.limits import Charge, StreamSlots, TokenBuckets, try_take
from server.domain.access import SCOPES, USAGE_READ
from server.domain.errors import ERROR_DOMAIN, AlreadyExists, ErrorReason, TallyError
from server.storage.database import run_with_retries
from server.storage.invoices import InvoiceStore
from tally.v1 import billing_service_pb2, error_reason_pb2, usage_service_pb2
from tests.conftest import make_token, new_tenant
from tests.helpers import error_info, event, field_violations, hour_start, ts
from tests.rpcs import RPCS, Rpc, invoke

Code = grpc.StatusCode


async def refused(channel: grpc.aio.Channel, rpc_name: str, request: Any, token: str | None = None) -> Any:
    """The AioRpcError of a call expected to fail."""
    rpc = next(r for r in RPCS if r.name.endswith("/" + rpc_name))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await invoke(channel, rpc, [request], token=token or make_token())
    return raised.value


def assert_reason(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: ErrorReason) -> Any:
    info = error_info(error)
    assert (error.code(), info is not None) == (code, True), error.details()
    assert info is not None
    assert (info.domain, info.reason) == (ERROR_DOMAIN, reason.value)
    assert dict(error.trailing_metadata() or ()).get("x-request-id")  # kept beside the details
    return info


# --- on the wire ---------------------------------------------------------------------------------


async def test_bad_field_is_field_invalid_beside_bad_request(bare_channel: grpc.aio.Channel) -> None:
    error = await refused(
        bare_channel, "ReportUsage", usage_service_pb2.ReportUsageRequest(event=event("t", quantity="-1"))
    )
    assert_reason(error, Code.INVALID_ARGUMENT, ErrorReason.FIELD_INVALID)
    assert field_violations(error) == {"event.quantity": "must not be negative"}


async def test_undecodable_request_and_forged_page_token_have_their_own_reasons(
    bare_channel: grpc.aio.Channel,
) -> None:
    error = await refused(bare_channel, "ListRates", b"\xff\xff\xff")
    assert_reason(error, Code.INVALID_ARGUMENT, ErrorReason.REQUEST_MALFORMED)
    error = await refused(bare_channel, "ListRates", billing_service_pb2.ListRatesRequest(page_token="nope"))
    assert_reason(error, Code.INVALID_ARGUMENT, ErrorReason.PAGE_TOKEN_INVALID)


async def test_missing_invoice_is_invoice_not_found(bare_channel: grpc.aio.Channel) -> None:
    request = billing_service_pb2.GetInvoiceRequest(name=f"tenants/{new_tenant()}/invoices/inv_missing")
    error = await refused(bare_channel, "GetInvoice", request)
    assert_reason(error, Code.NOT_FOUND, ErrorReason.INVOICE_NOT_FOUND)


async def test_overlapping_period_is_invoice_period_overlap_naming_the_other_invoice(
    bare_channel: grpc.aio.Channel, billing: Any, tenant: str
) -> None:
    parent = f"tenants/{tenant}"
    first = await billing.GenerateInvoice(
        billing_service_pb2.GenerateInvoiceRequest(
            parent=parent, period_start_time=ts(hour_start(-4)), period_end_time=ts(hour_start(-2))
        )
    )
    overlapping = billing_service_pb2.GenerateInvoiceRequest(
        parent=parent, period_start_time=ts(hour_start(-3)), period_end_time=ts(hour_start(-1))
    )
    error = await refused(bare_channel, "GenerateInvoice", overlapping)
    info = assert_reason(error, Code.FAILED_PRECONDITION, ErrorReason.INVOICE_PERIOD_OVERLAP)
    assert dict(info.metadata) == {"invoice": first.invoice.name}


async def test_missing_scope_and_foreign_tenant_are_told_apart(bare_channel: grpc.aio.Channel) -> None:
    tenant = new_tenant()
    request = usage_service_pb2.GetUsageSummaryRequest(
        name=f"tenants/{tenant}/usageSummary", start_time=ts(hour_start(-1)), end_time=ts(hour_start(0))
    )
    no_scope = make_token([tenant], tuple(s for s in SCOPES if s != USAGE_READ))
    error = await refused(bare_channel, "GetUsageSummary", request, token=no_scope)
    info = assert_reason(error, Code.PERMISSION_DENIED, ErrorReason.SCOPE_MISSING)
    assert dict(info.metadata) == {"scope": USAGE_READ}
    error = await refused(bare_channel, "GetUsageSummary", request, token=make_token([new_tenant()]))
    assert_reason(error, Code.PERMISSION_DENIED, ErrorReason.TENANT_NOT_PERMITTED)
    rate = billing_service_pb2.SetRateRequest(service="s", usage_type="u", unit_price="1")
    error = await refused(bare_channel, "SetRate", rate, token=make_token([tenant]))
    assert_reason(error, Code.PERMISSION_DENIED, ErrorReason.ALL_TENANTS_REQUIRED)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name.split("/")[1])
async def test_every_method_without_a_token_answers_token_missing(
    bare_channel: grpc.aio.Channel, rpc: Rpc
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await invoke(bare_channel, rpc, [rpc.example(new_tenant(), "inv_x")])
    assert_reason(raised.value, Code.UNAUTHENTICATED, ErrorReason.TOKEN_MISSING)


async def test_expired_and_early_tokens_have_their_own_reasons(bare_channel: grpc.aio.Channel) -> None:
    request = billing_service_pb2.ListRatesRequest()
    expired = make_token(now=lambda: time.time() - 7200)
    assert_reason(
        await refused(bare_channel, "ListRates", request, token=expired),
        Code.UNAUTHENTICATED,
        ErrorReason.TOKEN_EXPIRED,
    )
    early = make_token(now=lambda: time.time() + 3600)
    assert_reason(
        await refused(bare_channel, "ListRates", request, token=early),
        Code.UNAUTHENTICATED,
        ErrorReason.TOKEN_NOT_YET_VALID,
    )
    assert_reason(
        await refused(bare_channel, "ListRates", request, token="not-a-jwt"),
        Code.UNAUTHENTICATED,
        ErrorReason.TOKEN_INVALID,
    )


# --- through the mapper, raised by the code that raises them -------------------------------------


def mapped(exc: BaseException) -> tuple[int, error_details_pb2.ErrorInfo, status_pb2.Status]:
    status = status_for(exc, "req-1")
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1 and infos[0].domain == ERROR_DOMAIN
    return status.code, infos[0], status


def raised_by(action: Any) -> BaseException:
    with pytest.raises(BaseException) as caught:
        action()
    return caught.value


async def raised_by_async(action: Any) -> BaseException:
    with pytest.raises(BaseException) as caught:
        await action()
    return caught.value


def test_rate_limit_is_rate_limited_with_its_quota() -> None:
    buckets = TokenBuckets("requests", 1, lambda: 0.0)  # a clock that stands still
    try_take([Charge(buckets, "tenant:t", 1)])
    code, info, status = mapped(raised_by(lambda: try_take([Charge(buckets, "tenant:t", 1)])))
    assert (code, info.reason, dict(info.metadata)) == (
        code_pb2.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        {"quota": "requests"},
    )
    kinds = {detail.type_url.rsplit(".", 1)[1] for detail in status.details}
    assert kinds == {"RetryInfo", "QuotaFailure", "ErrorInfo"}


def test_stream_slots_full_is_stream_limit_reached() -> None:
    slots = StreamSlots(1)
    slots.acquire("svc")
    code, info, _ = mapped(raised_by(lambda: slots.acquire("svc")))
    assert (code, info.reason) == (code_pb2.RESOURCE_EXHAUSTED, "STREAM_LIMIT_REACHED")


async def test_idle_stream_is_stream_idle() -> None:
    async def silent() -> AsyncIterator[Any]:
        await asyncio.Event().wait()  # a client that never sends: the timeout is certain
        yield None  # pragma: no cover

    exc = await raised_by_async(lambda: anext(_incoming(silent(), 0.01)))
    code, info, _ = mapped(exc)
    assert (code, info.reason, dict(info.metadata)) == (
        code_pb2.DEADLINE_EXCEEDED,
        "STREAM_IDLE",
        {"idleSeconds": "0.01"},
    )


async def test_lost_database_is_database_unavailable() -> None:
    async def refuse() -> NoReturn:
        raise ConnectionRefusedError("no database")

    code, info, _ = mapped(await raised_by_async(lambda: run_with_retries(refuse)))
    assert (code, info.reason) == (code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE")

    # The same failure on a connection held outside run_with_retries (an invoice
    # transaction) maps the same way: storage raises the domain's Unavailable, so the
    # mapper never needs to know asyncpg's exceptions.
    class LostPool:
        def acquire(self) -> NoReturn:
            raise ConnectionRefusedError("no database")

    async def read() -> None:
        async with InvoiceStore(cast(asyncpg.Pool, LostPool())).read_transaction():
            pass  # pragma: no cover

    code, info, _ = mapped(await raised_by_async(read))
    assert (code, info.reason) == (code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE")


async def test_persistent_conflict_is_transaction_conflict() -> None:
    async def conflict() -> NoReturn:
        raise asyncpg.SerializationError("could not serialize access")

    code, info, _ = mapped(await raised_by_async(lambda: run_with_retries(conflict, attempts=1)))
    assert (code, info.reason) == (code_pb2.ABORTED, "TRANSACTION_CONFLICT")


def test_existing_plan_is_already_exists_with_its_name() -> None:
    error = AlreadyExists(
        "plan 'x' exists already", reason=ErrorReason.PLAN_EXISTS, metadata={"plan": "plans/x"}
    )
    code, info, _ = mapped(error)
    assert (code, info.reason, dict(info.metadata)) == (
        code_pb2.ALREADY_EXISTS,
        "PLAN_EXISTS",
        {"plan": "plans/x"},
    )


def test_existing_meter_is_already_exists_with_its_name() -> None:
    error = AlreadyExists(
        "a meter named 'meters/x' exists already",
        reason=ErrorReason.METER_EXISTS,
        metadata={"meter": "meters/x"},
    )
    code, info, _ = mapped(error)
    assert (code, info.reason, dict(info.metadata)) == (
        code_pb2.ALREADY_EXISTS,
        "METER_EXISTS",
        {"meter": "meters/x"},
    )


def test_a_bug_is_internal_error_with_the_log_reference() -> None:
    code, info, status = mapped(RuntimeError("a bug"))
    assert (code, info.reason) == (code_pb2.INTERNAL, "INTERNAL_ERROR")
    assert info.metadata["reference"] in status.message


def test_every_domain_error_kind_maps_with_its_reason() -> None:
    kinds = {cls.__name__ for cls in TallyError.__subclasses__()}
    assert kinds == {
        "InvalidArgument",
        "NotFound",
        "AlreadyExists",
        "FailedPrecondition",
        "Unavailable",
        "Aborted",
        "Unauthenticated",
        "PermissionDenied",
        "ResourceExhausted",
        "DeadlineExceeded",
    }, "a new kind of error needs a test above"


def test_the_reasons_in_the_code_are_the_reasons_in_the_contract() -> None:
    in_proto = {v.name for v in error_reason_pb2.ErrorReason.DESCRIPTOR.values} - {"ERROR_REASON_UNSPECIFIED"}
    assert {r.value for r in ErrorReason} == in_proto
