"""Finalized invoices, voids and credit notes pushed to Stripe through the outbox (docs/stripe.md).

Tally computes the invoice; Stripe only collects it. A `stripe.invoice` job (written by the
finalizing transaction, server.payments.collection) runs these steps, one per outbox call, each
storing what Stripe returned before the job moves on, in the same transaction:

  ""        the tenant's Stripe customer: the one stored on its billing profile, else created (once:
            its idempotency key is the tenant's) and stored there;
  invoice   a draft Stripe invoice, auto_advance off (Tally drives it), metadata tally_invoice_id;
            its id is stored in invoice_payments;
  items     one invoice item per Tally line (grouped beyond 250, server.payments.stripe_items),
            ITEMS_PER_STEP per call;
  finalize  Stripe's total compared with Tally's (a difference stops the job: a person looks), then
            finalized: payment state open;
  collect   charged (collection "charge_automatically") or sent (send_invoice); a charge that
            succeeds marks the payment and the Tally invoice paid, a card decline (402) marks the
            payment failed, once: retries are the dunning schedule's, not this loop's.

Every request carries an idempotency key made of Tally's ids and the step ("tally-<invoice>-item-3"),
and its parameters come from the frozen invoice only, so a step repeated after a crash (the request ran
at Stripe, the commit here did not) gets Stripe's stored answer instead of a second object. Stripe
keeps keys for at least 24 hours; a job stays within that unless Tally is down longer.

Errors: the SDK retries connection errors, 409 and 5xx itself (max_network_retries); what is left
is retried by the outbox with backoff. A 429 is never retried by the SDK: the job is retried after
RATE_LIMITED's delay, and a pacer keeps this process under Stripe's rate (25 requests/s with a test
key, 100 live). A refused API key (401/403) halts every stripe.* kind in this process and turns the
`tally.v1.Payments` health service NOT_SERVING until a restart with a working key. Other refusals
(400, 404, an idempotency key reused with other parameters) stop the job, with Stripe's message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg
import stripe

from server.domain.access import ALL_TENANTS, Principal
from server.domain.models import Invoice, InvoicePayment, InvoiceStatus, PaymentState
from server.domain.timeutil import to_datetime
from server.payments.kinds import STRIPE_CREDIT_NOTE, STRIPE_INVOICE, STRIPE_KINDS, STRIPE_VOID
from server.payments.ledger import AttemptOutcome
from server.payments.outbox import Advance, Backoff, Done, Halt, JobHandler, Outcome, Retry, Stop
from server.payments.states import Payment
from server.payments.stores import PaymentTransaction
from server.payments.stripe_items import minor_units, stripe_items
from server.storage import credit_notes, payments
from server.storage import outbox as jobs
from server.storage.invoices import InvoiceTransaction
from server.storage.outbox import Job

T = TypeVar("T")


# The principal named in the audit trail for what Stripe's answers change in Tally.
STRIPE_PRINCIPAL = "tally-stripe"
_STRIPE = Principal(subject=STRIPE_PRINCIPAL, tenants=ALL_TENANTS, scopes=frozenset())


class AttemptRecorder(Protocol):
    """Where a declined first charge goes (server.payments.ledger.PaymentLedger): it starts dunning."""

    async def record_attempt(
        self,
        tx: PaymentTransaction,
        invoice_id: str,
        attempt: int,
        outcome: AttemptOutcome,
        principal: Principal = ...,
    ) -> Payment | None:
        """Apply attempt number `attempt`'s outcome in the caller's transaction."""


CUSTOMER, INVOICE, ITEMS, FINALIZE, COLLECT = "", "invoice", "items", "finalize", "collect"
ITEMS_PER_STEP = 50  # items created per outbox call: bounds one call's time (at 25 requests/s, 2 s)

# A 429: try again soon, then less often (Stripe's advice: exponential backoff).
RATE_LIMITED = Backoff(first=timedelta(seconds=1), factor=2.0, cap=timedelta(minutes=1))
# A void or credit note waits for its invoice's push to finish (or stop) before it is mirrored.
WAIT_FOR_PUSH = timedelta(seconds=30)

COLLECTION_METHODS = ("charge_automatically", "send_invoice")


@dataclass(frozen=True, slots=True)
class StripeSettings:
    """How Stripe collects: charge the customer's default payment method, or email the invoice."""

    collection_method: str = "charge_automatically"
    days_until_due: int = 30  # send_invoice only

    def __post_init__(self) -> None:
        if self.collection_method not in COLLECTION_METHODS:
            raise ValueError(f"collection method must be one of {', '.join(COLLECTION_METHODS)}")


def requests_per_second(api_key: str) -> float:
    """Stripe's documented rate for the key's mode: 25 requests/s in test mode, 100 live."""
    return 25.0 if "_test_" in api_key else 100.0


class RequestPacer:
    """Spaces this process's Stripe requests to at most `per_second` (a token bucket of one second).

    Bursts of up to one second's worth pass at once; beyond that each request waits its turn.
    `monotonic` and `sleep` are injected so that a test can run it on a fake clock.
    """

    def __init__(
        self,
        per_second: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._rate = per_second
        self._monotonic = monotonic
        self._sleep = sleep
        self._tokens = per_second
        self._last = monotonic()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Wait for the next request's turn under the rate."""
        async with self._lock:  # one waiter at a time: turns are taken in order
            now = self._monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                await self._sleep((1 - self._tokens) / self._rate)
                self._tokens = 1.0
                self._last = self._monotonic()
            self._tokens -= 1


def _key(*parts: str) -> dict[str, Any]:
    """Request options with the idempotency key made of Tally's ids and the step."""
    return {"idempotency_key": "tally-" + "-".join(parts)}


def _stripe_message(exc: stripe.StripeError) -> str:
    return exc.user_message or str(exc) or type(exc).__name__


class StripePush:
    """The handlers of the stripe.* outbox kinds; see the module docstring."""

    def __init__(
        self,
        client: stripe.StripeClient,
        now_micros: Callable[[], int],
        *,
        settings: StripeSettings = StripeSettings(),
        pacer: RequestPacer | None = None,
        on_auth_failure: Callable[[str], Awaitable[None]] | None = None,
        attempts: AttemptRecorder,
    ) -> None:
        self._client = client
        self._attempts = attempts
        self._now_micros = now_micros
        self._settings = settings
        self._pacer = pacer
        self._on_auth_failure = on_auth_failure

    def handlers(self) -> dict[str, JobHandler]:
        """The outbox handlers of the push's job kinds."""
        return {
            STRIPE_INVOICE: self.push_invoice,
            STRIPE_VOID: self.push_void,
            STRIPE_CREDIT_NOTE: self.push_credit_note,
        }

    def _now(self) -> datetime:
        return to_datetime(self._now_micros())

    async def _call(self, request: Callable[[], Awaitable[T]]) -> T:
        if self._pacer is not None:
            await self._pacer.wait()
        return await request()

    async def _guarded(self, job: Job, step: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Run a step; Stripe's errors become the outbox outcomes the module docstring lists."""
        try:
            return await step()
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            reason = f"Stripe refused the API key ({exc.http_status}): {_stripe_message(exc)}"
            if self._on_auth_failure is not None:
                await self._on_auth_failure(reason)
            return Halt(reason, STRIPE_KINDS)
        except stripe.RateLimitError:
            return Retry("Stripe's rate limit (429)", after=RATE_LIMITED.delay(job.attempts + 1))
        except stripe.IdempotencyError as exc:
            return Stop(f"Stripe refused a repeated request with other parameters: {_stripe_message(exc)}")
        except (stripe.InvalidRequestError, stripe.CardError) as exc:
            return Stop(f"Stripe refused the request ({exc.http_status}, {exc.code}): {_stripe_message(exc)}")
        except (stripe.APIConnectionError, stripe.APIError) as exc:
            return Retry(f"Stripe unavailable: {_stripe_message(exc)}")

    # -- stripe.invoice --

    async def push_invoice(self, conn: asyncpg.Connection, job: Job) -> Outcome:
        """One step of a `stripe.invoice` job (see the module docstring)."""
        invoice = await InvoiceTransaction(conn).find(job.subject)
        if invoice is None:
            return Stop(f"invoice {job.subject} does not exist")
        payment = invoice.payment
        if payment is None:
            return Stop(f"invoice {job.subject} has no payment record (it was never finalized)")
        if invoice.status is InvoiceStatus.VOID:
            return await self._guarded(job, lambda: self._withdraw(conn, invoice, payment))
        steps: dict[str, Callable[[], Awaitable[Outcome]]] = {
            CUSTOMER: lambda: self._customer(conn, invoice, job),
            INVOICE: lambda: self._create_invoice(conn, invoice, job),
            ITEMS: lambda: self._items(invoice, payment, job),
            FINALIZE: lambda: self._finalize(conn, invoice, payment),
            COLLECT: lambda: self._collect(conn, invoice, payment, job),
        }
        step = steps.get(job.step)
        if step is None:
            return Stop(f"unknown step {job.step!r}")
        return await self._guarded(job, step)

    async def _customer(self, conn: asyncpg.Connection, invoice: Invoice, job: Job) -> Outcome:
        tenant = invoice.tenant_id
        customer_id = await payments.stripe_customer(conn, tenant)
        if customer_id is None:
            party = (invoice.parties or {}).get("customer") or {}
            params: dict[str, Any] = {
                "name": party.get("name") or tenant,
                "metadata": {"tally_tenant_id": tenant},
            }
            if party.get("email"):
                params["email"] = party["email"]
            customer = await self._call(
                lambda: self._client.v1.customers.create_async(
                    params=params,  # type: ignore[arg-type]
                    options=_key("customer", tenant),  # type: ignore[arg-type]
                )
            )
            customer_id = customer.id
            # A tenant without a billing profile has nowhere to keep it: its next invoice finds the
            # same customer through the same idempotency key (for as long as Stripe keeps it).
            await payments.set_stripe_customer(conn, tenant, customer_id)
        # The collection settings are fixed for the job here, so every retry sends the same parameters.
        return Advance(
            INVOICE,
            {
                **job.payload,
                "customer": customer_id,
                "collection_method": self._settings.collection_method,
                "days_until_due": self._settings.days_until_due,
            },
        )

    async def _create_invoice(self, conn: asyncpg.Connection, invoice: Invoice, job: Job) -> Outcome:
        collection = job.payload["collection_method"]
        params: dict[str, Any] = {
            "customer": job.payload["customer"],
            "auto_advance": False,
            "collection_method": collection,
            "currency": invoice.currency.lower(),
            "description": f"Tally invoice {invoice.number}",
            "pending_invoice_items_behavior": "exclude",
            "metadata": {
                "tally_invoice_id": invoice.id,
                "tally_invoice_number": invoice.number,
                "tally_tenant_id": invoice.tenant_id,
            },
        }
        if collection == "send_invoice":
            params["days_until_due"] = job.payload["days_until_due"]
        created = await self._call(
            lambda: self._client.v1.invoices.create_async(
                params=params,  # type: ignore[arg-type]
                options=_key(invoice.id, "create"),  # type: ignore[arg-type]
            )
        )
        assert created.id is not None
        await payments.set_stripe_invoice(conn, invoice.id, created.id, self._now())
        return Advance(ITEMS, {**job.payload, "items_done": 0})

    async def _items(self, invoice: Invoice, payment: InvoicePayment, job: Job) -> Outcome:
        stripe_id = payment.stripe_invoice_id
        assert stripe_id is not None
        items = stripe_items(invoice)
        done = int(job.payload.get("items_done", 0))
        batch_end = min(done + ITEMS_PER_STEP, len(items))
        for number in range(done, batch_end):
            item = items[number]
            params: dict[str, Any] = {
                "customer": job.payload["customer"],
                "invoice": stripe_id,
                "amount": item.amount,
                "currency": invoice.currency.lower(),
                "description": item.description,
                "metadata": {"tally_invoice_id": invoice.id, "tally_item": str(number)},
            }
            if item.period_start is not None and item.period_end is not None:
                params["period"] = {
                    "start": int(item.period_start.timestamp()),
                    "end": int(item.period_end.timestamp()),
                }
            await self._call(
                lambda: self._client.v1.invoice_items.create_async(
                    params=params,  # type: ignore[arg-type]  # noqa: B023 (awaited at once)
                    options=_key(invoice.id, "item", str(number)),  # type: ignore[arg-type]  # noqa: B023
                )
            )
        if batch_end < len(items):
            return Advance(ITEMS, {**job.payload, "items_done": batch_end})
        return Advance(FINALIZE)

    async def _finalize(self, conn: asyncpg.Connection, invoice: Invoice, payment: InvoicePayment) -> Outcome:
        stripe_id = payment.stripe_invoice_id
        assert stripe_id is not None
        remote = await self._call(lambda: self._client.v1.invoices.retrieve_async(stripe_id))
        expected = minor_units(invoice.total, invoice.currency)
        if remote.total != expected:
            reason = (
                f"Stripe's total of {stripe_id} is {remote.total} minor units of {invoice.currency}, "
                f"Tally's is {expected}: not finalized at Stripe"
            )
            await payments.note_failure(conn, invoice.id, reason, self._now())
            return Stop(reason)
        if remote.status == "draft":
            remote = await self._call(
                lambda: self._client.v1.invoices.finalize_invoice_async(
                    stripe_id,
                    params={"auto_advance": False},
                    options=_key(invoice.id, "finalize"),  # type: ignore[arg-type]
                )
            )
        if remote.status == "paid":  # Stripe settles an invoice with nothing to pay at once
            await self._paid(conn, invoice, stripe_id)
            return Done()
        await payments.set_state(conn, invoice.id, PaymentState.OPEN, self._now())
        return Advance(COLLECT)

    async def _collect(
        self, conn: asyncpg.Connection, invoice: Invoice, payment: InvoicePayment, job: Job
    ) -> Outcome:
        stripe_id = payment.stripe_invoice_id
        assert stripe_id is not None
        if job.payload.get("collection_method") == "send_invoice":
            await self._call(
                lambda: self._client.v1.invoices.send_invoice_async(
                    stripe_id,
                    options=_key(invoice.id, "send"),  # type: ignore[arg-type]
                )
            )
            return Done()
        try:
            paid = await self._call(
                lambda: self._client.v1.invoices.pay_async(
                    stripe_id,
                    options=_key(invoice.id, "pay"),  # type: ignore[arg-type]
                )
            )
        except stripe.CardError as exc:
            # Declined: recorded once, never retried here (dunning retries on its own schedule).
            remote = await self._call(lambda: self._client.v1.invoices.retrieve_async(stripe_id))
            # The first failure starts dunning here, even where no webhook will report it.
            outcome = AttemptOutcome(
                action_required=exc.code == "authentication_required", failure=_stripe_message(exc)
            )
            await self._attempts.record_attempt(
                InvoiceTransaction(conn), invoice.id, remote.attempt_count or 1, outcome, _STRIPE
            )
            return Done()
        except stripe.InvalidRequestError as exc:
            if exc.code == "invoice_already_paid":
                await self._paid(conn, invoice, stripe_id)
                return Done()
            if exc.code == "invoice_payment_intent_requires_action":
                outcome = AttemptOutcome(action_required=True, failure=_stripe_message(exc))
                attempt = 0  # one more than known
                await self._attempts.record_attempt(
                    InvoiceTransaction(conn), invoice.id, attempt, outcome, _STRIPE
                )
                return Done()
            raise
        if paid.status == "paid":
            await self._paid(conn, invoice, stripe_id, attempt_count=paid.attempt_count)
        return Done()

    async def _paid(
        self, conn: asyncpg.Connection, invoice: Invoice, stripe_id: str, *, attempt_count: int | None = None
    ) -> None:
        """Stripe says it is paid: applied as a paid webhook is (the invoice moved, audited, published).

        Through the ledger, like every other payment outcome; Stripe's attempt count is kept.
        """
        await self._attempts.record_attempt(
            InvoiceTransaction(conn), invoice.id, 0, AttemptOutcome(paid=True), _STRIPE
        )
        if attempt_count is not None:
            await payments.note_paid_attempts(conn, invoice.id, attempt_count)

    async def _withdraw(self, conn: asyncpg.Connection, invoice: Invoice, payment: InvoicePayment) -> Outcome:
        """The Tally invoice was voided while its push was under way: a Stripe draft is deleted.

        An invoice already open at Stripe is left to the stripe.void job, which waits for this one.
        """
        stripe_id = payment.stripe_invoice_id
        if stripe_id is not None:
            remote = await self._call(lambda: self._client.v1.invoices.retrieve_async(stripe_id))
            if remote.status != "draft":
                return Done()
            await self._call(lambda: self._client.v1.invoices.delete_async(stripe_id))
        await payments.set_state(conn, invoice.id, PaymentState.VOID, self._now())
        return Done()

    # -- stripe.void --

    async def _push_finished(self, conn: asyncpg.Connection, invoice_id: str) -> bool:
        push = await jobs.get(conn, STRIPE_INVOICE, invoice_id)
        return push is None or push.state != "pending"

    async def push_void(self, conn: asyncpg.Connection, job: Job) -> Outcome:
        """A Tally void mirrored: the Stripe invoice voided, once its push has finished."""
        invoice_id = job.subject
        payment = await payments.get(conn, invoice_id)
        if payment is None or payment.state in (PaymentState.SIMULATED, PaymentState.VOID):
            return Done()
        if not await self._push_finished(conn, invoice_id):
            return Retry("waiting for the invoice's push to Stripe to finish", after=WAIT_FOR_PUSH)
        stripe_id = payment.stripe_invoice_id

        async def void() -> Outcome:
            if stripe_id is not None:
                remote = await self._call(lambda: self._client.v1.invoices.retrieve_async(stripe_id))
                if remote.status == "paid":
                    return Stop(
                        f"Stripe invoice {stripe_id} was paid before the void reached it: refund it in Stripe"
                    )
                if remote.status == "draft":
                    await self._call(lambda: self._client.v1.invoices.delete_async(stripe_id))
                elif remote.status in ("open", "uncollectible"):
                    await self._call(
                        lambda: self._client.v1.invoices.void_invoice_async(
                            stripe_id,
                            options=_key(invoice_id, "void"),  # type: ignore[arg-type]
                        )
                    )
            await payments.set_state(conn, invoice_id, PaymentState.VOID, self._now())
            return Done()

        return await self._guarded(job, void)

    # -- stripe.credit_note --

    async def push_credit_note(self, conn: asyncpg.Connection, job: Job) -> Outcome:
        """A Tally credit note mirrored as a Stripe credit note on the pushed invoice."""
        note = await credit_notes.get(conn, job.subject)
        if note is None:
            return Stop(f"credit note {job.subject} does not exist")
        payment = await payments.get(conn, note.invoice_id)
        if payment is None or payment.state is PaymentState.SIMULATED:
            return Done()
        if not await self._push_finished(conn, note.invoice_id):
            return Retry("waiting for the invoice's push to Stripe to finish", after=WAIT_FOR_PUSH)
        stripe_id = payment.stripe_invoice_id
        if stripe_id is None or payment.state is PaymentState.PENDING:
            return Stop(f"invoice {note.invoice_id} is not open at Stripe: the credit note cannot follow it")
        params: dict[str, Any] = {
            "invoice": stripe_id,
            "amount": minor_units(note.amount, note.currency),
            "memo": note.reason[:500],
            "metadata": {"tally_credit_note_id": note.id, "tally_credit_note_number": note.number},
        }

        async def create() -> Outcome:
            await self._call(
                lambda: self._client.v1.credit_notes.create_async(
                    params=params,  # type: ignore[arg-type]
                    options=_key(note.id, "credit-note"),  # type: ignore[arg-type]
                )
            )
            return Done()

        return await self._guarded(job, create)
