"""Collecting invoices through Stripe (issue 12, docs/stripe.md).

The transactional outbox and the push, webhooks (what Stripe reports back) and dunning
(retrying failed payments).
"""
