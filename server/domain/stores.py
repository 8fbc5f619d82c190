"""What the services need from storage, as small Protocols: storage/ implements them.

Metering and Billing depend on these rather than on server.storage's classes, so that
their unit tests run against in-memory fakes (tests/metering, tests/billing) beside the
end-to-end tests against PostgreSQL. Each store keeps its transactions and its retry
policy to itself (server.storage.database.run_with_retries): a caller sees a result or
a domain error, never a connection. A use case whose change spans several queries hands
its body to the store as a unit of work (Transactions), rather than retrying it itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence, Set
from datetime import datetime
from decimal import Decimal
from typing import Protocol, TypeVar

from server.domain.aggregation import TimeBucket
from server.domain.audit import AuditEntry, AuditEvent
from server.domain.events import EventColumns, EventKey
from server.domain.meters import Contributions, Meter, MeterSpec
from server.domain.models import MeterValue, Rate, UsageAggregate
from server.domain.requests import Once, Replayed

# Audit entries for the new keys of a batch, written in the batch's transaction (backfills).
AuditHook = Callable[[Set[EventKey]], Sequence[AuditEntry]]

T = TypeVar("T")
Tx = TypeVar("Tx", covariant=True)  # the store's transaction, e.g. storage's InvoiceTransaction


class Transactions(Protocol[Tx]):
    """Units of work, each run in one transaction of the store with its retry policy.

    A deadlock or serialization failure rolls the transaction back and runs `work` again in
    a fresh one (so `work` does nothing outside its transaction that a second run would
    repeat); after the last attempt, Aborted (TRANSACTION_CONFLICT). A database that does
    not answer in time, or cannot be reached, is Unavailable. Request-id claims made in
    `work` (Once) commit or roll back with its change.
    """

    async def run_read(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """`work` in a read-only transaction that sees one snapshot."""
        ...

    async def run_in_transaction(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """`work` in a plain transaction, for changes that lock what they touch themselves."""
        ...

    async def run_in_tenant_transaction(self, tenant_id: str, work: Callable[[Tx], Awaitable[T]]) -> T:
        """`work` in a transaction holding the tenant's invoice lock: one change of a tenant at a time."""
        ...


class EventWriter(Protocol):
    """Where the write lanes record events, exactly once per (tenant_id, event_id)."""

    async def record_new_keys(
        self,
        columns: EventColumns,
        audit: AuditHook | None = None,
        contributions: Contributions | None = None,
    ) -> set[EventKey]:
        """Store the events that are new, in one transaction; return their keys."""
        ...


class UsageReader(Protocol):
    """The recorded usage, summarised."""

    async def summarize(
        self, tenant_ids: Sequence[str], start: datetime, end: datetime, bucket: TimeBucket, dimension: str
    ) -> list[UsageAggregate]:
        """Usage aggregates of the tenants over [start, end).

        Per service and usage type, and per time bucket and value of `dimension` ("" for none),
        in tenant, type, bucket and dimension value order.
        """
        ...

    async def summarize_meters(
        self,
        meters: Sequence[Meter],
        tenant_ids: Sequence[str],
        start: datetime,
        end: datetime,
        bucket: TimeBucket,
        dimension: str,
    ) -> list[MeterValue]:
        """The meters' values per tenant over [start, end), by bucket and dimension value.

        In meter name order, then tenant, bucket and dimension value.
        """
        ...

    async def tenants_with_usage(self, start: datetime, end: datetime, after: str, limit: int) -> list[str]:
        """Up to `limit` tenants with usage in [start, end), after `after`, in tenant_id order."""
        ...


class UsageLedger(EventWriter, UsageReader, Protocol):
    """Everything Metering reads and writes of usage."""


class RateBook(Protocol):
    """The rate card as stored: every rate of every usage type, with its effective time."""

    async def first_effective_times(self) -> dict[tuple[str, str], datetime]:
        """When each usage type's first rate took effect: the usage types on the rate card."""
        ...

    async def in_effect(self, at: datetime, after: tuple[str, str], limit: int) -> list[Rate]:
        """The rate of each usage type in effect at `at`, after the page key (service, usage_type)."""
        ...

    async def history(self, after: tuple[str, str, datetime], limit: int) -> list[Rate]:
        """Every rate ever set, after the page key (service, usage_type, effective_from), in that order."""
        ...

    async def upsert(
        self,
        service: str,
        usage_type: str,
        effective_from: datetime | None,
        default_effective_from: tuple[datetime, datetime],
        unit_price: Decimal,
        currency: str,
        audit_entry: Callable[[Rate | None, Rate], AuditEntry],
        once: Once[Rate] | None = None,
    ) -> Rate | Replayed:
        """Set a rate with its audit entry (and `once`'s response) in one transaction.

        With no effective time, a new usage type gets default_effective_from[0], a known one [1].
        """
        ...


class MeterBook(Protocol):
    """The meters as stored, active and archived."""

    async def all(self) -> list[Meter]:
        """Every meter, active and archived."""
        ...

    async def get(self, meter_id: str) -> Meter:
        """One meter by id; NotFound (METER_NOT_FOUND) if there is none."""
        ...

    async def page(self, after: str, limit: int) -> list[Meter]:
        """Up to `limit` meters after the meter id `after`, in meter_id order."""
        ...

    async def create(
        self, spec: MeterSpec, audit_entry: Callable[[Meter], AuditEntry], once: Once[Meter] | None
    ) -> Meter | Replayed:
        """Store a new meter with its audit entry (and `once`'s response) in one transaction.

        AlreadyExists if the meter_id was ever used; Replayed for a retry of a request id.
        """
        ...

    async def archive(
        self, meter_id: str, audit_entry: Callable[[Meter, Meter], AuditEntry], once: Once[Meter] | None
    ) -> Meter | Replayed:
        """Archive an active meter with its audit entry; an archived one is returned unchanged."""
        ...


class AuditReader(Protocol):
    """The audit trail, in trail order."""

    async def list(
        self,
        *,
        tenant_id: str | None,
        visible_tenants: Sequence[str] | None,
        start: datetime | None,
        end: datetime | None,
        after_id: int,
        limit: int,
    ) -> list[AuditEvent]:
        """Up to `limit` entries after `after_id`, in trail order, within the filters.

        `visible_tenants` None means every tenant (a token for all tenants).
        """
        ...
