"""What the services need from storage, as small Protocols: storage/ implements them.

Metering and Billing depend on these rather than on server.storage's classes, so that
their unit tests run against in-memory fakes (tests/metering, tests/billing) beside the
end-to-end tests against PostgreSQL. Each store keeps its transactions and its retry
policy to itself (server.storage.database.run_with_retries): a caller sees a result or
a domain error, never a connection. A use case whose change spans several queries hands
its body to the store as a unit of work (Transactions), rather than retrying it itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from server.domain.aggregation import TimeBucket
from server.domain.audit import AuditEntry, AuditEvent
from server.domain.events import EventColumns, EventKey
from server.domain.meters import Contributions, Meter, MeterSpec, MeterState
from server.domain.models import (
    CreditNote,
    Invoice,
    InvoiceKind,
    InvoicePayment,
    InvoiceStatus,
    MeterValue,
    PaymentState,
    Rate,
    UsageAggregate,
)
from server.domain.plans import BillingProfile, Plan, PlanAssignment, PlanCharge, PlanVersion
from server.domain.pricing import LineItem
from server.domain.requests import Once, Replayed, RequestKey

# Audit entries for the new keys of a batch, written in the batch's transaction (backfills).
AuditHook = Callable[[Set[EventKey]], Sequence[AuditEntry]]

# The shapes of what a billing transaction reads to price periods.
Period = tuple[str, datetime, datetime]  # (label, start, end)
TenantPeriod = tuple[str, str, datetime, datetime]  # (tenant, label, start, end)
UsageRow = tuple[
    str, str, Decimal | None, Decimal, int
]  # (service, usage_type, unit price, quantity, events)
MeterWindow = tuple[str, str, str, datetime, datetime]  # (tenant, label, meter id, start, end)
BilledLine = tuple[datetime, datetime, LineItem]  # (period_start, period_end, line) of a billed invoice
ProfileAndPlans = tuple[BillingProfile, list[PlanAssignment]]  # a profile and its plan history

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


class ChangeRecords(Protocol):
    """What every audited change writes with itself: its request-id claim and its audit entry."""

    async def claim(self, key: RequestKey) -> bytes | None:
        """Claim a request's key for this change; the first call's response if it ran before."""
        ...

    async def complete(self, key: RequestKey, response: bytes) -> None:
        """Store the response of the change that claimed `key`."""
        ...

    async def append_audit(self, entry: AuditEntry) -> None:
        """Record the change in the audit trail."""
        ...


class PlanTransaction(ChangeRecords, Protocol):
    """What the plan and billing-profile use cases read and write in one transaction.

    Changes commit or roll back together with the request-id claim and the audit entry.
    """

    async def get_plan(self, plan_id: str) -> Plan | None:
        """The plan with its versions, or None."""
        ...

    async def lock_plan(self, plan_id: str) -> Plan | None:
        """The plan, locked until the transaction ends (one version added at a time), or None."""
        ...

    async def plans(self, after: str, limit: int) -> list[Plan]:
        """Up to `limit` plans with ids after `after`, in id order."""
        ...

    async def insert_plan(self, plan_id: str, display_name: str, currency: str) -> bool:
        """Create the plan without versions; False if the id is taken."""
        ...

    async def insert_version(
        self, plan_id: str, version: int, effective: datetime, charges: Sequence[PlanCharge], minimum: Decimal
    ) -> PlanVersion:
        """Add a version to the plan; the version as stored."""
        ...

    async def billed_after(self, plan_id: str, at: datetime) -> str | None:
        """The name of an invoice billed with this plan whose period ends after `at`, if any."""
        ...

    async def tenant_billed_after(self, tenant_id: str, at: datetime) -> str | None:
        """The name of a billed invoice of the tenant whose period ends after `at`, if any."""
        ...

    async def profile(
        self, tenant_id: str, *, lock: bool = False
    ) -> tuple[BillingProfile, list[PlanAssignment]] | None:
        """The tenant's profile and its plan history (locked with `lock`), or None."""
        ...

    async def save_profile(self, profile: BillingProfile, next_close_time: datetime) -> None:
        """Insert or update the profile; its first (or next) close is due at `next_close_time`."""
        ...

    async def assign_plan(self, tenant_id: str, effective_from: datetime, plan_id: str) -> None:
        """Put the tenant on the plan from `effective_from`; later assignments are superseded."""
        ...

    async def meter_states(self, meter_ids: Sequence[str]) -> dict[str, MeterState]:
        """The state of each existing meter of `meter_ids`, kept as read until the transaction ends."""
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


class InvoiceRecords(Protocol):
    """Invoices, their lines and numbers, under the tenant's invoice lock."""

    async def lock_tenant(self, tenant_id: str) -> None:
        """Hold the tenant's invoice lock until the transaction ends."""
        ...

    async def overlapping(
        self, tenant_id: str, start: datetime, end: datetime
    ) -> list[tuple[str, datetime, datetime, InvoiceStatus]]:
        """(id, period_start, period_end, status) of the tenant's final invoices overlapping [start, end).

        Void invoices no longer hold their period; interim invoices never overlap.
        """
        ...

    async def with_final_invoice_over(self, periods: Sequence[tuple[str, datetime, datetime]]) -> set[str]:
        """The tenants of (tenant, start, end) that have a final invoice overlapping their period."""
        ...

    async def lock(self, invoice_id: str) -> Invoice | None:
        """The invoice, locked until the transaction ends, or None."""
        ...

    async def find(self, invoice_id: str) -> Invoice | None:
        """The invoice (not locked), or None."""
        ...

    async def load(self, invoice_id: str) -> Invoice:
        """The invoice as stored now, with its lines; it must exist."""
        ...

    async def save(
        self,
        invoice_id: str,
        tenant_id: str,
        start: datetime,
        end: datetime,
        currency: str,
        total: Decimal,
        lines: Sequence[LineItem],
        kind: InvoiceKind = InvoiceKind.FINAL,
    ) -> None:
        """Insert or overwrite the draft invoice and replace its lines."""
        ...

    async def save_drafts(self, drafts: Sequence[Invoice]) -> None:
        """Insert new draft invoices (ids not used before) with their lines and plans."""
        ...

    async def next_number(self, issuer: str, prefix: str) -> int:
        """The next number of the (issuer, prefix) sequence: no gap, no repeat (held until commit)."""
        ...

    async def take_numbers(self, issuer: str, prefix: str, count: int) -> int:
        """The first of the next `count` numbers of the sequence, taken together."""
        ...

    async def finalize(
        self,
        invoice_id: str,
        number: str,
        parties: Mapping[str, Any],
        plan_ids: Sequence[str],
        at: datetime,
        lines: Sequence[LineItem],
    ) -> Invoice:
        """Freeze a draft whose `lines` were just saved: number it, mark it finalized, return it."""
        ...

    async def finalize_many(
        self, numbered: Sequence[tuple[str, str, Mapping[str, Any]]], at: datetime, issuer: str
    ) -> None:
        """Freeze drafts just saved by save_drafts, each (id, number, parties)."""
        ...

    async def set_status(self, invoice_id: str, status: InvoiceStatus, at: datetime) -> None:
        """Move a finalized invoice along its lifecycle, stamping the time of the new status."""
        ...

    async def append_audit_many(self, entries: Sequence[AuditEntry]) -> None:
        """Record many changes in the audit trail, in order."""
        ...


class PricingReads(Protocol):
    """What pricing a period reads: the profile and plans, usage, meters and what was billed."""

    async def profile(self, tenant_id: str, *, lock: bool = False) -> ProfileAndPlans | None:
        """The tenant's billing profile and plan history (the row locked with `lock`), or None."""
        ...

    async def profiles(self, tenant_ids: Sequence[str]) -> dict[str, ProfileAndPlans]:
        """`profile` for many tenants; tenants without a profile are left out."""
        ...

    async def plan_versions(self, plan_ids: Sequence[str]) -> dict[str, list[PlanVersion]]:
        """Every version of these plans, oldest first, per plan."""
        ...

    async def usage_rows(self, tenant_id: str, periods: Sequence[Period]) -> dict[str, list[UsageRow]]:
        """The tenant's usage per labelled period, per type and rate card price (None: no rate)."""
        ...

    async def usage_rows_of(self, periods: Sequence[TenantPeriod]) -> dict[tuple[str, str], list[UsageRow]]:
        """usage_rows for many tenants at once, per (tenant, label)."""
        ...

    async def billed_lines(self, tenant_id: str, start: datetime, end: datetime) -> list[BilledLine]:
        """The billed lines that bear on pricing [start, end): earlier periods, interims, adjustments."""
        ...

    async def billed_lines_of(
        self, periods: Sequence[tuple[str, datetime, datetime]]
    ) -> dict[str, list[BilledLine]]:
        """billed_lines for many (tenant, start, end) at once, per tenant."""
        ...

    async def meter_totals(self, windows: Sequence[MeterWindow]) -> dict[tuple[str, str, str], Decimal]:
        """Each window's meter aggregate over all its groups, by (tenant, label, meter id); 0 left out."""
        ...


class CloseCursor(Protocol):
    """How far a tenant's periods are closed, and when the next close is due."""

    async def mark_closed(self, tenant_id: str, closed_until: datetime, next_close_time: datetime) -> None:
        """Record that the periods are closed up to `closed_until`, and when the next close is due."""
        ...

    async def mark_closed_many(self, closes: Sequence[tuple[str, datetime, datetime]]) -> None:
        """mark_closed for many (tenant, closed_until, next_close_time)."""
        ...

    async def postpone_close(self, tenant_id: str, next_close_time: datetime) -> None:
        """Try the tenant's due close again at `next_close_time` (after a failure)."""
        ...


class CreditNoteRecords(Protocol):
    """The credit notes of an invoice."""

    async def credited(self, invoice_id: str) -> Decimal:
        """The sum of the invoice's credit notes so far."""
        ...

    async def insert_credit_note(self, note: CreditNote) -> CreditNote:
        """Store a credit note (its invoice is locked by this transaction); the note as stored."""
        ...


class EventPublisher(Protocol):
    """Webhook events, published with the change that they report."""

    async def publish(
        self, event_type: str, data: Mapping[str, Any], *, time: datetime | None = None
    ) -> str | None:
        """Publish a webhook event with the change; its id, or None if nobody subscribes to its type."""
        ...

    async def publish_many(
        self, event_type: str, datas: Sequence[Mapping[str, Any]], *, time: datetime
    ) -> None:
        """`publish` of many events of one type."""
        ...


class CollectionRecords(Protocol):
    """What finalizing, voiding and crediting owe to collection: payment records and outbox jobs."""

    async def create_payments(self, invoice_ids: Sequence[str], state: PaymentState, at: datetime) -> None:
        """Record the payment of each new invoice, in `state`."""
        ...

    async def payment(self, invoice_id: str) -> InvoicePayment | None:
        """The invoice's payment record, or None."""
        ...

    async def enqueue(
        self,
        kind: str,
        subjects: Sequence[str],
        payload: Mapping[str, Any] | None = None,
        *,
        due: datetime,
        reopen: bool = False,
    ) -> None:
        """Add an outbox job of `kind` per subject, due at `due`; existing jobs are left as they are.

        `reopen` starts a finished (done or stopped) job again from its first step (a retry
        that recurs); a pending one is never reset.
        """
        ...


class BillingTransaction(
    ChangeRecords,
    InvoiceRecords,
    PricingReads,
    CloseCursor,
    CreditNoteRecords,
    EventPublisher,
    CollectionRecords,
    Protocol,
):
    """What the invoice use cases (server.billing) read and write in one transaction.

    Every change commits or rolls back together: the invoice and its lines, the numbering
    sequence, the profile's close cursor, the request-id claim, the audit entry, the events
    published to webhook subscribers, the payment record and the outbox jobs. The parts are
    small Protocols of their own, so that a step takes only what it uses (the pricer
    PricingReads, Collection CollectionRecords). Storage's InvoiceTransaction implements
    it on one connection; tests/memory_stores.py in memory.
    """


class InvoiceBook(Transactions[BillingTransaction], Protocol):
    """The invoices as stored, and the transactions that change them (storage's InvoiceStore)."""

    async def run_if_tenant_free(
        self, tenant_id: str, work: Callable[[BillingTransaction | None], Awaitable[T]]
    ) -> T:
        """`work` holding the tenant's invoice lock if it is free; with None if another holds it."""
        ...

    async def run_in_due_block(
        self, now: datetime, limit: int, work: Callable[[BillingTransaction, list[str]], Awaitable[T]]
    ) -> T:
        """`work` with up to `limit` tenants whose close is due by `now`, each locked (skipping held ones)."""
        ...

    async def with_threshold(self) -> list[str]:
        """The tenants whose profile has a spend threshold."""
        ...

    async def get(self, invoice_id: str) -> Invoice | None:
        """The invoice with its lines and payment, or None."""
        ...

    async def list_for_tenant(
        self, tenant_id: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Invoice]:
        """Up to `limit` of the tenant's invoices, newest first, before the page key."""
        ...


class CreditNoteBook(Protocol):
    """The credit notes as stored."""

    async def list_for_tenant(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[CreditNote]:
        """Up to `limit` of the tenant's credit notes after the page key."""
        ...
