"""What finalizing, voiding and crediting an invoice owe to its collection, written in their transaction.

Lifecycle (server.billing.lifecycle) calls these inside the transaction that changes the invoice,
so the payment record and the outbox job exist exactly when the change committed. With Stripe
configured, a finalized invoice gets payment state `pending` and a `stripe.invoice` job; a void or a
credit note of a pushed invoice gets a `stripe.void` / `stripe.credit_note` job. In simulation mode
(no Stripe key), a finalized invoice's payment state is `simulated` and nothing is queued: nothing
will ever call out for it, even if a key is configured later.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from server.domain.models import Invoice, InvoicePayment, PaymentState
from server.domain.stores import CollectionRecords
from server.payments.kinds import STRIPE_CREDIT_NOTE, STRIPE_INVOICE, STRIPE_VOID


class Collection:
    """The in-transaction side of collecting invoices; `live`: a Stripe key is configured."""

    def __init__(self, *, live: bool) -> None:
        self.live = live

    async def invoice_finalized(
        self, tx: CollectionRecords, invoice: Invoice, at: datetime
    ) -> InvoicePayment:
        """Record the new invoice's payment and, live, queue its push; the payment as recorded."""
        return await self.invoices_finalized(tx, [invoice], at)

    async def invoices_finalized(
        self, tx: CollectionRecords, invoices: Sequence[Invoice], at: datetime
    ) -> InvoicePayment:
        """`invoice_finalized` for a block of invoices finalized together; their (common) payment."""
        state = PaymentState.PENDING if self.live else PaymentState.SIMULATED
        ids = [invoice.id for invoice in invoices]
        await tx.create_payments(ids, state, at)
        if self.live:
            await tx.enqueue(STRIPE_INVOICE, ids, due=at)
        return InvoicePayment(state=state, updated_time=at)

    async def invoice_voided(self, tx: CollectionRecords, invoice_id: str, at: datetime) -> None:
        """A billed invoice was voided: mirror it at Stripe if it was pushed there."""
        payment = await tx.payment(invoice_id)
        if payment is not None and payment.state is not PaymentState.SIMULATED:
            await tx.enqueue(STRIPE_VOID, [invoice_id], due=at)

    async def credit_note_created(
        self, tx: CollectionRecords, note_id: str, invoice_id: str, at: datetime
    ) -> None:
        """A credit note was issued: mirror it at Stripe if its invoice was pushed there."""
        payment = await tx.payment(invoice_id)
        if payment is not None and payment.state is not PaymentState.SIMULATED:
            await tx.enqueue(STRIPE_CREDIT_NOTE, [note_id], {"invoice_id": invoice_id}, due=at)
