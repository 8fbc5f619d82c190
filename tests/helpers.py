"""Small builders and readers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from server.domain.pagination import PageTokens
from server.storage.database import create_pool
from server.storage.meter_backfill import MeterBackfiller
from server.storage.migrations import migrate
from server.storage.shared_keys import PAGE_TOKEN_KEY
from tally.v1 import resources_pb2, usage_service_pb2, usage_service_pb2_grpc


def current_hour() -> datetime:
    """The whole UTC hour that holds this moment, by the real clock."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


# The hour each test counts from, fixed by conftest while a test runs: a test that computes
# hour_start() twice across an hour boundary would otherwise see two different hours (and, say,
# miss the events it just reported). Empty outside a test: the current hour.
_test_hour: list[datetime] = []


@contextlib.contextmanager
def one_hour_per_test() -> Iterator[None]:
    _test_hour.append(current_hour())
    try:
        yield
    finally:
        _test_hour.pop()


def hour_start(offset_hours: int = 0) -> datetime:
    """A whole UTC hour relative to the one the test started in (negative: in the past)."""
    now = _test_hour[-1] if _test_hour else current_hour()
    return now + timedelta(hours=offset_hours)


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def event(
    tenant_id: str,
    event_id: str | None = None,
    *,
    service: str = "marketplace",
    usage_type: str = "wpk_upload",
    quantity: str = "1",
    time: datetime | None = None,
    dimensions: dict[str, str] | None = None,
) -> resources_pb2.UsageEvent:
    message = resources_pb2.UsageEvent(
        tenant_id=tenant_id,
        event_id=event_id or uuid.uuid4().hex,
        service=service,
        usage_type=usage_type,
        quantity=quantity,
        dimensions=dimensions or {},
    )
    if time is not None:
        message.event_time.CopyFrom(ts(time))
    return message


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations carried by a failed call, field -> description."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            violations: dict[str, str] = {}
            for detail in status.details:
                bad_request = error_details_pb2.BadRequest()
                if detail.Unpack(bad_request):
                    violations.update({v.field: v.description for v in bad_request.field_violations})
            return violations
    return {}


async def totals(db: asyncpg.Pool, tenant: str) -> tuple[int, Decimal, int, Decimal]:
    """(events stored, their quantity sum, rollup event count, rollup quantity sum)."""
    events = await db.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(quantity), 0) AS q FROM usage_events WHERE tenant_id = $1", tenant
    )
    rollups = await db.fetchrow(
        "SELECT coalesce(sum(event_count), 0) AS n, coalesce(sum(quantity), 0) AS q"
        " FROM usage_rollups WHERE tenant_id = $1",
        tenant,
    )
    return events["n"], events["q"], int(rollups["n"]), rollups["q"]


async def server_page_tokens(db: asyncpg.Pool) -> PageTokens:
    """Page tokens signed with the servers' shared key, as if a server had issued them."""
    key = await db.fetchval("SELECT key FROM shared_keys WHERE name = $1", PAGE_TOKEN_KEY)
    return PageTokens(key)


class _BearerToken:
    """Adds `authorization: Bearer <token>` to a call, as a real client would."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under one kind of call only, hence one class per kind.
class _UnaryUnary(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), request)


class _UnaryStream(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), request)


class _StreamUnary(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), requests)


class _StreamStream(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), requests)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def channel_with_token(address: str, token: str) -> grpc.aio.Channel:
    """A plaintext channel whose calls carry the bearer token."""
    return grpc.aio.insecure_channel(address, interceptors=bearer_interceptors(token))


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo carried by a failed call, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


async def finish_backfills(backfiller: MeterBackfiller, db: asyncpg.Pool, names: list[str]) -> None:
    """Run meter backfills until none of the named meters ("meters/...") is BACKFILLING.

    Polls rather than sleeps a guessed time: a pass may find a meter held by the server's own
    backfill task, or still waiting for a transaction older than the meter to end.
    """
    ids = [name.removeprefix("meters/") for name in names]
    for _ in range(600):
        await backfiller.run_until_idle(ids)
        left = await db.fetchval(
            "SELECT count(*) FROM meters WHERE name = ANY($1) AND state = 'backfilling'", ids
        )
        if left == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still backfilling after 600 passes: {names}")


# Per (meter, grain, bucket, group): the counts (meter_unique_counts, summed over the
# bucket's hours and the stripes), and the values kept (hour rows; month rows per day bit).
_COUNTS_BY_KEY = """
SELECT meter_id, grain, bucket, group_values::text, sum(n)::bigint FROM (
    SELECT meter_id, 'h' AS grain, hour AS bucket, group_values, hour_values AS n
    FROM meter_unique_counts WHERE tenant_id = $1
    UNION ALL
    SELECT meter_id, 'd', date_trunc('day', hour, 'UTC'), group_values, day_values
    FROM meter_unique_counts WHERE tenant_id = $1
    UNION ALL
    SELECT meter_id, 'm', date_trunc('month', hour, 'UTC'), group_values, month_values
    FROM meter_unique_counts WHERE tenant_id = $1
) AS c
GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0 ORDER BY 1, 2, 3, 4
"""
_DISTINCT_BY_KEY = """
SELECT meter_id, grain, bucket, group_values::text, count(*) FROM (
    SELECT meter_id, 'h' AS grain, hour AS bucket, group_values FROM meter_distinct_hours WHERE tenant_id = $1
    UNION ALL
    SELECT meter_id, 'd', month + (d - 1) * interval '24 hours', group_values
    FROM meter_distinct_months, generate_series(1, 31) AS d
    WHERE tenant_id = $1 AND days & (1 << (d - 1)) <> 0
    UNION ALL
    SELECT meter_id, 'm', month, group_values FROM meter_distinct_months WHERE tenant_id = $1
) AS v
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
"""


async def distinct_counts(db: asyncpg.Pool, tenant: str) -> list[tuple[object, ...]]:
    """UNIQUE_COUNT's bucket counts of the tenant, summed over stripes, per bucket and group."""
    return [tuple(r) for r in await db.fetch(_COUNTS_BY_KEY, tenant)]


async def distinct_rows(db: asyncpg.Pool, tenant: str) -> list[tuple[object, ...]]:
    """The tenant's distinct values counted per bucket and group: what the counts must say.

    Each month row's day bits must also match the hour rows of those days: see
    `months_off_their_hours`.
    """
    return [tuple(r) for r in await db.fetch(_DISTINCT_BY_KEY, tenant)]


_MONTHS_OFF_HOURS = """
WITH from_hours AS (
    SELECT meter_id, date_trunc('month', hour, 'UTC') AS month, group_values, value,
           bit_or(1 << (extract(day FROM hour AT TIME ZONE 'UTC')::int - 1)) AS days
    FROM meter_distinct_hours WHERE tenant_id = $1
    GROUP BY 1, 2, 3, 4
), months AS (
    SELECT meter_id, month, group_values, value, days FROM meter_distinct_months WHERE tenant_id = $1
)
SELECT meter_id, month, group_values::text, value, h.days AS from_hours, m.days AS kept
FROM from_hours AS h FULL JOIN months AS m USING (meter_id, month, group_values, value)
WHERE h.days IS DISTINCT FROM m.days
ORDER BY 1, 2, 3, 4
"""


async def months_off_their_hours(db: asyncpg.Pool, tenant: str) -> list[tuple[object, ...]]:
    """The tenant's UNIQUE_COUNT month rows whose days differ from the days of its hour rows."""
    return [tuple(r) for r in await db.fetch(_MONTHS_OFF_HOURS, tenant)]


_CARRIERS = """
SELECT m.name, c.event_id
FROM (SELECT meter_id, event_id FROM meter_distinct_hours WHERE tenant_id = $1
      UNION ALL
      SELECT meter_id, event_id FROM meter_unique_values WHERE tenant_id = $1) AS c
JOIN meters AS m ON m.id = c.meter_id
"""


async def unique_carriers(db: asyncpg.Pool, tenant: str) -> dict[str, list[str]]:
    """Meter name -> the events that carry its values (hour rows' and others'), one entry per row.

    An event listed twice is carried twice; a cancelled event listed is one not forgotten
    (migration 0056: an hour row's event, then the hour's other carriers).
    """
    found: dict[str, list[str]] = {}
    for name, event_id in await db.fetch(_CARRIERS, tenant):
        found.setdefault(name, []).append(event_id)
    return {name: sorted(events) for name, events in found.items()}


@contextlib.asynccontextmanager
async def own_database(
    database_url: str, prefix: str, up_to: int | None = None
) -> AsyncIterator[asyncpg.Pool]:
    """A database of the caller's own on the test server, migrated (to version `up_to`), then dropped.

    Skips the test where the database user may not create databases.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.InsufficientPrivilegeError:
        await admin.close()
        pytest.skip("the test database user may not create databases")
    try:
        parts = urlsplit(database_url)
        pool = await create_pool(urlunsplit(parts._replace(path=f"/{name}")), min_size=1, max_size=4)
        try:
            await migrate(pool, up_to)
            yield pool
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def meter_per_bucket(
    usage: usage_service_pb2_grpc.UsageServiceStub,
    tenant: str,
    meter: str,
    bucket: int,
    origin: datetime,
    start: datetime,
    end: datetime,
) -> dict[int | None, str]:
    """The meter's values over [start, end) per bucket, keyed by hours after `origin` (None: no bucket)."""
    summary = (
        await usage.GetUsageSummary(
            usage_service_pb2.GetUsageSummaryRequest(
                name=f"tenants/{tenant}/usageSummary",
                start_time=ts(start),
                end_time=ts(end),
                bucket=bucket,  # type: ignore[arg-type]
                meters=[meter],
            )
        )
    ).summary
    return {
        (a.bucket_start_time.seconds - int(origin.timestamp())) // 3600
        if a.HasField("bucket_start_time")
        else None: (a.value)
        for a in summary.meter_aggregates
    }


async def ingest(
    usage: usage_service_pb2_grpc.UsageServiceStub, batches: Sequence[Sequence[resources_pb2.UsageEvent]]
) -> usage_service_pb2.IngestUsageResponse:
    """One IngestUsage call sending `batches` in order."""

    async def requests() -> AsyncIterator[usage_service_pb2.IngestUsageRequest]:
        for batch in batches:
            yield usage_service_pb2.IngestUsageRequest(events=batch)

    response: usage_service_pb2.IngestUsageResponse = await usage.IngestUsage(requests())
    return response
