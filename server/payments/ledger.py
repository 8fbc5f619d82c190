"""Applying payment facts to invoices: Stripe's webhook events and the dunning retries' outcomes.

Each fact is applied in one transaction under the tenant's invoice lock: the event's row
(stored once by its id), the invoice's payment row, the invoice's status (moved through
server.billing.lifecycle, audited), the retry job, the payment's own audit entry and the
tenant's collection status commit together. The rules themselves are server.payments.states:
forward only, so redeliveries and any order of arrival end in the same state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from server.billing.lifecycle import Lifecycle
from server.domain.access import ALL_TENANTS, Caller, Principal
from server.domain.audit import AuditAction, AuditEntry
from server.domain.decimals import MINOR_UNITS, format_money
from server.domain.lifecycle import TRANSITIONS
from server.domain.models import Invoice, InvoiceStatus, PaymentState
from server.domain.stores import Transactions
from server.domain.timeutil import to_datetime
from server.domain.webhooks import INVOICE_PAYMENT_FAILED, invoice_data, rfc3339
from server.payments import states
from server.payments.dunning import DunningSchedule
from server.payments.events import EventType, StripeEvent
from server.payments.states import Change, CollectionState, Payment
from server.payments.stores import PaymentTransaction

log = logging.getLogger(__name__)

# The principals that audit entries name for changes Stripe reported and dunning made.
STRIPE = Principal(subject="stripe-webhook", tenants=ALL_TENANTS, scopes=frozenset())
DUNNING = Principal(subject="tally-dunning", tenants=ALL_TENANTS, scopes=frozenset())


class RetryJobs(Protocol):
    """Where dunning retries are kept (the outbox): one job per invoice."""

    async def schedule(self, tx: PaymentTransaction, invoice_id: str, due: datetime) -> None:
        """Have the invoice's retry job run at `due`, in the caller's transaction."""


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What Stripe answered a payment retry: paid, voided (it cannot be paid), or a failure."""

    paid: bool = False
    voided: bool = False
    action_required: bool = False
    failure: str = ""


@dataclass(frozen=True, slots=True)
class Received:
    """What a delivery did: applied, unchanged, unmatched, ignored or duplicate."""

    outcome: str
    invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class CollectionStatus:
    """A tenant's standing, with the invoices behind it (ids, oldest period first)."""

    tenant_id: str
    state: CollectionState
    past_due_invoices: tuple[str, ...]
    uncollectible_invoices: tuple[str, ...]
    update_time: datetime | None


# Invoices listed in a collection status, per kind: a tenant with more has bigger problems.
LISTED_INVOICES = 100


class PaymentLedger:
    """Invoices' payments: Stripe's events and dunning's attempts applied, collection status kept."""

    def __init__(
        self,
        invoices: Transactions[PaymentTransaction],
        lifecycle: Lifecycle,
        schedule: DunningSchedule,
        retries: RetryJobs,
        now_micros: Callable[[], int],
    ) -> None:
        self._invoices = invoices
        self._lifecycle = lifecycle
        self.schedule = schedule
        self._retries = retries
        self._now_micros = now_micros

    def now(self) -> datetime:
        """The ledger's clock, as a datetime."""
        return to_datetime(self._now_micros())

    async def collection_status(self, tenant_id: str, principal: Principal) -> CollectionStatus:
        """GetCollectionStatus: the tenant's standing, recomputed from its payments as read."""
        principal.require_tenant(tenant_id)

        async def work(
            tx: PaymentTransaction,
        ) -> tuple[tuple[CollectionState, datetime] | None, list[tuple[str, str]]]:
            recorded = await tx.collection(tenant_id)
            return recorded, await tx.past_due_invoices(tenant_id, 2 * LISTED_INVOICES)

        recorded, invoices = await self._invoices.run_read(work)
        uncollectible = [i for i, state in invoices if state == PaymentState.UNCOLLECTIBLE.value]
        past_due = [i for i, state in invoices if state != PaymentState.UNCOLLECTIBLE.value]
        return CollectionStatus(
            tenant_id,
            states.collection_state(len(uncollectible), len(past_due)),
            tuple(past_due[:LISTED_INVOICES]),
            tuple(uncollectible[:LISTED_INVOICES]),
            recorded[1] if recorded else None,
        )

    async def receive(self, event: StripeEvent, payload: str) -> Received:
        """Store a verified event once and apply it; a redelivery is answered `duplicate`."""

        async def work(tx: PaymentTransaction) -> Received:
            if not await tx.record_event(event, payload, self.now()):
                return Received("duplicate")
            if event.kind is None:
                return Received("ignored")
            found = await tx.find_invoice(event)
            if found is None:
                log.warning(
                    "Stripe event %s (%s of %s) matches no Tally invoice",
                    event.id,
                    event.type,
                    event.object_id,
                )
                await tx.set_event_outcome(event.id, "unmatched", None)
                return Received("unmatched")
            invoice_id, tenant_id = found
            await tx.lock_tenant(tenant_id)
            outcome = await self._apply_event(tx, invoice_id, event)
            await tx.set_event_outcome(event.id, outcome, invoice_id)
            return Received(outcome, invoice_id)

        return await self._invoices.run_in_transaction(work)

    async def record_attempt(
        self,
        tx: PaymentTransaction,
        invoice_id: str,
        attempt: int,
        outcome: AttemptOutcome,
        principal: Principal = DUNNING,
    ) -> Payment | None:
        """A payment attempt's outcome, applied like the webhook that reports it; the payment after it.

        Runs in the caller's transaction (the retry job's, or the push's for the first
        attempt, so the job's next step and this change commit together). A decline starts
        (or goes on with) the dunning schedule whether or not Stripe's webhooks are set up.
        """
        tenant_id = await tx.tenant_of(invoice_id)
        if tenant_id is None:
            return None
        await tx.lock_tenant(tenant_id)
        invoice = await tx.lock(invoice_id)
        if invoice is None:
            return None
        payment = await tx.lock_payment(invoice_id) or Payment(invoice_id, PaymentState.OPEN)
        if outcome.paid:
            change = states.paid(payment)
        elif outcome.voided:
            change = states.voided(payment)
        else:
            change = states.failed(
                payment,
                attempt,
                self.now(),
                outcome.failure,
                self.schedule,
                action_required=outcome.action_required,
            )
        await self.apply_change(
            tx, invoice, payment, change, Caller(principal, f"{invoice_id}:attempt-{attempt}")
        )
        return await tx.read_payment(invoice_id)

    async def _apply_event(self, tx: PaymentTransaction, invoice_id: str, event: StripeEvent) -> str:
        invoice = await tx.lock(invoice_id)
        assert invoice is not None  # found by id under the tenant's lock; invoices are never deleted
        payment = await tx.lock_payment(invoice_id) or Payment(
            invoice_id, PaymentState.OPEN, event.stripe_invoice_id
        )
        await tx.remember_refs(invoice_id, event.refs)
        caller = Caller(STRIPE, event.id)
        kind = event.kind
        if kind in (EventType.CHARGE_REFUNDED, EventType.DISPUTE_CREATED):
            await self._record_incident(tx, invoice, event, caller)
            return "applied"
        change: Change | None
        if kind is EventType.INVOICE_PAID:
            change = states.paid(payment)
        elif kind is EventType.INVOICE_VOIDED:
            change = states.voided(payment)
        elif kind is EventType.MARKED_UNCOLLECTIBLE:
            change = states.uncollectible(payment)
        else:
            change = states.failed(
                payment,
                event.attempt_count,
                event.created,
                event.failure,
                self.schedule,
                action_required=kind is EventType.ACTION_REQUIRED,
            )
        return await self.apply_change(tx, invoice, payment, change, caller)

    async def apply_change(
        self, tx: PaymentTransaction, invoice: Invoice, before: Payment, change: Change | None, caller: Caller
    ) -> str:
        """Write a change of the payment of an invoice locked in `tx` ("unchanged" if there is none)."""
        if change is None or not _fits(invoice.status, change.payment.state):
            return "unchanged"
        at = self.now()
        after = change.payment
        await tx.save_payment(after, at)
        target = change.invoice_status
        if target is not None and target in TRANSITIONS[invoice.status]:
            await self._lifecycle.move_in(tx, invoice, target, caller, mirror=False)
        # A failed attempt (the last one included), or the same attempt now needing the customer.
        if after.attempt_count > before.attempt_count or (
            after.state is not before.state and after.state in states.DUE
        ):
            await tx.append_audit(
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=AuditAction.PAYMENT_FAILED,
                    tenant_id=invoice.tenant_id,
                    resource=f"invoices/{invoice.id}",
                    before=_payment_state(before),
                    after=_payment_state(after),
                )
            )
            failed = invoice_data(
                await tx.load(invoice.id),
                attempt_count=str(after.attempt_count),
                failure=after.last_failure or "",
                payment_state=after.state.value,
                next_attempt_time=rfc3339(after.next_attempt_time) if after.next_attempt_time else "",
            )
            await tx.publish(INVOICE_PAYMENT_FAILED, failed, time=at)
        if change.retry_due is not None:
            await self._retries.schedule(tx, invoice.id, change.retry_due)
        await self._update_collection(tx, invoice.tenant_id, caller, at)
        return "applied"

    async def _record_incident(
        self, tx: PaymentTransaction, invoice: Invoice, event: StripeEvent, caller: Caller
    ) -> None:
        """A refund or a dispute: recorded beside the payment; a paid invoice stays paid."""
        currency = event.currency or invoice.currency
        minor = MINOR_UNITS.get(currency, 2)  # Stripe's amounts are in the currency's minor units
        amount = format_money(Decimal(event.amount_minor).scaleb(-minor), minor)
        refunded = event.kind is EventType.CHARGE_REFUNDED
        await tx.append_audit(
            AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=AuditAction.PAYMENT_REFUNDED if refunded else AuditAction.PAYMENT_DISPUTED,
                tenant_id=invoice.tenant_id,
                resource=f"invoices/{invoice.id}",
                before=None,
                after={
                    "amount_refunded" if refunded else "amount_disputed": amount,
                    "currency_code": currency,
                    "stripe_object": event.object_id,
                    "invoice_status": invoice.status.value,
                },
            )
        )

    async def _update_collection(
        self, tx: PaymentTransaction, tenant_id: str, caller: Caller, at: datetime
    ) -> None:
        state = states.collection_state(*await tx.collection_counts(tenant_id))
        recorded = await tx.collection(tenant_id)
        before = recorded[0] if recorded else CollectionState.GOOD_STANDING
        if state is before:
            return
        await tx.set_collection(tenant_id, state, at)
        await tx.append_audit(
            AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=AuditAction.COLLECTION_STATUS_CHANGED,
                tenant_id=tenant_id,
                resource=f"tenants/{tenant_id}/collectionStatus",
                before={"state": before.value},
                after={"state": state.value},
            )
        )


def _fits(status: InvoiceStatus, state: PaymentState) -> bool:
    """Whether a payment state may follow the invoice's own status.

    A draft is not billed yet; a paid or void invoice is settled for good (perhaps marked
    by hand), so only the same news is written to its payment.
    """
    if status is InvoiceStatus.DRAFT:
        return False
    if status is InvoiceStatus.PAID:
        return state is PaymentState.PAID
    if status is InvoiceStatus.VOID:
        return state is PaymentState.VOID
    return True


def _payment_state(payment: Payment) -> dict[str, Any]:
    return {
        "state": payment.state.value,
        "attempt_count": payment.attempt_count,
        "next_attempt_time": None
        if payment.next_attempt_time is None
        else payment.next_attempt_time.isoformat(),
        "last_failure": payment.last_failure,
    }
