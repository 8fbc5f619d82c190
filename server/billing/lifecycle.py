"""The invoice lifecycle's use cases: finalize, void, mark paid or uncollectible, credit notes.

Each runs in one transaction under the tenant's invoice lock, with the invoice row locked:
the transition is checked against server.domain.lifecycle, written, audited (principal,
request id, before and after) and, with a request_id, its response stored, all together.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from server.billing.pricer import InvoicePricer, PricedInvoice
from server.billing.service import Page
from server.domain.access import Caller, Principal
from server.domain.audit import AuditAction, AuditEntry, State, invoice_state
from server.domain.currencies import currency_of
from server.domain.decimals import EXACT, check_decimal, format_money
from server.domain.errors import ErrorReason, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from server.domain.events import check_id
from server.domain.lifecycle import BILLED, Issuer, check_transition, document_number, expand_prefix
from server.domain.models import CreditNote, Invoice, InvoiceStatus
from server.domain.names import invoice_name
from server.domain.pagination import ID, MICROS, PageTokens, check_page_size
from server.domain.plans import BillingProfile
from server.domain.requests import Once, Replayed
from server.domain.stores import BillingTransaction, CreditNoteBook, Transactions
from server.domain.timeutil import to_datetime, to_micros
from server.domain.webhooks import (
    INVOICE_FINALIZED,
    INVOICE_PAID,
    INVOICE_UNCOLLECTIBLE,
    invoice_data,
    rfc3339,
)
from server.payments.collection import Collection

MAX_REASON_CHARS = 500

_ACTIONS = {
    InvoiceStatus.PAID: AuditAction.INVOICE_PAID,
    InvoiceStatus.VOID: AuditAction.INVOICE_VOIDED,
    InvoiceStatus.UNCOLLECTIBLE: AuditAction.INVOICE_UNCOLLECTIBLE,
}
# The moves that subscribers hear of, by hand or through Stripe (a void is not an event).
_EVENTS = {
    InvoiceStatus.PAID: INVOICE_PAID,
    InvoiceStatus.UNCOLLECTIBLE: INVOICE_UNCOLLECTIBLE,
}


def customer_party(tenant_id: str, profile: BillingProfile | None) -> dict[str, str]:
    """The `customer` party printed on an invoice: the profile's name and e-mail, else the tenant id."""
    if profile is None:
        return {"name": tenant_id, "email": "", "tenant_id": tenant_id}
    return {"name": profile.display_name, "email": profile.email, "tenant_id": tenant_id}


def invoice_not_found(invoice_id: str) -> NotFound:
    """NotFound (INVOICE_NOT_FOUND); the same for a missing invoice and another tenant's."""
    return NotFound(f"invoice {invoice_id[:80]!r} not found", reason=ErrorReason.INVOICE_NOT_FOUND)


class Lifecycle:
    """The use cases that move an invoice along its lifecycle, and credit notes (see the module docstring).

    Numbers come from `issuer`'s gap-free sequences; `now_micros` is the clock of the
    status times.
    """

    def __init__(
        self,
        invoices: Transactions[BillingTransaction],
        notes: CreditNoteBook,
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
        self, tx: BillingTransaction, tenant_id: str, invoice_id: str, principal: Principal
    ) -> Invoice:
        """The tenant's invoice, row locked; NOT_FOUND for a missing one or another tenant's."""
        invoice = await tx.lock(invoice_id)
        if invoice is None or invoice.tenant_id != tenant_id or not principal.may_act_for(tenant_id):
            raise invoice_not_found(invoice_id)
        return invoice

    async def finalize_in(
        self, tx: BillingTransaction, draft: Invoice, caller: Caller, priced: PricedInvoice | None = None
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
        payment = await self._collection.invoice_finalized(tx, invoice, at)
        invoice = dataclasses.replace(invoice, payment=payment)
        await tx.append_audit(
            AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=AuditAction.INVOICE_FINALIZED,
                tenant_id=draft.tenant_id,
                resource=f"invoices/{draft.id}",
                before=invoice_state(draft),
                after=invoice_state(invoice),
            )
        )
        finalized = invoice_data(invoice, finalize_time=rfc3339(at))
        await tx.publish(INVOICE_FINALIZED, finalized, time=at)
        return invoice

    async def finalize_block_in(
        self,
        tx: BillingTransaction,
        drafts: Sequence[tuple[Invoice, PricedInvoice]],
        caller: Caller,
        states: Sequence[State] | None = None,
    ) -> list[Invoice]:
        """finalize_in for a block of drafts a period close just saved, in a few statements.

        Keep it in step with finalize_in: whatever finalizing one invoice does, this does for
        each of the block. The block takes its numbers from the sequence in one statement,
        in the order of `drafts`, last: from there to the commit, concurrent finalizations
        wait for the block, and a rollback gives every number back, so none is skipped.
        `states` are the drafts' invoice_state if the caller has them already.
        """
        if not drafts:
            return []
        for draft, priced in drafts:
            check_transition(invoice_name(draft.tenant_id, draft.id), draft.status, InvoiceStatus.FINALIZED)
            if priced.unpriced:
                raise FailedPrecondition(
                    "some usage in the period has no rate in effect", reason=ErrorReason.USAGE_NOT_PRICED
                )
        at = to_datetime(self._now_micros())
        issuer = self.issuer.as_party()
        prefix = expand_prefix(self.issuer.invoice_prefix, at)
        first = await tx.take_numbers(self.issuer.name, prefix, len(drafts))
        invoices = [
            dataclasses.replace(
                draft,
                status=InvoiceStatus.FINALIZED,
                number=document_number(prefix, first + index),
                finalize_time=at,
                updated_at=at,
                computed_at=at,
                parties={"issuer": issuer, "customer": customer_party(draft.tenant_id, priced.profile)},
                plan_ids=priced.plan_ids,
            )
            for index, (draft, priced) in enumerate(drafts)
        ]
        await tx.finalize_many(
            [(invoice.id, invoice.number, invoice.parties or {}) for invoice in invoices], at, issuer["name"]
        )
        await tx.append_audit_many(
            [
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=AuditAction.INVOICE_FINALIZED,
                    tenant_id=invoice.tenant_id,
                    resource=f"invoices/{invoice.id}",
                    before=before,
                    after=invoice_state(invoice),
                )
                for before, invoice in zip(
                    states if states is not None else [invoice_state(d) for d, _ in drafts],
                    invoices,
                    strict=True,
                )
            ]
        )
        payment = await self._collection.invoices_finalized(tx, invoices, at)
        invoices = [dataclasses.replace(invoice, payment=payment) for invoice in invoices]
        finalized = [invoice_data(invoice, finalize_time=rfc3339(at)) for invoice in invoices]
        await tx.publish_many(INVOICE_FINALIZED, finalized, time=at)
        return invoices

    async def finalize(
        self, tenant_id: str, invoice_id: str, caller: Caller, once: Once[Invoice] | None = None
    ) -> Invoice | Replayed:
        """FinalizeInvoice: a draft becomes a numbered, frozen invoice."""
        _check_ids(tenant_id, invoice_id)

        async def work(tx: BillingTransaction) -> Invoice | Replayed:
            if once is not None and (stored := await tx.claim(once.key)) is not None:
                return Replayed(stored)
            draft = await self._locked(tx, tenant_id, invoice_id, caller.principal)
            invoice = await self.finalize_in(tx, draft, caller)
            if once is not None:
                await tx.complete(once.key, once.encode(invoice))
            return invoice

        return await self._invoices.run_in_tenant_transaction(tenant_id, work)

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

        async def work(tx: BillingTransaction) -> Invoice | Replayed:
            if once is not None and (stored := await tx.claim(once.key)) is not None:
                return Replayed(stored)
            before = await self._locked(tx, tenant_id, invoice_id, caller.principal)
            invoice = await self.move_in(tx, before, target, caller)
            if once is not None:
                await tx.complete(once.key, once.encode(invoice))
            return invoice

        return await self._invoices.run_in_tenant_transaction(tenant_id, work)

    async def move_in(
        self,
        tx: BillingTransaction,
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
            await self._collection.invoice_voided(tx, before.id, at)
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
        event_type = _EVENTS.get(target)
        if event_type is not None:
            data = invoice_data(invoice, status_time=rfc3339(at))
            await tx.publish(event_type, data, time=at)
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

        async def work(tx: BillingTransaction) -> CreditNote | Replayed:
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
            creditable = EXACT.subtract(invoice.total, await tx.credited(invoice_id))
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
            note = await tx.insert_credit_note(
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
            await self._collection.credit_note_created(tx, note.id, invoice_id, at)
            await tx.append_audit(
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=AuditAction.CREDIT_NOTE_CREATED,
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

        return await self._invoices.run_in_tenant_transaction(tenant_id, work)

    async def list_credit_notes(
        self, tenant_id: str, page_size: int, page_token: str, principal: Principal
    ) -> Page[CreditNote]:
        """A tenant's credit notes, oldest first, one page; PermissionDenied for a tenant not covered."""
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
