"""The plan use cases' transactions: plans, versions and billing profiles in SQL.

`PlanStore` runs each unit of work in one of the invoice store's transactions (the same
retry policy, and the tenant's invoice lock where a profile changes, so that a plan change
and a period close of one tenant never interleave), and hands it a `PlanTransaction`: the
queries of server.storage.plans on that transaction's connection, with its request-id
claims and audit entries. server.billing.plans sees only the Protocols of
server.domain.stores (PlanTransactionOps), so its unit tests run against an in-memory fake.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from server.domain.audit import AuditEntry
from server.domain.meters import MeterState
from server.domain.plans import BillingProfile, Plan, PlanAssignment, PlanCharge, PlanVersion
from server.domain.requests import RequestKey
from server.storage import meters as meter_store
from server.storage import plans as plan_store
from server.storage.invoices import InvoiceStore, InvoiceTransaction

T = TypeVar("T")


class PlanTransaction:
    """The plan and profile reads and writes of one transaction (see the module docstring)."""

    def __init__(self, tx: InvoiceTransaction) -> None:
        self._tx = tx
        self._conn = tx.connection

    async def claim(self, key: RequestKey) -> bytes | None:
        """Claim a request's key for this change; the first call's response if it ran before."""
        return await self._tx.claim(key)

    async def complete(self, key: RequestKey, response: bytes) -> None:
        """Store the response of the change that claimed `key`, committed (or not) with it."""
        await self._tx.complete(key, response)

    async def append_audit(self, entry: AuditEntry) -> None:
        """Record the change in the audit trail, committed (or not) with it."""
        await self._tx.append_audit(entry)

    async def get_plan(self, plan_id: str) -> Plan | None:
        """The plan with its versions, or None."""
        return await plan_store.get_plan(self._conn, plan_id)

    async def lock_plan(self, plan_id: str) -> Plan | None:
        """The plan, locked until the transaction ends (one version added at a time), or None."""
        return await plan_store.lock_plan(self._conn, plan_id)

    async def plans(self, after: str, limit: int) -> list[Plan]:
        """Up to `limit` plans with ids after `after`, in id order."""
        return await plan_store.plans(self._conn, after, limit)

    async def insert_plan(self, plan_id: str, display_name: str, currency: str) -> bool:
        """Create the plan without versions; False if the id is taken."""
        return await plan_store.insert_plan(self._conn, plan_id, display_name, currency)

    async def insert_version(
        self, plan_id: str, version: int, effective: datetime, charges: Sequence[PlanCharge], minimum: Decimal
    ) -> PlanVersion:
        """Add a version to the plan."""
        return await plan_store.insert_version(self._conn, plan_id, version, effective, charges, minimum)

    async def billed_after(self, plan_id: str, at: datetime) -> str | None:
        """The name of an invoice billed with this plan whose period ends after `at`, if any."""
        return await plan_store.billed_after(self._conn, plan_id, at)

    async def tenant_billed_after(self, tenant_id: str, at: datetime) -> str | None:
        """The name of a billed invoice of the tenant whose period ends after `at`, if any."""
        return await plan_store.tenant_billed_after(self._conn, tenant_id, at)

    async def profile(
        self, tenant_id: str, *, lock: bool = False
    ) -> tuple[BillingProfile, list[PlanAssignment]] | None:
        """The tenant's profile and its plan history (locked with `lock`), or None."""
        return await plan_store.profile(self._conn, tenant_id, lock=lock)

    async def save_profile(self, profile: BillingProfile, next_close_time: datetime) -> None:
        """Insert or update the profile; its first (or next) close is due at `next_close_time`."""
        await plan_store.save_profile(self._conn, profile, next_close_time)

    async def assign_plan(self, tenant_id: str, effective_from: datetime, plan_id: str) -> None:
        """Put the tenant on the plan from `effective_from`; later assignments are superseded."""
        await plan_store.assign_plan(self._conn, tenant_id, effective_from, plan_id)

    async def meter_states(self, meter_ids: Sequence[str]) -> dict[str, MeterState]:
        """The state of each existing meter of `meter_ids`, share-locked until the transaction ends."""
        return await meter_store.states(self._conn, meter_ids)


class PlanStore:
    """`Transactions[PlanTransaction]` over the invoice store's transactions."""

    def __init__(self, invoices: InvoiceStore) -> None:
        self._invoices = invoices

    async def run_read(self, work: Callable[[PlanTransaction], Awaitable[T]]) -> T:
        """`work` in a read-only transaction that sees one snapshot."""
        return await self._invoices.run_read(lambda tx: work(PlanTransaction(tx)))

    async def run_in_transaction(self, work: Callable[[PlanTransaction], Awaitable[T]]) -> T:
        """`work` in a plain transaction (plans lock the rows they change)."""
        return await self._invoices.run_in_transaction(lambda tx: work(PlanTransaction(tx)))

    async def run_in_tenant_transaction(
        self, tenant_id: str, work: Callable[[PlanTransaction], Awaitable[T]]
    ) -> T:
        """`work` holding the tenant's invoice lock (a profile change never meets a close)."""
        return await self._invoices.run_in_tenant_transaction(tenant_id, lambda tx: work(PlanTransaction(tx)))
