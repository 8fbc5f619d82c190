"""Billing: the rate card, plans, billing profiles, invoices and their lifecycle, period close.

Use cases by module: `service` (rates, invoice generation and reading, audit trail),
`pricer` (an invoice's content from what is stored), `lifecycle` (finalize, void, paid,
uncollectible, credit notes), `plans` (plans and billing profiles), `periods` (preview,
period close and the scheduler that closes periods by itself).
"""

from server.billing.service import Billing, Page

__all__ = ["Billing", "Page"]
