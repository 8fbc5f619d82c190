"""How a payment event changes an invoice's payment state: pure rules, safe in any order.

Stripe delivers webhooks at least once and in no particular order, and Tally's own retries
report the same failures that Stripe's events later repeat. Every rule therefore only moves
forward:

- paid and void are final: nothing after them changes the payment (a late payment_failed
  after paid changes nothing; a refund or dispute is recorded beside it, it never unpays);
- uncollectible may still become paid or void, as the invoice lifecycle allows;
- a failure counts attempts with max(): an older event (fewer attempts) changes nothing,
  so "attempt 3 failed" followed by a late "attempt 2 failed" ends at attempt 3;
- the first failure's time anchors the dunning schedule; the last failure ends in
  uncollectible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from server.domain.models import InvoiceStatus, PaymentState
from server.payments.dunning import DunningSchedule

FINAL = frozenset({PaymentState.PAID, PaymentState.VOID})
# Nothing retries or fails any more: the invoice is settled one way or another.
SETTLED = FINAL | {PaymentState.UNCOLLECTIBLE}
# States the dunning retries act on.
DUE = frozenset({PaymentState.FAILED, PaymentState.ACTION_REQUIRED})


@dataclass(frozen=True, slots=True)
class Payment:
    """The columns of an invoice's invoice_payments row that webhooks and dunning change."""

    invoice_id: str
    state: PaymentState
    stripe_invoice_id: str | None = None
    attempt_count: int = 0
    next_attempt_time: datetime | None = None
    last_failure: str = ""
    first_failure_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """What an event does: the payment row after it, and the invoice status to move to (if any)."""

    payment: Payment
    invoice_status: InvoiceStatus | None = None

    @property
    def retry_due(self) -> datetime | None:
        """When the dunning retry job must next run (None: no retry, cancel any)."""
        if self.payment.state in DUE:
            return self.payment.next_attempt_time
        return None


def paid(payment: Payment) -> Change | None:
    """Stripe reports the invoice paid: final from any state but paid or void (no change then)."""
    if payment.state in FINAL:
        return None
    after = dataclasses.replace(payment, state=PaymentState.PAID, next_attempt_time=None)
    return Change(after, InvoiceStatus.PAID)


def voided(payment: Payment) -> Change | None:
    """The invoice was voided: final from any state but paid or void (no change then)."""
    if payment.state in FINAL:
        return None
    after = dataclasses.replace(payment, state=PaymentState.VOID, next_attempt_time=None)
    return Change(after, InvoiceStatus.VOID)


def uncollectible(payment: Payment) -> Change | None:
    """Written off: no more retries (no change once settled); a later payment still counts."""
    if payment.state in SETTLED:
        return None
    after = dataclasses.replace(payment, state=PaymentState.UNCOLLECTIBLE, next_attempt_time=None)
    return Change(after, InvoiceStatus.UNCOLLECTIBLE)


def failed(
    payment: Payment,
    attempt: int,
    at: datetime,
    failure: str,
    schedule: DunningSchedule,
    *,
    action_required: bool = False,
) -> Change | None:
    """Attempt number `attempt` failed at `at` (a decline, or the customer must authenticate).

    The retry after it follows `schedule` from the first failure; after the schedule's last
    attempt the invoice becomes uncollectible. An attempt number of 0 (an event without
    one) counts as one more than known.
    """
    if payment.state in SETTLED:
        return None
    attempt = attempt or payment.attempt_count + 1
    target = PaymentState.ACTION_REQUIRED if action_required else PaymentState.FAILED
    # The push may have counted the first failure before any schedule existed (no
    # first_failure_time): that attempt is news here, it starts the schedule.
    scheduled = payment.first_failure_time is not None
    if attempt < payment.attempt_count or (attempt == payment.attempt_count and scheduled):
        # Older news, except for what it adds: an earlier first failure (the schedule counts
        # from it), or the same attempt now known to need the customer.
        after = payment
        if payment.first_failure_time is not None and at < payment.first_failure_time:
            next_time = schedule.next_attempt(at, payment.attempt_count) or payment.next_attempt_time
            after = dataclasses.replace(after, first_failure_time=at, next_attempt_time=next_time)
        if attempt == payment.attempt_count and action_required:
            after = dataclasses.replace(after, state=target)
        return None if after == payment else Change(after)
    first = min(at, payment.first_failure_time) if payment.first_failure_time else at
    next_time = schedule.next_attempt(first, attempt)
    after = dataclasses.replace(
        payment,
        attempt_count=attempt,
        first_failure_time=first,
        last_failure=failure or ("authentication required" if action_required else "payment failed"),
        next_attempt_time=next_time,
        state=target,
    )
    if next_time is None:  # that was the last attempt
        after = dataclasses.replace(after, state=PaymentState.UNCOLLECTIBLE)
        return Change(after, InvoiceStatus.UNCOLLECTIBLE)
    return Change(after)


class CollectionState(Enum):
    """A tenant's standing in collections, from its invoices' payment states."""

    GOOD_STANDING = "good_standing"  # nothing failed, or everything failed was settled
    PAST_DUE = "past_due"  # a payment failed and dunning is retrying it
    DELINQUENT = "delinquent"  # dunning gave up on an invoice: it is uncollectible


def collection_state(uncollectible_count: int, past_due_count: int) -> CollectionState:
    """A tenant's standing from its unpaid invoices: delinquent, past due, or good standing."""
    if uncollectible_count:
        return CollectionState.DELINQUENT
    if past_due_count:
        return CollectionState.PAST_DUE
    return CollectionState.GOOD_STANDING
