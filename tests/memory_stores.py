"""In-memory stores for unit tests of the services (the Protocols of server.domain.stores)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar, cast

from server.domain.aggregation import TimeBucket
from server.domain.audit import AuditEntry, AuditEvent
from server.domain.events import EventColumns, EventKey
from server.domain.meters import Contributions, Meter, MeterSpec, MeterState
from server.domain.models import Invoice, InvoiceStatus, MeterValue, Rate, UsageAggregate
from server.domain.plans import BillingProfile, Plan, PlanAssignment, PlanCharge, PlanVersion
from server.domain.requests import Once, Replayed, RequestKey
from server.domain.stores import AuditHook
from server.domain.timeutil import to_micros
from server.storage.invoices import InvoiceTransaction

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


class FakeInvoiceTransaction:
    """The part of storage's InvoiceTransaction that a status move uses, on FakeInvoices' state."""

    def __init__(self, state: FakeInvoices) -> None:
        self._state = state

    async def claim(self, key: RequestKey) -> bytes | None:
        return claim_request(self._state.requests, key)

    async def complete(self, key: RequestKey, response: bytes) -> None:
        self._state.requests[_request(key)] = (key.fingerprint, response)

    async def lock(self, invoice_id: str) -> Invoice | None:
        return self._state.invoices.get(invoice_id)

    async def load(self, invoice_id: str) -> Invoice:
        return self._state.invoices[invoice_id]

    async def set_status(self, invoice_id: str, status: InvoiceStatus, at: datetime) -> None:
        column = {
            InvoiceStatus.PAID: "paid_time",
            InvoiceStatus.VOID: "void_time",
            InvoiceStatus.UNCOLLECTIBLE: "uncollectible_time",
        }[status]
        invoice = self._state.invoices[invoice_id]
        self._state.invoices[invoice_id] = dataclasses.replace(invoice, status=status, **{column: at})

    async def append_audit(self, entry: AuditEntry) -> None:
        self._state.audited.append(entry)


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


class FakeInvoices:
    """Transactions[InvoiceTransaction] in memory: `work` runs once; what it changed is undone if it raises.

    Counts the units of work per kind, so that a test sees which transaction a use case asked for.
    """

    def __init__(self, *invoices: Invoice) -> None:
        self.invoices = {invoice.id: invoice for invoice in invoices}
        self.audited: list[AuditEntry] = []
        self.requests: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}
        self.units: list[str] = []

    async def _run(self, kind: str, work: Callable[[InvoiceTransaction], Awaitable[T]]) -> T:
        self.units.append(kind)
        saved = copy.copy(self.invoices), list(self.audited), dict(self.requests)
        try:
            return await work(cast(InvoiceTransaction, FakeInvoiceTransaction(self)))
        except BaseException:
            self.invoices, self.audited, self.requests = saved  # rolled back whole
            raise

    async def run_read(self, work: Callable[[InvoiceTransaction], Awaitable[T]]) -> T:
        return await self._run("read", work)

    async def run_in_transaction(self, work: Callable[[InvoiceTransaction], Awaitable[T]]) -> T:
        return await self._run("transaction", work)

    async def run_in_tenant_transaction(
        self, tenant_id: str, work: Callable[[InvoiceTransaction], Awaitable[T]]
    ) -> T:
        return await self._run(f"tenant {tenant_id}", work)


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


class FakePlanTransaction:
    """A PlanTransaction on FakePlans' state, with storage's semantics (profiles carry the latest plan)."""

    def __init__(self, state: PlanState, now: datetime) -> None:
        self._state = state
        self._now = now

    async def claim(self, key: RequestKey) -> bytes | None:
        return claim_request(self._state.requests, key)

    async def complete(self, key: RequestKey, response: bytes) -> None:
        self._state.requests[_request(key)] = (key.fingerprint, response)

    async def append_audit(self, entry: AuditEntry) -> None:
        self._state.audited.append(entry)

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


class FakePlans:
    """Transactions[PlanTransaction] in memory: `work` runs once; what it changed is undone if it raises."""

    def __init__(self, now: datetime) -> None:
        self.state = PlanState()
        self.units: list[str] = []
        self._now = now

    async def _run(self, kind: str, work: Callable[[FakePlanTransaction], Awaitable[T]]) -> T:
        self.units.append(kind)
        saved = copy.deepcopy(self.state)
        try:
            return await work(FakePlanTransaction(self.state, self._now))
        except BaseException:
            self.state = saved  # rolled back whole
            raise

    async def run_read(self, work: Callable[[FakePlanTransaction], Awaitable[T]]) -> T:
        return await self._run("read", work)

    async def run_in_transaction(self, work: Callable[[FakePlanTransaction], Awaitable[T]]) -> T:
        return await self._run("transaction", work)

    async def run_in_tenant_transaction(
        self, tenant_id: str, work: Callable[[FakePlanTransaction], Awaitable[T]]
    ) -> T:
        return await self._run(f"tenant {tenant_id}", work)
