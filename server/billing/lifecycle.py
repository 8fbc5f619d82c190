"""The invoice lifecycle's use cases: finalize, void, mark paid or uncollectible, credit notes.

Each runs in one transaction under the tenant's invoice lock, with the invoice row locked:
the transition is checked against server.domain.lifecycle, written, audited (principal,
request id, before and after) and, with a request_id, its response stored, all together.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from server.billing.pricer import InvoicePricer, PricedInvoice
from server.billing.service import Page
from server.domain.access import Caller, Principal
from server.domain.audit import (
    CREDIT_NOTE_CREATED,
    INVOICE_FINALIZED,
    INVOICE_PAID,
    INVOICE_UNCOLLECTIBLE,
    INVOICE_VOIDED,
    AuditEntry,
    invoice_state,
)
from server.domain.currencies import currency_of
from server.domain.decimals import EXACT, check_decimal, format_money
from server.domain.errors import ErrorReason, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from server.domain.events import check_id
from server.domain.lifecycle import BILLED, Issuer, check_transition, document_number, expand_prefix
from server.domain.models import Invoice, InvoiceStatus
from server.domain.names import invoice_name
from server.domain.pagination import ID, MICROS, PageTokens, check_page_size
from server.domain.plans import BillingProfile
from server.domain.requests import Once, Replayed
from server.domain.timeutil import to_datetime, to_micros
from server.payments.collection import Collection
from server.storage import credit_notes
from server.storage.credit_notes import CreditNote, CreditNoteStore
from server.storage.database import run_with_retries
from server.storage.invoices import InvoiceStore, InvoiceTransaction

MAX_REASON_CHARS = 500

_ACTIONS = {
    InvoiceStatus.PAID: INVOICE_PAID,
    InvoiceStatus.VOID: INVOICE_VOIDED,
    InvoiceStatus.UNCOLLECTIBLE: INVOICE_UNCOLLECTIBLE,
}


def customer_party(tenant_id: str, profile: BillingProfile | None) -> dict[str, str]:
    if profile is None:
        return {"name": tenant_id, "email": "", "tenant_id": tenant_id}
    return {"name": profile.display_name, "email": profile.email, "tenant_id": tenant_id}


def invoice_not_found(invoice_id: str) -> NotFound:
    return NotFound(f"invoice {invoice_id[:80]!r} not found", reason=ErrorReason.INVOICE_NOT_FOUND)


class Lifecycle:
    def __init__(
        self,
        invoices: InvoiceStore,
        notes: CreditNoteStore,
        pricer: InvoicePricer,
        issuer: Issuer,
        page_tokens: PageTokens,
        now_micros: Callable[[], int],
        collection: Collection | None = None,
    ) -> None:
        self._invoices = invoices
        self._notes = notes
        self._pricer = pricer
        self.issuer = issuer
        self._page_tokens = page_tokens
        self._now_micros = now_micros
        # Payment records and outbox jobs written with each change (simulation mode by default).
        self._collection = collection or Collection(live=False)

    async def _locked(
        self, tx: InvoiceTransaction, tenant_id: str, invoice_id: str, principal: Principal
    ) -> Invoice:
        """The tenant's invoice, row locked; NOT_FOUND for a missing one or another tenant's."""
        invoice = await tx.lock(invoice_id)
        if invoice is None or invoice.tenant_id != tenant_id or not principal.may_act_for(tenant_id):
            raise invoice_not_found(invoice_id)
        return invoice

    async def finalize_in(
        self, tx: InvoiceTransaction, draft: Invoice, caller: Caller, priced: PricedInvoice | None = None
    ) -> Invoice:
        """Freeze the draft in the caller's transaction: price it now, number it, audit it.

        With `priced`, the draft was just saved with exactly these lines (a period close
        creating it), so they are not written again.
        """
        fresh = priced is not None
        check_transition(invoice_name(draft.tenant_id, draft.id), draft.status, InvoiceStatus.FINALIZED)
        if priced is None:
            priced = await self._pricer.price(tx, draft.tenant_id, draft.period_start, draft.period_end)
        if priced.unpriced:
            raise FailedPrecondition(
                "some usage in the period has no rate in effect", reason=ErrorReason.USAGE_NOT_PRICED
            )
        at = to_datetime(self._now_micros())
        amounts = priced.amounts
        if not fresh:
            await tx.save(
                draft.id,
                draft.tenant_id,
                draft.period_start,
                draft.period_end,
                priced.currency,
                amounts.total,
                amounts.lines,
                draft.kind,
            )
        parties = {
            "issuer": self.issuer.as_party(),
            "customer": customer_party(draft.tenant_id, priced.profile),
        }
        # The number last: from here to the commit, concurrent finalizations wait for this one.
        prefix = expand_prefix(self.issuer.invoice_prefix, at)
        number = document_number(prefix, await tx.next_number(self.issuer.name, prefix))
        invoice = await tx.finalize(draft.id, number, parties, priced.plan_ids, at, amounts.lines)
        payment = await self._collection.invoice_finalized(tx.connection, invoice, at)
        invoice = dataclasses.replace(invoice, payment=payment)
        await tx.append_audit(
            AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=INVOICE_FINALIZED,
                tenant_id=draft.tenant_id,
                resource=f"invoices/{draft.id}",
                before=invoice_state(draft),
                after=invoice_state(invoice),
            )
        )
        return invoice

    async def finalize(
        self, tenant_id: str, invoice_id: str, caller: Caller, once: Once[Invoice] | None = None
    ) -> Invoice | Replayed:
        """FinalizeInvoice: a draft becomes a numbered, frozen invoice."""
        _check_ids(tenant_id, invoice_id)

        async def attempt() -> Invoice | Replayed:
            async with self._invoices.tenant_transaction(tenant_id) as tx:
                if once is not None and (stored := await tx.claim(once.key)) is not None:
                    return Replayed(stored)
                draft = await self._locked(tx, tenant_id, invoice_id, caller.principal)
                invoice = await self.finalize_in(tx, draft, caller)
                if once is not None:
                    await tx.complete(once.key, once.encode(invoice))
                return invoice

        return await run_with_retries(attempt)

    async def move(
        self,
        tenant_id: str,
        invoice_id: str,
        target: InvoiceStatus,
        caller: Caller,
        once: Once[Invoice] | None = None,
    ) -> Invoice | Replayed:
        """VoidInvoice, MarkInvoicePaid, MarkInvoiceUncollectible: one status move, audited."""
        _check_ids(tenant_id, invoice_id)

        async def attempt() -> Invoice | Replayed:
            async with self._invoices.tenant_transaction(tenant_id) as tx:
                if once is not None and (stored := await tx.claim(once.key)) is not None:
                    return Replayed(stored)
                before = await self._locked(tx, tenant_id, invoice_id, caller.principal)
                invoice = await self.move_in(tx, before, target, caller)
                if once is not None:
                    await tx.complete(once.key, once.encode(invoice))
                return invoice

        return await run_with_retries(attempt)

    async def move_in(
        self,
        tx: InvoiceTransaction,
        before: Invoice,
        target: InvoiceStatus,
        caller: Caller,
        *,
        mirror: bool = True,
    ) -> Invoice:
        """One status move of an invoice locked in the caller's transaction, audited with it.

        Payments (server.payments) move invoices this way when Stripe reports a payment, with
        `mirror` False: what Stripe reported needs no mirroring back to Stripe (a void).
        """
        check_transition(invoice_name(before.tenant_id, before.id), before.status, target)
        at = to_datetime(self._now_micros())
        await tx.set_status(before.id, target, at)
        if mirror and target is InvoiceStatus.VOID and before.status is not InvoiceStatus.DRAFT:
            await self._collection.invoice_voided(tx.connection, before.id, at)
        invoice = await tx.load(before.id)
        await tx.append_audit(
            AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=_ACTIONS[target],
                tenant_id=before.tenant_id,
                resource=f"invoices/{before.id}",
                before={"status": before.status.value, "number": before.number},
                after={"status": invoice.status.value, "number": invoice.number},
            )
        )
        return invoice

    async def create_credit_note(
        self,
        tenant_id: str,
        invoice_id: str,
        amount: str,
        reason: str,
        caller: Caller,
        once: Once[CreditNote] | None = None,
    ) -> CreditNote | Replayed:
        """CreateCreditNote: credit part or all of a billed invoice; never more than its total."""
        _check_ids(tenant_id, invoice_id, field="invoice")
        violations = []
        if problem := check_decimal(amount, max_integer_digits=18, max_fraction_digits=3):
            violations.append(("amount", problem))
        elif Decimal(amount) <= 0:
            violations.append(("amount", "must be greater than 0"))
        if not reason.strip() or len(reason) > MAX_REASON_CHARS:
            violations.append(("reason", f"is required, at most {MAX_REASON_CHARS} characters"))
        if violations:
            raise InvalidArgument([FieldViolation(f, d) for f, d in violations])

        async def attempt() -> CreditNote | Replayed:
            async with self._invoices.tenant_transaction(tenant_id) as tx:
                if once is not None and (stored := await tx.claim(once.key)) is not None:
                    return Replayed(stored)
                invoice = await self._locked(tx, tenant_id, invoice_id, caller.principal)
                name = invoice_name(tenant_id, invoice_id)
                if invoice.status not in BILLED:
                    raise FailedPrecondition(
                        f"only a finalized, paid or uncollectible invoice can be credited; it is "
                        f"{invoice.status.value}",
                        reason=ErrorReason.INVOICE_STATUS_INVALID,
                        metadata={"invoice": name, "status": invoice.status.value},
                    )
                currency = currency_of(invoice.currency)
                value = Decimal(amount)
                if value.as_tuple().exponent < -currency.minor_units:  # type: ignore[operator]
                    raise InvalidArgument.single(
                        "amount", f"must have at most {currency.minor_units} digits after the point"
                    )
                creditable = EXACT.subtract(
                    invoice.total, await credit_notes.credited(tx.connection, invoice_id)
                )
                if value > creditable:
                    shown = format_money(max(creditable, Decimal(0)), currency.minor_units)
                    raise FailedPrecondition(
                        f"the invoice's credit notes would exceed its total: at most {shown} may be credited",
                        reason=ErrorReason.CREDIT_EXCEEDS_INVOICE,
                        metadata={"invoice": name, "creditable": shown},
                    )
                at = to_datetime(self._now_micros())
                prefix = expand_prefix(self.issuer.credit_note_prefix, at)
                number = document_number(prefix, await tx.next_number(self.issuer.name, prefix))
                parties: Mapping[str, Any] = {
                    "issuer": self.issuer.as_party(),
                    "customer": (invoice.parties or {}).get("customer", customer_party(tenant_id, None)),
                }
                note = await credit_notes.insert(
                    tx.connection,
                    CreditNote(
                        f"cn_{uuid.uuid4().hex}",
                        tenant_id,
                        invoice_id,
                        number,
                        invoice.currency,
                        value,
                        reason,
                        parties,
                        at,
                    ),
                )
                await self._collection.credit_note_created(tx.connection, note.id, invoice_id, at)
                await tx.append_audit(
                    AuditEntry(
                        principal=caller.principal.subject,
                        request_id=caller.request_id,
                        action=CREDIT_NOTE_CREATED,
                        tenant_id=tenant_id,
                        resource=f"creditNotes/{note.id}",
                        before=None,
                        after={
                            "invoice": name,
                            "number": number,
                            "amount": format_money(value, currency.minor_units),
                            "currency_code": invoice.currency,
                            "reason": reason,
                        },
                    )
                )
                if once is not None:
                    await tx.complete(once.key, once.encode(note))
                return note

        return await run_with_retries(attempt)

    async def list_credit_notes(
        self, tenant_id: str, page_size: int, page_token: str, principal: Principal
    ) -> Page[CreditNote]:
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("parent", problem)
        principal.require_tenant(tenant_id)
        limit = check_page_size(page_size, default=50, maximum=500)
        filter_key = f"credit_notes:{tenant_id}"
        last = self._page_tokens.decode(page_token, filter_key, (MICROS, ID))
        after = (to_datetime(last[0]), last[1]) if last else None
        notes = await self._notes.list_for_tenant(tenant_id, after, limit + 1)
        next_token = ""
        if len(notes) > limit:
            notes = notes[:limit]
            next_token = self._page_tokens.encode(
                filter_key, [to_micros(notes[-1].create_time), notes[-1].id]
            )
        return Page(notes, next_token)


def _check_ids(tenant_id: str, invoice_id: str, *, field: str = "name") -> None:
    if problem := check_id(tenant_id) or check_id(invoice_id):
        raise InvalidArgument.single(field, problem)
