"""In-memory stores for unit tests of the services (the Protocols of server.domain.stores)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar, cast

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
from server.domain.stores import (
    AuditHook,
    BilledLine,
    MeterWindow,
    Period,
    ProfileAndPlans,
    TenantPeriod,
    UsageRow,
)
from server.domain.timeutil import to_micros
from server.payments.events import StripeEvent
from server.payments.states import CollectionState, Payment

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T = TypeVar("T")


class FakeLedger:
    """A UsageLedger: each (tenant_id, event_id) kept once, with its quantity and time."""

    def __init__(self) -> None:
        self.events: dict[EventKey, tuple[str, str, Decimal, int]] = {}
        self.audited: list[AuditEntry] = []
        self.reads = {"summarize": 0, "summarize_meters": 0}  # calls of each read

    async def record_new_keys(
        self,
        columns: EventColumns,
        audit: AuditHook | None = None,
        contributions: Contributions | None = None,
    ) -> set[EventKey]:
        new: set[EventKey] = set()
        for i, key in enumerate(zip(columns.tenant_ids, columns.event_ids, strict=True)):
            if key not in self.events:
                self.events[key] = (
                    columns.services[i],
                    columns.usage_types[i],
                    Decimal(columns.quantities[i]),
                    columns.times_micros[i],
                )
                new.add(key)
        if audit is not None:
            self.audited += audit(new)
        return new

    async def summarize(
        self, tenant_ids: Sequence[str], start: datetime, end: datetime, bucket: TimeBucket, dimension: str
    ) -> list[UsageAggregate]:
        assert bucket == TimeBucket.NONE and not dimension, "the fake sums whole ranges only"
        self.reads["summarize"] += 1
        totals: dict[tuple[str, str, str], tuple[Decimal, int]] = {}
        for (tenant, _), (service, usage_type, quantity, micros) in self.events.items():
            if tenant in tenant_ids and to_micros(start) <= micros < to_micros(end):
                total, count = totals.get((tenant, service, usage_type), (Decimal(0), 0))
                totals[(tenant, service, usage_type)] = (total + quantity, count + 1)
        return [
            UsageAggregate(tenant, service, usage_type, None, "", str(total), count)
            for (tenant, service, usage_type), (total, count) in sorted(totals.items())
        ]

    async def summarize_meters(
        self,
        meters: Sequence[Meter],
        tenant_ids: Sequence[str],
        start: datetime,
        end: datetime,
        bucket: TimeBucket,
        dimension: str,
    ) -> list[MeterValue]:
        assert not meters, "the fake has no meters"
        self.reads["summarize_meters"] += 1
        return []

    async def tenants_with_usage(self, start: datetime, end: datetime, after: str, limit: int) -> list[str]:
        return sorted({tenant for tenant, _ in self.events if tenant > after})[:limit]


class FakeRateBook:
    """A RateBook holding the rates it is given; upsert replaces a rate of the same type and time."""

    def __init__(self, *rates: Rate) -> None:
        self.rates = list(rates)
        self.audited: list[AuditEntry] = []

    async def first_effective_times(self) -> dict[tuple[str, str], datetime]:
        first: dict[tuple[str, str], datetime] = {}
        for rate in self.rates:
            key = (rate.service, rate.usage_type)
            first[key] = min(first.get(key, rate.effective_from), rate.effective_from)
        return first

    async def in_effect(self, at: datetime, after: tuple[str, str], limit: int) -> list[Rate]:
        latest: dict[tuple[str, str], Rate] = {}
        for rate in sorted(self.rates, key=lambda r: r.effective_from):
            if rate.effective_from <= at and (rate.service, rate.usage_type) > after:
                latest[(rate.service, rate.usage_type)] = rate
        return [latest[key] for key in sorted(latest)][:limit]

    async def history(self, after: tuple[str, str, datetime], limit: int) -> list[Rate]:
        ordered = sorted(self.rates, key=lambda r: (r.service, r.usage_type, r.effective_from))
        return [r for r in ordered if (r.service, r.usage_type, r.effective_from) > after][:limit]

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
        known = any((r.service, r.usage_type) == (service, usage_type) for r in self.rates)
        effective = effective_from or default_effective_from[1 if known else 0]
        before = [r for r in self.rates if (r.service, r.usage_type) == (service, usage_type)]
        rate = Rate(service, usage_type, unit_price, currency, effective, effective)
        self.rates = [
            r
            for r in self.rates
            if (r.service, r.usage_type, r.effective_from) != (service, usage_type, effective)
        ]
        self.rates.append(rate)
        self.audited.append(audit_entry(before[-1] if before else None, rate))
        return rate


class FakeMeterBook:
    """A MeterBook without meters (the services' meter paths have their own tests)."""

    async def all(self) -> list[Meter]:
        return []

    async def get(self, meter_id: str) -> Meter:
        raise AssertionError("no meters here")

    async def page(self, after: str, limit: int) -> list[Meter]:
        return []

    async def create(
        self, spec: MeterSpec, audit_entry: Callable[[Meter], AuditEntry], once: Once[Meter] | None
    ) -> Meter | Replayed:
        raise AssertionError("no meters here")

    async def archive(
        self, meter_id: str, audit_entry: Callable[[Meter, Meter], AuditEntry], once: Once[Meter] | None
    ) -> Meter | Replayed:
        raise AssertionError("no meters here")


class FakeAuditReader:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

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
        return [e for e in self.events if e.id > after_id][:limit]


Tx = TypeVar("Tx")


class FakeChangeRecords:
    """ChangeRecords (server.domain.stores) on a fake's state: its `requests` and `audited`."""

    _state: Any

    async def claim(self, key: RequestKey) -> bytes | None:
        return claim_request(self._state.requests, key)

    async def complete(self, key: RequestKey, response: bytes) -> None:
        self._state.requests[_request(key)] = (key.fingerprint, response)

    async def append_audit(self, entry: AuditEntry) -> None:
        self._state.audited.append(entry)


class FakeTransactions(Generic[Tx]):
    """Transactions (server.domain.stores) in memory: `work` runs once; its changes are undone if it raises.

    Counts the units of work per kind, so that a test sees which transaction a use case asked for.
    A subclass says what a transaction is and how its state is saved and put back.
    """

    def __init__(self) -> None:
        self.units: list[str] = []

    def _transaction(self) -> Tx:
        raise NotImplementedError

    def _snapshot(self) -> object:
        raise NotImplementedError

    def _restore(self, saved: object) -> None:
        raise NotImplementedError

    async def _run(self, kind: str, work: Callable[[Tx], Awaitable[T]]) -> T:
        self.units.append(kind)
        saved = self._snapshot()
        try:
            return await work(self._transaction())
        except BaseException:
            self._restore(saved)  # rolled back whole
            raise

    async def run_read(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        return await self._run("read", work)

    async def run_in_transaction(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        return await self._run("transaction", work)

    async def run_in_tenant_transaction(self, tenant_id: str, work: Callable[[Tx], Awaitable[T]]) -> T:
        return await self._run(f"tenant {tenant_id}", work)


class FakeBillingTransaction(FakeChangeRecords):
    """BillingTransaction (server.domain.stores) and PaymentTransaction (server.payments.stores)
    on FakeInvoices' state: one transaction's view of it, as storage's InvoiceTransaction is both."""

    def __init__(self, state: FakeInvoices) -> None:
        self._state = state

    async def append_audit_many(self, entries: Sequence[AuditEntry]) -> None:
        self._state.audited.extend(entries)

    async def lock_tenant(self, tenant_id: str) -> None:
        pass  # one unit of work at a time in memory

    async def overlapping(
        self, tenant_id: str, start: datetime, end: datetime
    ) -> list[tuple[str, datetime, datetime, InvoiceStatus]]:
        return sorted(
            (i.id, i.period_start, i.period_end, i.status)
            for i in self._state.invoices.values()
            if i.tenant_id == tenant_id
            and i.period_start < end
            and i.period_end > start
            and i.status is not InvoiceStatus.VOID
            and i.kind is InvoiceKind.FINAL
        )

    async def with_final_invoice_over(self, periods: Sequence[tuple[str, datetime, datetime]]) -> set[str]:
        return {t for t, start, end in periods if await self.overlapping(t, start, end)}

    async def usage_rows(self, tenant_id: str, periods: Sequence[Period]) -> dict[str, list[UsageRow]]:
        # The fake's usage has no time: every period of the tenant holds all of it.
        return {label: list(self._state.usage.get(tenant_id, [])) for label, _, _ in periods}

    async def usage_rows_of(self, periods: Sequence[TenantPeriod]) -> dict[tuple[str, str], list[UsageRow]]:
        return {(t, label): list(self._state.usage.get(t, [])) for t, label, _, _ in periods}

    async def billed_lines(self, tenant_id: str, start: datetime, end: datetime) -> list[BilledLine]:
        return (await self.billed_lines_of([(tenant_id, start, end)]))[tenant_id]

    async def billed_lines_of(
        self, periods: Sequence[tuple[str, datetime, datetime]]
    ) -> dict[str, list[BilledLine]]:
        billed = (InvoiceStatus.FINALIZED, InvoiceStatus.PAID, InvoiceStatus.UNCOLLECTIBLE)
        return {
            t: [
                (i.period_start, i.period_end, line)
                for i in sorted(self._state.invoices.values(), key=lambda i: i.period_start)
                if i.tenant_id == t and i.status in billed and i.period_end <= start
                for line in i.lines
            ]
            for t, start, _ in periods
        }

    async def meter_totals(self, windows: Sequence[MeterWindow]) -> dict[tuple[str, str, str], Decimal]:
        return {}  # no meters in the fake

    async def lock(self, invoice_id: str) -> Invoice | None:
        return self._state.invoices.get(invoice_id)

    async def find(self, invoice_id: str) -> Invoice | None:
        return self._state.invoices.get(invoice_id)

    async def load(self, invoice_id: str) -> Invoice:
        return self._state.invoices[invoice_id]

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
        before = self._state.invoices.get(invoice_id)
        created = EPOCH if before is None else before.created_at
        self._state.invoices[invoice_id] = Invoice(
            invoice_id, tenant_id, start, end, currency, tuple(lines), total, InvoiceStatus.DRAFT,
            created, EPOCH, EPOCH, kind,
        )  # fmt: skip

    async def save_drafts(self, drafts: Sequence[Invoice]) -> None:
        for draft in drafts:
            assert draft.id not in self._state.invoices
            self._state.invoices[draft.id] = draft

    async def next_number(self, issuer: str, prefix: str) -> int:
        return await self.take_numbers(issuer, prefix, 1)

    async def take_numbers(self, issuer: str, prefix: str, count: int) -> int:
        last = self._state.numbers.get((issuer, prefix), 0) + count
        self._state.numbers[(issuer, prefix)] = last
        return last - count + 1

    async def finalize(
        self,
        invoice_id: str,
        number: str,
        parties: Mapping[str, Any],
        plan_ids: Sequence[str],
        at: datetime,
        lines: Sequence[LineItem],
    ) -> Invoice:
        draft = self._state.invoices[invoice_id]
        assert draft.status is InvoiceStatus.DRAFT
        invoice = dataclasses.replace(
            draft,
            status=InvoiceStatus.FINALIZED,
            number=number,
            parties=dict(parties),
            plan_ids=tuple(plan_ids),
            finalize_time=at,
            lines=tuple(lines),
        )
        self._state.invoices[invoice_id] = invoice
        return invoice

    async def finalize_many(
        self, numbered: Sequence[tuple[str, str, Mapping[str, Any]]], at: datetime, issuer: str
    ) -> None:
        for invoice_id, number, parties in numbered:
            draft = self._state.invoices[invoice_id]
            await self.finalize(invoice_id, number, parties, draft.plan_ids, at, draft.lines)

    async def set_status(self, invoice_id: str, status: InvoiceStatus, at: datetime) -> None:
        column = {
            InvoiceStatus.PAID: "paid_time",
            InvoiceStatus.VOID: "void_time",
            InvoiceStatus.UNCOLLECTIBLE: "uncollectible_time",
        }[status]
        invoice = self._state.invoices[invoice_id]
        self._state.invoices[invoice_id] = dataclasses.replace(invoice, status=status, **{column: at})

    async def profile(self, tenant_id: str, *, lock: bool = False) -> ProfileAndPlans | None:
        return self._state.profiles.get(tenant_id)

    async def profiles(self, tenant_ids: Sequence[str]) -> dict[str, ProfileAndPlans]:
        return {t: self._state.profiles[t] for t in tenant_ids if t in self._state.profiles}

    async def plan_versions(self, plan_ids: Sequence[str]) -> dict[str, list[PlanVersion]]:
        return {plan_id: list(self._state.plan_versions.get(plan_id, [])) for plan_id in plan_ids}

    async def mark_closed(self, tenant_id: str, closed_until: datetime, next_close_time: datetime) -> None:
        profile, history = self._state.profiles[tenant_id]
        self._state.profiles[tenant_id] = (
            dataclasses.replace(profile, closed_until=closed_until, next_close_time=next_close_time),
            history,
        )

    async def mark_closed_many(self, closes: Sequence[tuple[str, datetime, datetime]]) -> None:
        for tenant_id, closed_until, next_close_time in closes:
            await self.mark_closed(tenant_id, closed_until, next_close_time)

    async def postpone_close(self, tenant_id: str, next_close_time: datetime) -> None:
        profile, history = self._state.profiles[tenant_id]
        self._state.profiles[tenant_id] = (
            dataclasses.replace(profile, next_close_time=next_close_time),
            history,
        )

    async def credited(self, invoice_id: str) -> Decimal:
        return sum((n.amount for n in self._state.notes if n.invoice_id == invoice_id), Decimal(0))

    async def insert_credit_note(self, note: CreditNote) -> CreditNote:
        self._state.notes.append(note)
        return note

    async def publish(
        self, event_type: str, data: Mapping[str, Any], *, time: datetime | None = None
    ) -> str | None:
        self._state.published.append((event_type, dict(data)))
        return f"evt_{len(self._state.published)}"

    async def publish_many(
        self, event_type: str, datas: Sequence[Mapping[str, Any]], *, time: datetime
    ) -> None:
        for data in datas:
            await self.publish(event_type, data, time=time)

    async def create_payments(self, invoice_ids: Sequence[str], state: PaymentState, at: datetime) -> None:
        for invoice_id in invoice_ids:
            self._state.payments.setdefault(invoice_id, (Payment(invoice_id, state), at))

    async def payment(self, invoice_id: str) -> InvoicePayment | None:
        if (found := self._state.payments.get(invoice_id)) is None:
            return None
        row, at = found
        return InvoicePayment(
            row.state,
            row.stripe_invoice_id,
            row.attempt_count,
            row.next_attempt_time,
            row.last_failure or None,
            at,
        )

    async def enqueue(
        self,
        kind: str,
        subjects: Sequence[str],
        payload: Mapping[str, Any] | None = None,
        *,
        due: datetime,
        reopen: bool = False,
    ) -> None:
        for subject in subjects:
            job = self._state.jobs.get((kind, subject))
            if job is None or (reopen and job["state"] != "pending"):
                self._state.jobs[(kind, subject)] = {"state": "pending", "due": due, **(payload or {})}

    # --- server.payments.stores.PaymentTransaction ---

    async def tenant_of(self, invoice_id: str) -> str | None:
        invoice = self._state.invoices.get(invoice_id)
        return None if invoice is None else invoice.tenant_id

    async def record_event(self, event: StripeEvent, payload: str, at: datetime) -> bool:
        if event.id in self._state.stripe_events:
            return False
        self._state.stripe_events[event.id] = ("", None)
        return True

    async def set_event_outcome(self, event_id: str, outcome: str, invoice_id: str | None) -> None:
        self._state.stripe_events[event_id] = (outcome, invoice_id)

    async def find_invoice(self, event: StripeEvent) -> tuple[str, str] | None:
        invoice_id = event.tally_invoice_id or next(
            (self._state.refs[ref] for ref in (event.object_id, *event.refs) if ref in self._state.refs), None
        )
        invoice = None if invoice_id is None else self._state.invoices.get(invoice_id)
        return None if invoice is None else (invoice.id, invoice.tenant_id)

    async def remember_refs(self, invoice_id: str, refs: Sequence[str]) -> None:
        self._state.refs.update((ref, invoice_id) for ref in refs)

    async def lock_payment(self, invoice_id: str) -> Payment | None:
        return await self.read_payment(invoice_id)

    async def read_payment(self, invoice_id: str) -> Payment | None:
        found = self._state.payments.get(invoice_id)
        return None if found is None else found[0]

    async def save_payment(self, payment: Payment, at: datetime) -> None:
        before = await self.read_payment(payment.invoice_id)
        stripe_id = (
            payment.stripe_invoice_id
            if before is None
            else before.stripe_invoice_id or payment.stripe_invoice_id
        )
        self._state.payments[payment.invoice_id] = (
            dataclasses.replace(payment, stripe_invoice_id=stripe_id),
            at,
        )

    def _outstanding(self, tenant_id: str) -> list[tuple[Invoice, Payment]]:
        owed = (PaymentState.UNCOLLECTIBLE, PaymentState.FAILED, PaymentState.ACTION_REQUIRED)
        return sorted(
            (
                (invoice, row)
                for invoice_id, (row, _) in self._state.payments.items()
                if (invoice := self._state.invoices[invoice_id]).tenant_id == tenant_id
                and row.state in owed
                and invoice.status not in (InvoiceStatus.PAID, InvoiceStatus.VOID)
            ),
            key=lambda pair: (pair[0].period_start, pair[0].id),
        )

    async def collection_counts(self, tenant_id: str) -> tuple[int, int]:
        states = [row.state for _, row in self._outstanding(tenant_id)]
        uncollectible = states.count(PaymentState.UNCOLLECTIBLE)
        return uncollectible, len(states) - uncollectible

    async def collection(self, tenant_id: str) -> tuple[CollectionState, datetime] | None:
        return self._state.collections.get(tenant_id)

    async def set_collection(self, tenant_id: str, state: CollectionState, at: datetime) -> None:
        self._state.collections[tenant_id] = (state, at)

    async def past_due_invoices(self, tenant_id: str, limit: int) -> list[tuple[str, str]]:
        return [(invoice.id, row.state.value) for invoice, row in self._outstanding(tenant_id)][:limit]

    async def job_state(self, kind: str, subject: str) -> str | None:
        job = self._state.jobs.get((kind, subject))
        return None if job is None else str(job["state"])


def _request(key: RequestKey) -> tuple[str, str, str]:
    return key.principal, key.method, key.request_id


def claim_request(requests: dict[tuple[str, str, str], tuple[bytes, bytes]], key: RequestKey) -> bytes | None:
    """request_ids.claim in memory: None the first time, the stored response after, reuse refused."""
    stored = requests.get(_request(key))
    if stored is None:
        requests[_request(key)] = (key.fingerprint, b"")
        return None
    if stored[0] != key.fingerprint:
        raise key.reused()
    return stored[1]


class FakeInvoices(FakeTransactions[FakeBillingTransaction]):
    """An InvoiceBook in memory (see FakeTransactions).

    `usage` is each tenant's priced usage, the same for every period.
    """

    def __init__(self, *invoices: Invoice) -> None:
        super().__init__()
        self.invoices = {invoice.id: invoice for invoice in invoices}
        self.audited: list[AuditEntry] = []
        self.requests: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}
        self.usage: dict[str, list[UsageRow]] = {}
        self.numbers: dict[tuple[str, str], int] = {}
        self.notes: list[CreditNote] = []
        self.payments: dict[str, tuple[Payment, datetime]] = {}  # invoice_payments rows and their update time
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}  # outbox jobs: state, due and payload
        self.stripe_events: dict[str, tuple[str, str | None]] = {}  # event id: (outcome, invoice id)
        self.refs: dict[str, str] = {}  # Stripe object id: invoice id
        self.collections: dict[str, tuple[CollectionState, datetime]] = {}
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.profiles: dict[str, ProfileAndPlans] = {}
        self.plan_versions: dict[str, list[PlanVersion]] = {}
        self.busy: set[str] = set()  # tenants whose lock another process holds

    _STATE = (
        "invoices",
        "audited",
        "requests",
        "numbers",
        "notes",
        "payments",
        "jobs",
        "published",
        "profiles",
        "stripe_events",
        "refs",
        "collections",
    )

    def _transaction(self) -> FakeBillingTransaction:
        return FakeBillingTransaction(self)

    def _snapshot(self) -> object:
        return {name: copy.copy(getattr(self, name)) for name in self._STATE}

    def _restore(self, saved: object) -> None:
        for name, value in cast(dict[str, object], saved).items():
            setattr(self, name, value)

    async def run_if_tenant_free(
        self, tenant_id: str, work: Callable[[FakeBillingTransaction | None], Awaitable[T]]
    ) -> T:
        if tenant_id in self.busy:
            return await work(None)
        return await self._run(f"tenant {tenant_id} if free", work)

    async def run_in_due_block(
        self, now: datetime, limit: int, work: Callable[[FakeBillingTransaction, list[str]], Awaitable[T]]
    ) -> T:
        due = sorted(
            t
            for t, (profile, _) in self.profiles.items()
            if t not in self.busy and profile.next_close_time is not None and profile.next_close_time <= now
        )[:limit]
        return await self._run("due block", lambda tx: work(tx, due))

    async def with_threshold(self) -> list[str]:
        return sorted(t for t, (profile, _) in self.profiles.items() if profile.spend_threshold is not None)

    async def get(self, invoice_id: str) -> Invoice | None:
        invoice = self.invoices.get(invoice_id)
        return (
            None if invoice is None else dataclasses.replace(invoice, payment=self.payments.get(invoice_id))
        )

    async def list_for_tenant(
        self, tenant_id: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Invoice]:
        mine = sorted(
            (i for i in self.invoices.values() if i.tenant_id == tenant_id),
            key=lambda i: (i.period_start, i.id),
            reverse=True,
        )
        return [i for i in mine if before is None or (i.period_start, i.id) < before][:limit]


@dataclasses.dataclass
class PlanState:
    """FakePlans' tables: plans and their versions, profiles, plan assignments, billed invoices."""

    plans: dict[str, Plan] = dataclasses.field(default_factory=dict)
    profiles: dict[str, BillingProfile] = dataclasses.field(default_factory=dict)
    assignments: dict[str, list[PlanAssignment]] = dataclasses.field(default_factory=dict)
    # A finalized invoice: (its name, tenant, plan ids it billed, period end).
    billed: list[tuple[str, str, tuple[str, ...], datetime]] = dataclasses.field(default_factory=list)
    meters: dict[str, MeterState] = dataclasses.field(default_factory=dict)
    audited: list[AuditEntry] = dataclasses.field(default_factory=list)
    requests: dict[tuple[str, str, str], tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)


class FakePlanTransaction(FakeChangeRecords):
    """A PlanTransaction on FakePlans' state, with storage's semantics (profiles carry the latest plan)."""

    def __init__(self, state: PlanState, now: datetime) -> None:
        self._state = state
        self._now = now

    async def get_plan(self, plan_id: str) -> Plan | None:
        return self._state.plans.get(plan_id)

    async def lock_plan(self, plan_id: str) -> Plan | None:
        return self._state.plans.get(plan_id)

    async def plans(self, after: str, limit: int) -> list[Plan]:
        return [self._state.plans[key] for key in sorted(self._state.plans) if key > after][:limit]

    async def insert_plan(self, plan_id: str, display_name: str, currency: str) -> bool:
        if plan_id in self._state.plans:
            return False
        self._state.plans[plan_id] = Plan(plan_id, display_name, currency, self._now, ())
        return True

    async def insert_version(
        self, plan_id: str, version: int, effective: datetime, charges: Sequence[PlanCharge], minimum: Decimal
    ) -> PlanVersion:
        stored = PlanVersion(plan_id, version, effective, tuple(charges), minimum, self._now)
        plan = self._state.plans[plan_id]
        self._state.plans[plan_id] = dataclasses.replace(plan, versions=(*plan.versions, stored))
        return stored

    async def billed_after(self, plan_id: str, at: datetime) -> str | None:
        return next(
            (name for name, _, plans, end in self._state.billed if plan_id in plans and end > at), None
        )

    async def tenant_billed_after(self, tenant_id: str, at: datetime) -> str | None:
        return next(
            (name for name, tenant, _, end in self._state.billed if tenant == tenant_id and end > at), None
        )

    async def profile(
        self, tenant_id: str, *, lock: bool = False
    ) -> tuple[BillingProfile, list[PlanAssignment]] | None:
        found = self._state.profiles.get(tenant_id)
        if found is None:
            return None
        history = sorted(self._state.assignments.get(tenant_id, []), key=lambda a: a.effective_from)
        return dataclasses.replace(found, plan_id=history[-1].plan_id), history

    async def save_profile(self, profile: BillingProfile, next_close_time: datetime) -> None:
        before = self._state.profiles.get(profile.tenant_id)
        if before is None:  # billing_start, anchor and closed_until are fixed at creation
            saved = dataclasses.replace(
                profile, closed_until=profile.billing_start, next_close_time=next_close_time
            )
        else:
            saved = dataclasses.replace(
                before,
                display_name=profile.display_name,
                email=profile.email,
                currency=profile.currency,
                tax_percentage=profile.tax_percentage,
                spend_threshold=profile.spend_threshold,
                overrides=profile.overrides,
                update_time=self._now,
            )
        self._state.profiles[profile.tenant_id] = saved

    async def assign_plan(self, tenant_id: str, effective_from: datetime, plan_id: str) -> None:
        kept = [a for a in self._state.assignments.get(tenant_id, []) if a.effective_from < effective_from]
        self._state.assignments[tenant_id] = [*kept, PlanAssignment(effective_from, plan_id)]

    async def meter_states(self, meter_ids: Sequence[str]) -> dict[str, MeterState]:
        return {m: self._state.meters[m] for m in meter_ids if m in self._state.meters}


class FakePlans(FakeTransactions[FakePlanTransaction]):
    """Transactions[PlanTransaction] in memory (see FakeTransactions)."""

    def __init__(self, now: datetime) -> None:
        super().__init__()
        self.state = PlanState()
        self._now = now

    def _transaction(self) -> FakePlanTransaction:
        return FakePlanTransaction(self.state, self._now)

    def _snapshot(self) -> object:
        return copy.deepcopy(self.state)

    def _restore(self, saved: object) -> None:
        self.state = cast(PlanState, saved)
