"""Payments through Stripe: the push of finalized invoices, webhooks and dunning (issue 12)."""
