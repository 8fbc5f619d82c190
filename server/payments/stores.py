"""What the payment ledger (server.payments.ledger) needs from storage, as a Protocol.

PaymentTransaction is BillingTransaction (server.domain.stores) plus the payments' own rows:
Stripe's events, the invoices' payment rows and the tenants' collection status. It lives in
the payments room because its types do (StripeEvent, Payment, CollectionState); storage's
InvoiceTransaction implements it, tests/memory_stores.py in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from server.domain.stores import BillingTransaction
from server.payments.events import StripeEvent
from server.payments.states import CollectionState, Payment


class PaymentTransaction(BillingTransaction, Protocol):
    """One transaction of the ledger: an event, a payment and what they move, together."""

    async def tenant_of(self, invoice_id: str) -> str | None:
        """The tenant of the invoice, or None if there is no such invoice."""
        ...

    async def record_event(self, event: StripeEvent, payload: str, at: datetime) -> bool:
        """Store a delivered event once; False if its id was stored before (a redelivery)."""
        ...

    async def set_event_outcome(self, event_id: str, outcome: str, invoice_id: str | None) -> None:
        """Record what a stored event did (applied, unchanged, unmatched...) and its invoice."""
        ...

    async def find_invoice(self, event: StripeEvent) -> tuple[str, str] | None:
        """(invoice id, tenant id) of the Tally invoice an event is about, or None."""
        ...

    async def remember_refs(self, invoice_id: str, refs: Sequence[str]) -> None:
        """Remember the Stripe objects (charges, payment intents) that name the invoice."""
        ...

    async def lock_payment(self, invoice_id: str) -> Payment | None:
        """The invoice's payment row, locked until the transaction ends; None if it has none yet."""
        ...

    async def read_payment(self, invoice_id: str) -> Payment | None:
        """The invoice's payment row as the rules see it, or None."""
        ...

    async def save_payment(self, payment: Payment, at: datetime) -> None:
        """Write the columns webhooks and dunning own; the push's other columns stay as they are."""
        ...

    async def collection_counts(self, tenant_id: str) -> tuple[int, int]:
        """(uncollectible, past due) counts of the tenant's outstanding invoice payments."""
        ...

    async def collection(self, tenant_id: str) -> tuple[CollectionState, datetime] | None:
        """The tenant's recorded collection status and when it was set; None: never recorded."""
        ...

    async def set_collection(self, tenant_id: str, state: CollectionState, at: datetime) -> None:
        """Record the tenant's collection status."""
        ...

    async def past_due_invoices(self, tenant_id: str, limit: int) -> list[tuple[str, str]]:
        """(invoice id, payment state) of the tenant's outstanding payments, oldest period first."""
        ...

    async def job_state(self, kind: str, subject: str) -> str | None:
        """The state of the outbox job (kind, subject), or None if there is none."""
        ...
