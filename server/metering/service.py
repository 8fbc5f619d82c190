"""Recording usage exactly once and summarising it: the use cases behind UsageService.

Every batch is matched against the active meters (server.metering.meters) when its
transaction is written, and summaries report the meters a caller names beside the
per-usage-type totals.

Writes go through write lanes (server.lanes), which merge what waits into one
transaction and keep each stream's order. They are not cancelled with their caller: when
a client goes away or the server shuts down in the middle of a batch, its transaction
still finishes (committed or rolled back as a whole, never half-written), and `drain()`
waits for such writes.

A stream of batches is one use case (record_stream): each batch's size is checked before
its events are decoded, its events are charged to the caller's event rates (waiting, not
failing, which slows the client through flow control), and the batches are pipelined
(server.metering.pipeline) on one write lane that keeps the stream's order.

A backfill (a batch flagged by the client, for usage older than the ingestion window)
needs the scope usage:backfill. It is written in a transaction of its own together with
one audit entry per tenant that got new events, naming the principal, the request id and
the counts, so that every re-priced past period can be traced to the call that did it.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar

from opentelemetry import trace

from server.auth.limits import Charge, Limiter, debt_seconds, take, try_take
from server.domain.access import USAGE_BACKFILL, Caller, Principal
from server.domain.audit import backfill_entries
from server.domain.errors import ErrorReason, FieldViolation, InvalidArgument, PermissionDenied
from server.domain.events import (
    EventRules,
    IncomingBatch,
    RawEvent,
    Rejection,
    RejectionCause,
    ValidatedBatch,
    check_event,
    check_id,
    event_row,
    validate_batch,
)
from server.domain.inputs import SummaryQuery
from server.domain.models import MeterValue, UsageAggregate, UsageSummary
from server.domain.stores import UsageLedger
from server.domain.timeutil import to_datetime
from server.lanes import Lane, WriteLanes
from server.metering.meters import MeterCatalog
from server.metering.pipeline import EventBudget, pipelined
from server.ratecard import RateCardCache
from server.telemetry.ingest import OFF, IngestTelemetry

M = TypeVar("M")

MAX_SUMMARY_TENANTS = 1_000
_TENANTS_PER_QUERY = 100


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What became of one batch: events recorded, duplicates of events recorded before, rejections."""

    accepted: int
    duplicates: int
    rejections: list[Rejection]


def _rejection_of(event: RawEvent, error: InvalidArgument | PermissionDenied) -> Rejection:
    """A refused report as the rejection it would be in a batch (for the rejection counts)."""
    if isinstance(error, PermissionDenied):
        return Rejection(0, event.event_id, "tenant_id", error.message, RejectionCause.PERMISSION_DENIED)
    first = error.violations[0]
    return Rejection(0, event.event_id, first.field.removeprefix("event."), first.description)


class Metering:
    """Recording usage exactly once and summarising it (see the module docstring).

    Events are checked by `rules` against the rate card (`rate_card`), charged to `limiter`,
    held within `budget` and written on `write_lanes` lanes to `store`, matched against
    `meters`; `now_micros` is the server's clock (the receive time of events sent without one).
    """

    def __init__(
        self,
        store: UsageLedger,
        rate_card: RateCardCache,
        rules: EventRules,
        now_micros: Callable[[], int],
        meters: MeterCatalog,
        *,
        limiter: Limiter,
        budget: EventBudget,
        write_lanes: int = 4,
        telemetry: IngestTelemetry = OFF,
    ) -> None:
        self._limiter = limiter
        self._budget = budget
        self._store = store
        self._rate_card = rate_card
        self._rules = rules
        self._now_micros = now_micros
        self._meters = meters
        self._telemetry = telemetry
        self._lanes = WriteLanes(store, lanes=write_lanes, telemetry=telemetry, meters=meters.active_map)

    def _check_batch_size(self, size: int) -> None:
        if size > self._rules.max_batch_size:
            raise InvalidArgument.single(
                "events",
                f"has {size} events, more than the limit of {self._rules.max_batch_size}",
                reason=ErrorReason.BATCH_TOO_LARGE,
                metadata={"maxBatchSize": str(self._rules.max_batch_size)},
            )

    def record_stream(
        self, caller: Caller, messages: AsyncIterator[M], batch_of: Callable[[M], IncomingBatch]
    ) -> AsyncGenerator[tuple[M, BatchOutcome], None]:
        """Each message's batch recorded: (message, outcome) pairs in the stream's order.

        Pipelined on one write lane (see server.metering.pipeline): a bad batch, a failed
        write or a failed read ends the stream with its error once the batches before it
        are answered. Close the generator (contextlib.aclosing) however the caller stops,
        so that the pipeline gives back its tasks and budget.
        """
        lane = self._lanes.for_stream()
        return pipelined(
            messages,
            lambda message: self._prepare_streamed(caller, batch_of(message)),
            lambda batch: self._submit_batch(batch, lane),
            budget=self._budget,
            size=lambda message: batch_of(message).size,
        )

    def _event_charges(self, principal: Principal, events: Sequence[RawEvent]) -> list[Charge]:
        # Only tenants the caller may act for are charged: a token for tenant A cannot
        # spend tenant B's rate with events that are rejected anyway.
        per_tenant = Counter(e.tenant_id for e in events if principal.may_act_for(e.tenant_id))
        return self._limiter.event_charges(principal.subject, len(events), per_tenant)

    async def _prepare_streamed(self, caller: Caller, incoming: IncomingBatch) -> ValidatedBatch:
        """Decode and validate a streamed batch once the event rates allow it: waiting, not failing."""
        self._check_batch_size(incoming.size)  # before decoding: an oversized batch costs nothing
        events = incoming.events()
        charges = self._event_charges(caller.principal, events)
        delay = take(charges)
        while delay > 0:
            # Not reading the next message while we wait is what slows the client down:
            # gRPC flow control stops it once the transport window is full. The debt is read
            # again from the limiter's clock, which decides when it is repaid (a test's fake one too).
            await asyncio.sleep(delay)
            delay = debt_seconds(charges)
        return await self._prepare_batch(events, caller, backfill=incoming.backfill)

    async def _prepare_batch(
        self, events: Sequence[RawEvent], caller: Caller, *, backfill: bool = False
    ) -> ValidatedBatch:
        """The CPU half of recording a batch (its size already checked): validation, de-duplication.

        Events for tenants the principal may not act for are rejected one by one
        (PERMISSION_DENIED); the rest of the batch goes on. A backfill without the scope
        usage:backfill is PERMISSION_DENIED as a whole, before anything is looked at.
        """
        if backfill:
            caller.principal.require_scope(USAGE_BACKFILL)
        with self._telemetry.preparing(len(events)):
            await self._rate_card.ensure_current({(e.service, e.usage_type) for e in events})
            await self._meters.ensure_current()
            batch = validate_batch(
                events,
                self._rate_card,
                self._rules,
                self._now_micros(),
                caller.principal.may_act_for,
                backfill=backfill,
            )
        return replace(batch, backfill_by=caller) if backfill else batch

    def _submit_batch(self, batch: ValidatedBatch, lane: Lane) -> Awaitable[BatchOutcome]:
        """The database half: queue the batch on the lane now (the ordering point).

        The awaitable gives its outcome once its transaction has committed.
        """
        audit = None
        if batch.backfill_by is not None:
            audit = functools.partial(backfill_entries, batch.backfill_by, batch.rows)
        span = self._telemetry.start_batch(len(batch.rows))
        if span is None:
            accepted = lane.submit(batch.rows, audit) if batch.rows else None
        else:
            with trace.use_span(span):  # the lane's commit span is its child
                accepted = lane.submit(batch.rows, audit) if batch.rows else None
        return self._outcome(batch, accepted, span)

    async def _outcome(
        self, batch: ValidatedBatch, accepted: Awaitable[int] | None, span: trace.Span | None
    ) -> BatchOutcome:
        try:
            new = 0 if accepted is None else await accepted
        except BaseException as exc:
            self._telemetry.batch_done(span, batch.rows, 0, 0, (), exc)
            raise
        duplicates = len(batch.rows) - new + batch.repeated_in_batch
        self._telemetry.batch_done(span, batch.rows, new, duplicates, batch.rejections)
        return BatchOutcome(new, duplicates, batch.rejections)

    async def report(self, event: RawEvent, principal: Principal) -> bool:
        """Record one event; True if it is new, False if it was a duplicate.

        Raises ResourceExhausted when the event rates do not allow it now (a single event
        never waits), InvalidArgument listing every bad field, prefixed with "event.", and
        PermissionDenied for a tenant the principal may not act for.
        """
        try_take(self._event_charges(principal, [event]))
        try:
            if check_id(event.tenant_id) is None:
                principal.require_tenant(event.tenant_id)
            await self._rate_card.ensure_current([(event.service, event.usage_type)])
            await self._meters.ensure_current()
            now = self._now_micros()
            violations = check_event(event, self._rate_card, self._rules, now)
            if violations:
                raise InvalidArgument([FieldViolation(f"event.{v.field}", v.description) for v in violations])
        except (InvalidArgument, PermissionDenied) as exc:
            self._telemetry.batch_done(None, {}, 0, 0, [_rejection_of(event, exc)])
            raise
        row = event_row(event, now)
        key = row.key
        new = await self._lanes.reports.submit({key: row}) == 1
        self._telemetry.batch_done(None, (key,), int(new), int(not new), ())
        return new

    async def drain(self) -> None:
        """Wait for every write in flight (used at shutdown, before the pool closes)."""
        await self._lanes.drain()

    async def summary(self, tenant_id: str, query: SummaryQuery, principal: Principal) -> UsageSummary:
        """One tenant's usage over the query's range, and the values of the meters it names.

        InvalidArgument for a bad query, PermissionDenied for a tenant the token does not cover.
        """
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("tenant_id", problem)
        principal.require_tenant(tenant_id)
        start, end = _range_of(query)
        bucket, dimension = query.bucket, query.group_by_dimension
        meters = await self._meters.resolve(query.meters, dimension)
        aggregates: Sequence[UsageAggregate] = ()
        values: Sequence[MeterValue] = ()
        if query.with_aggregates:
            aggregates = await self._store.summarize([tenant_id], start, end, bucket, dimension)
        if query.with_meter_values:
            values = await self._store.summarize_meters(meters, [tenant_id], start, end, bucket, dimension)
        return UsageSummary(tenant_id, start, end, bucket, dimension, tuple(aggregates), tuple(values))

    async def summaries(
        self, tenant_ids: Sequence[str], query: SummaryQuery, principal: Principal
    ) -> AsyncIterator[UsageSummary]:
        """One summary per listed tenant, or per tenant with usage; in tenant_id order.

        Only tenants the principal may act for: listing another one is PERMISSION_DENIED
        (before anything is read), and with no list, a principal restricted to some
        tenants gets those of them with usage.

        Reads a chunk of tenants per query and holds no connection while the caller
        consumes, so a slow reader cannot pin a database connection.
        """
        if len(tenant_ids) > MAX_SUMMARY_TENANTS:
            raise InvalidArgument.single("tenant_ids", f"lists more than {MAX_SUMMARY_TENANTS} tenants")
        violations = [
            FieldViolation(f"tenant_ids[{i}]", problem)
            for i, tenant in enumerate(tenant_ids)
            if (problem := check_id(tenant))
        ]
        if violations:
            raise InvalidArgument(violations)
        for tenant in tenant_ids:
            principal.require_tenant(tenant)
        start, end = _range_of(query)
        bucket, dimension = query.bucket, query.group_by_dimension
        meters = await self._meters.resolve(query.meters, dimension)
        listed = sorted(set(tenant_ids))
        # A restricted principal asking for "every tenant with usage" gets its own tenants,
        # summarised and then left out when they have no usage in the range.
        only_with_usage = False
        if not listed and not principal.all_tenants:
            only_with_usage = True
            listed = sorted(principal.tenants)
        after = ""
        while True:
            if listed:
                chunk = [t for t in listed if t > after][:_TENANTS_PER_QUERY]
            else:
                chunk = await self._store.tenants_with_usage(start, end, after, _TENANTS_PER_QUERY)
            if not chunk:
                return
            aggregates: Sequence[UsageAggregate] = ()
            values: Sequence[MeterValue] = ()
            if query.with_aggregates:
                aggregates = await self._store.summarize(chunk, start, end, bucket, dimension)
            if query.with_meter_values:
                values = await self._store.summarize_meters(meters, chunk, start, end, bucket, dimension)
            by_tenant: dict[str, list[UsageAggregate]] = {tenant: [] for tenant in chunk}
            for aggregate in aggregates:
                by_tenant[aggregate.tenant_id].append(aggregate)
            values_by_tenant: dict[str, list[MeterValue]] = {tenant: [] for tenant in chunk}
            for value in values:
                values_by_tenant[value.tenant_id].append(value)
            for tenant in chunk:
                if by_tenant[tenant] or values_by_tenant[tenant] or not only_with_usage:
                    yield UsageSummary(
                        tenant,
                        start,
                        end,
                        bucket,
                        dimension,
                        tuple(by_tenant[tenant]),
                        tuple(values_by_tenant[tenant]),
                    )
            after = chunk[-1]


def _range_of(query: SummaryQuery) -> tuple[datetime, datetime]:
    time_range = query.validate()
    return to_datetime(time_range.start_micros), to_datetime(time_range.end_micros)
