"""The outbox kinds of the Stripe push: one job per subject (an invoice id, a credit note id)."""

from __future__ import annotations

STRIPE_INVOICE = "stripe.invoice"  # subject: invoice id; push a finalized invoice
STRIPE_CREDIT_NOTE = "stripe.credit_note"  # subject: credit note id; payload invoice_id
STRIPE_VOID = "stripe.void"  # subject: invoice id; void it at Stripe
STRIPE_RETRY_PAYMENT = (
    "stripe.retry_payment"  # subject: invoice id; a dunning retry (server.payments.retries)
)
# Every kind that calls Stripe: a refused API key halts them all.
STRIPE_KINDS = frozenset({STRIPE_INVOICE, STRIPE_CREDIT_NOTE, STRIPE_VOID, STRIPE_RETRY_PAYMENT})
