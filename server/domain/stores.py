"""What the services need from storage, as small Protocols: storage/ implements them.

Metering and Billing depend on these rather than on server.storage's classes, so that
their unit tests run against in-memory fakes (tests/metering, tests/billing) beside the
end-to-end tests against PostgreSQL. Each store keeps its transactions and its retry
policy to itself (server.storage.database.run_with_retries): a caller sees a result or
a domain error, never a connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from server.domain.aggregation import TimeBucket
from server.domain.audit import AuditEntry, AuditEvent
from server.domain.events import EventColumns, EventKey
from server.domain.meters import Contributions, Meter, MeterSpec
from server.domain.models import MeterValue, Rate, UsageAggregate
from server.domain.requests import Once, Replayed

# Audit entries for the new keys of a batch, written in the batch's transaction (backfills).
AuditHook = Callable[[Set[EventKey]], Sequence[AuditEntry]]


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
    ) -> list[UsageAggregate]: ...

    async def summarize_meters(
        self,
        meters: Sequence[Meter],
        tenant_ids: Sequence[str],
        start: datetime,
        end: datetime,
        bucket: TimeBucket,
        dimension: str,
    ) -> list[MeterValue]: ...

    async def tenants_with_usage(
        self, start: datetime, end: datetime, after: str, limit: int
    ) -> list[str]: ...


class UsageLedger(EventWriter, UsageReader, Protocol):
    """Everything Metering reads and writes of usage."""


class RateBook(Protocol):
    """The rate card as stored: every rate of every usage type, with its effective time."""

    async def first_effective_times(self) -> dict[tuple[str, str], datetime]: ...

    async def in_effect(self, at: datetime, after: tuple[str, str], limit: int) -> list[Rate]: ...

    async def history(self, after: tuple[str, str, datetime], limit: int) -> list[Rate]: ...

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

    async def all(self) -> list[Meter]: ...

    async def get(self, meter_id: str) -> Meter: ...

    async def page(self, after: str, limit: int) -> list[Meter]: ...

    async def create(
        self, spec: MeterSpec, audit_entry: Callable[[Meter], AuditEntry], once: Once[Meter] | None
    ) -> Meter | Replayed: ...

    async def archive(
        self, meter_id: str, audit_entry: Callable[[Meter, Meter], AuditEntry], once: Once[Meter] | None
    ) -> Meter | Replayed: ...


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
    ) -> list[AuditEvent]: ...
