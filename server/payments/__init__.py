"""Collecting invoices: the transactional outbox and the Stripe push (issue 12, docs/stripe.md)."""
