"""Dunning retries: one outbox job per invoice (kind `stripe.retry_payment`) that pays it again on schedule.

The job is enqueued when a payment fails (webhook or retry) and wakes at the payment's
next_attempt_time. Each run reads the payment as it is then, so it needs no payload and
survives restarts and redeliveries: settled (paid, void, uncollectible) -> done; not due yet
-> wait until it is; due -> ask Stripe to pay the invoice, with an idempotency key per
attempt (a retried request after a crash is the same attempt at Stripe, never a second
charge), and apply the answer like the webhook that reports it (server.payments.ledger).
With no Stripe key (simulation mode) nothing calls out: the job ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import asyncpg
import stripe

from server.payments import states
from server.payments.kinds import STRIPE_KINDS, STRIPE_RETRY_PAYMENT
from server.payments.ledger import AttemptOutcome, PaymentLedger
from server.payments.outbox import Done, Halt, Job, JobHandler, Outcome, Retry
from server.payments.stores import PaymentTransaction
from server.storage import payment_events
from server.storage.invoices import InvoiceTransaction

log = logging.getLogger(__name__)

RETRY_KIND = STRIPE_RETRY_PAYMENT


def idempotency_key(invoice_id: str, attempt: int) -> str:
    """Stable across restarts and retries of the same attempt; a new attempt is a new key."""
    return f"tally-{invoice_id}-pay-attempt-{attempt}"


class InvoicePayer(Protocol):
    """What charges an invoice at Stripe for a dunning retry."""

    async def pay(self, stripe_invoice_id: str, idempotency_key: str) -> AttemptOutcome:
        """Charge the invoice now. Errors that a later try may resolve (network, 5xx, 429) raise."""


class StripeInvoicePayer:
    """Pays through the real SDK (`POST /v1/invoices/{id}/pay`)."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client

    async def pay(self, stripe_invoice_id: str, idempotency_key: str) -> AttemptOutcome:
        """Charge the invoice; a decline is an outcome, errors worth retrying raise."""
        invoices = self._client.v1.invoices
        try:
            invoice = await invoices.pay_async(
                stripe_invoice_id, options={"idempotency_key": idempotency_key}
            )
        except stripe.CardError as exc:
            action = exc.code in ("authentication_required", "invoice_payment_intent_requires_action")
            return AttemptOutcome(action_required=action, failure=_failure(exc))
        except stripe.InvalidRequestError as exc:
            if exc.code == "invoice_already_paid":
                return AttemptOutcome(paid=True)
            # E.g. voided at Stripe in the meantime: its state says what became of it.
            invoice = await invoices.retrieve_async(stripe_invoice_id)
            if invoice.status in ("paid", "void"):
                return AttemptOutcome(paid=invoice.status == "paid", voided=invoice.status == "void")
            raise
        if invoice.status == "paid":
            return AttemptOutcome(paid=True)
        return AttemptOutcome(failure=f"invoice {invoice.status} after the payment attempt")


def _failure(exc: stripe.StripeError) -> str:
    decline = getattr(exc, "error", None)
    decline_code = getattr(decline, "decline_code", None) if decline is not None else None
    parts = [exc.code, decline_code, exc.user_message]
    return ": ".join(str(part) for part in parts if part)[:500]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """After a run: `wait_until` None means the job is done."""

    wait_until: datetime | None
    note: str


async def run_retry(
    conn: asyncpg.Connection, ledger: PaymentLedger, payer: InvoicePayer | None, invoice_id: str
) -> RetryDecision:
    """One run of an invoice's retry job, in the job's transaction."""
    payment = await payment_events.read_payment(conn, invoice_id)
    if payment is None or payment.state not in states.DUE:
        return RetryDecision(
            None, f"payment {payment.state.value if payment else 'missing'}: nothing to retry"
        )
    due = payment.next_attempt_time
    if due is not None and due > ledger.now():
        return RetryDecision(due, "not due yet")
    if payer is None or payment.stripe_invoice_id is None:
        log.info("payment retry of invoice %s skipped: no Stripe key (simulation mode)", invoice_id)
        return RetryDecision(None, "simulation mode: nothing calls out")
    attempt = payment.attempt_count + 1
    outcome = await payer.pay(payment.stripe_invoice_id, idempotency_key(invoice_id, attempt))
    after = await ledger.record_attempt(InvoiceTransaction(conn), invoice_id, attempt, outcome)
    state = after.state.value if after else "no payment"
    log.info("payment retry %d of invoice %s: %s", attempt, invoice_id, state)
    if after is not None and after.state in states.DUE and after.next_attempt_time is not None:
        return RetryDecision(after.next_attempt_time, f"attempt {attempt} failed: {after.last_failure}")
    return RetryDecision(None, f"attempt {attempt}: {state}")


class OutboxRetryJobs:
    """RetryJobs on the outbox: one `stripe.retry_payment` job per invoice."""

    async def schedule(self, tx: PaymentTransaction, invoice_id: str, due: datetime) -> None:
        """Make sure the invoice's retry job runs at `due` (or is already pending)."""
        if await tx.job_state(RETRY_KIND, invoice_id) == "pending":
            # It reads the payment when it runs and waits for the next attempt's time itself.
            # Not touched: it may be running now, its row locked by a worker that will want
            # this transaction's tenant lock.
            return
        await tx.enqueue(RETRY_KIND, [invoice_id], due=due, reopen=True)


def retry_handler(
    ledger: PaymentLedger,
    payer: InvoicePayer | None,
    on_auth_failure: Callable[[str], Awaitable[None]] | None = None,
) -> JobHandler:
    """The outbox handler of `stripe.retry_payment` jobs (the job's subject is the invoice id).

    A refused API key halts every Stripe kind in this process, as the push does, and is
    reported to `on_auth_failure` (the Payments health service).
    """

    async def handle(conn: asyncpg.Connection, job: Job) -> Outcome:
        try:
            decision = await run_retry(conn, ledger, payer, job.subject)
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            reason = f"Stripe refused the API key ({exc.http_status}): {exc.user_message or exc}"
            if on_auth_failure is not None:
                await on_auth_failure(reason)
            return Halt(reason, STRIPE_KINDS)
        if decision.wait_until is None:
            return Done()
        # Not a failure of the job: it sleeps until the payment's next attempt is due.
        return Retry(decision.note, after=max(decision.wait_until - ledger.now(), timedelta(0)))

    return handle
