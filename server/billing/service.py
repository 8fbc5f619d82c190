"""The rate card, invoice generation and reading, and the audit trail: use cases of BillingService."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Generic, TypeVar

from server.billing.pricer import InvoicePricer
from server.domain.access import Caller, Principal
from server.domain.audit import AuditAction, AuditEntry, AuditEvent, invoice_state, rate_resource, rate_state
from server.domain.decimals import MINOR_UNITS
from server.domain.errors import ErrorReason, FailedPrecondition, InvalidArgument, NotFound
from server.domain.events import check_id
from server.domain.inputs import RateChange
from server.domain.models import Invoice, InvoiceStatus, Rate
from server.domain.names import invoice_name
from server.domain.pagination import BIGINT_ID, ID, MICROS, NAME, PageTokens, check_page_size
from server.domain.ranges import check_range
from server.domain.requests import Once, Replayed
from server.domain.stores import AuditReader, BillingTransaction, InvoiceBook, RateBook
from server.domain.timeutil import EPOCH, next_hour, to_datetime, to_micros
from server.ratecard import RateCardCache

MAX_INVOICE_DAYS = 366


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing: its items, and the token of the next page ("" after the last)."""

    items: list[T]
    next_page_token: str


class Billing:
    """The rate card, invoice generation and reading, and the audit trail.

    Rates are stored in `rates` (and noted in `rate_card`, which ingestion reads), invoices in
    `invoices`; `currency` is the rate card's, used for tenants without a billing profile.
    """

    def __init__(
        self,
        rates: RateBook,
        invoices: InvoiceBook,
        audit: AuditReader,
        rate_card: RateCardCache,
        page_tokens: PageTokens,
        now_micros: Callable[[], int],
        currency: str = "USD",
    ) -> None:
        self._pricer = InvoicePricer(currency)
        self._rates = rates
        self._page_tokens = page_tokens
        self._invoices = invoices
        self._audit = audit
        self._rate_card = rate_card
        self._now_micros = now_micros
        self.currency = currency
        self.minor_digits = MINOR_UNITS[currency]

    # --- rate card -----------------------------------------------------------------

    async def list_rates(
        self, as_of_micros: int | None, show_history: bool, page_size: int, page_token: str
    ) -> Page[Rate]:
        """The rates in effect at `as_of_micros` (None: now), or every rate ever set; one page.

        A listing "as of now" keeps the instant of its first page on every later page.
        """
        limit = check_page_size(page_size, default=100, maximum=1_000)
        if show_history:
            filter_key = "history"
            last = self._page_tokens.decode(page_token, filter_key, (NAME, NAME, MICROS))
            # ("", "", epoch) sorts before every stored rate: service names are never empty.
            after = (last[0], last[1], to_datetime(last[2])) if last else ("", "", EPOCH)
            rates = await self._rates.history(after, limit + 1)
        else:
            # A listing "as of now" keeps the instant of its first page on every later page.
            filter_key = f"in_effect:{'now' if as_of_micros is None else as_of_micros}"
            last = self._page_tokens.decode(page_token, filter_key, (MICROS, NAME, NAME))
            at = last[0] if last else self._now_micros() if as_of_micros is None else as_of_micros
            rates = await self._rates.in_effect(
                to_datetime(at), (last[1], last[2]) if last else ("", ""), limit + 1
            )
        next_token = ""
        if len(rates) > limit:
            rates = rates[:limit]
            tail = rates[-1]
            key = (
                [tail.service, tail.usage_type, to_micros(tail.effective_from)]
                if show_history
                else [at, tail.service, tail.usage_type]
            )
            next_token = self._page_tokens.encode(filter_key, key)
        return Page(rates, next_token)

    async def set_rate(
        self, change: RateChange, caller: Caller, once: Once[Rate] | None = None
    ) -> Rate | Replayed:
        """Set a rate; the rate card is shared by every tenant, so only an all-tenants principal may.

        With `once`, a retry of the same request is answered with the first call's response.
        An effective time before now re-prices usage already reported (and what draft
        invoices show), so it is refused unless the change says reprice_past_usage;
        then the audit entry records that it did.
        """
        caller.principal.require_all_tenants("changing the rate card")
        now = self._now_micros()
        change.validate(currency=self.currency, now_micros=now)
        repricing = change.reprices_past_usage(now)

        def audit_entry(before: Rate | None, after: Rate) -> AuditEntry:
            return AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=AuditAction.RATE_SET,
                tenant_id="",
                resource=rate_resource(after),
                before=None if before is None else rate_state(before),
                after={**rate_state(after), "reprice_past_usage": True} if repricing else rate_state(after),
            )

        rate = await self._rates.upsert(
            change.service,
            change.usage_type,
            None if change.effective_micros is None else to_datetime(change.effective_micros),
            (EPOCH, to_datetime(next_hour(now))),
            Decimal(change.unit_price),
            self.currency,
            audit_entry,
            once,
        )
        if isinstance(rate, Replayed):
            return rate
        self._rate_card.note_rate(change.service, change.usage_type, to_micros(rate.effective_from))
        return rate

    # --- invoices ------------------------------------------------------------------

    async def generate_invoice(
        self,
        tenant_id: str,
        start_micros: int | None,
        end_micros: int | None,
        caller: Caller,
        once: Once[tuple[Invoice, bool]] | None = None,
    ) -> tuple[Invoice, bool] | Replayed:
        """The tenant's invoice for the period and whether this call created it.

        Every computation that writes (a new invoice, or a draft recomputed) is recorded
        in the audit trail in the same transaction. With `once`, a retry of the same
        request is answered with the first call's response and recomputes nothing.
        """
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("tenant_id", problem)
        caller.principal.require_tenant(tenant_id)
        period = check_range(
            start_micros,
            end_micros,
            start_field="period_start_time",
            end_field="period_end_time",
            max_days=MAX_INVOICE_DAYS,
        )
        start, end = to_datetime(period.start_micros), to_datetime(period.end_micros)

        async def work(tx: BillingTransaction) -> tuple[Invoice, bool] | Replayed:
            if once is not None and (stored := await tx.claim(once.key)) is not None:
                return Replayed(stored)
            existing_id: str | None = None
            for other_id, other_start, other_end, status in await tx.overlapping(tenant_id, start, end):
                if (other_start, other_end) != (start, end):
                    raise FailedPrecondition(
                        f"the period overlaps invoice {other_id} "
                        f"[{other_start.isoformat()}, {other_end.isoformat()}) of this tenant",
                        reason=ErrorReason.INVOICE_PERIOD_OVERLAP,
                        metadata={"invoice": invoice_name(tenant_id, other_id)},
                    )
                if status is not InvoiceStatus.DRAFT:
                    final = await tx.load(other_id), False
                    if once is not None:
                        await tx.complete(once.key, once.encode(final))
                    return final
                existing_id = other_id
            priced = await self._pricer.price(tx, tenant_id, start, end)
            if priced.unpriced:
                raise FailedPrecondition(
                    "some usage in the period has no rate in effect", reason=ErrorReason.USAGE_NOT_PRICED
                )
            amounts = priced.amounts
            invoice_id = existing_id or f"inv_{uuid.uuid4().hex}"
            before = None if existing_id is None else await tx.load(existing_id)
            await tx.save(invoice_id, tenant_id, start, end, priced.currency, amounts.total, amounts.lines)
            invoice = await tx.load(invoice_id)
            await tx.append_audit(
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=(
                        AuditAction.INVOICE_CREATED if before is None else AuditAction.INVOICE_RECOMPUTED
                    ),
                    tenant_id=tenant_id,
                    resource=f"invoices/{invoice_id}",
                    before=None if before is None else invoice_state(before),
                    after=invoice_state(invoice),
                )
            )
            result = invoice, before is None
            if once is not None:
                await tx.complete(once.key, once.encode(result))
            return result

        return await self._invoices.run_in_tenant_transaction(tenant_id, work)

    async def get_invoice(self, tenant_id: str, invoice_id: str, principal: Principal) -> Invoice:
        """The tenant's invoice; another tenant's invoice is NOT_FOUND, exactly like a missing one."""
        if problem := check_id(invoice_id):
            raise InvalidArgument.single("invoice_id", problem)
        invoice = await self._invoices.get(invoice_id)
        if invoice is None or invoice.tenant_id != tenant_id or not principal.may_act_for(invoice.tenant_id):
            raise NotFound(f"invoice {invoice_id[:80]!r} not found", reason=ErrorReason.INVOICE_NOT_FOUND)
        return (await self._current(invoice.tenant_id, [invoice]))[0]

    async def list_invoices(
        self, tenant_id: str, page_size: int, page_token: str, principal: Principal
    ) -> Page[Invoice]:
        """A tenant's invoices, newest period first; one page. Drafts are priced as of now."""
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("tenant_id", problem)
        principal.require_tenant(tenant_id)
        limit = check_page_size(page_size, default=50, maximum=500)
        filter_key = f"invoices:{tenant_id}"
        last = self._page_tokens.decode(page_token, filter_key, (MICROS, ID))
        before = (to_datetime(last[0]), last[1]) if last else None
        invoices = await self._invoices.list_for_tenant(tenant_id, before, limit + 1)
        next_token = ""
        if len(invoices) > limit:
            invoices = invoices[:limit]
            tail = invoices[-1]
            next_token = self._page_tokens.encode(filter_key, [to_micros(tail.period_start), tail.id])
        return Page(await self._current(tenant_id, invoices), next_token)

    async def _current(self, tenant_id: str, invoices: list[Invoice]) -> list[Invoice]:
        """The invoices with each draft priced afresh from the usage, rates and plans of now.

        Usage keeps arriving for a draft's period, so totals stored by the last
        GenerateInvoice go stale; a read shows what the draft would be if generated (or
        finalized) now. The result is not stored: a read needs only billing:read and must
        not write, and the stored draft, its update_time and the audit trail change only
        through GenerateInvoice. Finalized invoices are shown as frozen.
        """
        drafts = [i for i in invoices if i.status is InvoiceStatus.DRAFT]
        if not drafts:
            return invoices
        # Taken before the queries, so that all usage committed before it is counted.
        computed_at = to_datetime(self._now_micros())

        async def work(tx: BillingTransaction) -> dict[str, Invoice]:
            current: dict[str, Invoice] = {}
            for draft in drafts:
                priced = await self._pricer.price(tx, tenant_id, draft.period_start, draft.period_end)
                if priced.unpriced:
                    continue  # usage without a rate: shown as last generated, with that compute time
                current[draft.id] = replace(
                    draft,
                    currency=priced.currency,
                    lines=priced.amounts.lines,
                    total=priced.amounts.total,
                    computed_at=computed_at,
                )
            return current

        current = await self._invoices.run_read(work)
        return [current.get(i.id, i) for i in invoices]

    # --- audit trail ---------------------------------------------------------------

    async def list_audit_events(
        self,
        tenant_id: str,
        start_micros: int | None,
        end_micros: int | None,
        page_size: int,
        page_token: str,
        principal: Principal,
    ) -> Page[AuditEvent]:
        """Audit entries in the order they were written, oldest first.

        With a tenant_id, that tenant's entries (PERMISSION_DENIED for a tenant the
        principal may not act for). Without, every entry the principal may see: all of
        them for an all-tenants principal, else its tenants' and the rate card's.
        """
        if tenant_id:
            if problem := check_id(tenant_id):
                raise InvalidArgument.single("tenant_id", problem)
            principal.require_tenant(tenant_id)
        if start_micros is not None and end_micros is not None and end_micros <= start_micros:
            raise InvalidArgument.single("end_time", "must be after start_time")
        limit = check_page_size(page_size, default=100, maximum=1_000)
        filter_key = f"audit:{tenant_id}:{start_micros}:{end_micros}"
        last = self._page_tokens.decode(page_token, filter_key, (BIGINT_ID,))
        events = await self._audit.list(
            tenant_id=tenant_id or None,
            visible_tenants=None if principal.all_tenants else sorted(principal.tenants),
            start=None if start_micros is None else to_datetime(start_micros),
            end=None if end_micros is None else to_datetime(end_micros),
            after_id=last[0] if last else 0,
            limit=limit + 1,
        )
        next_token = ""
        if len(events) > limit:
            events = events[:limit]
            next_token = self._page_tokens.encode(filter_key, [events[-1].id])
        return Page(events, next_token)
