"""Closing the periods of a block of tenants in one transaction: the period-close task's fast path.

Closing one tenant at a time costs about fifteen round trips and a commit per invoice
(42 invoices/s measured, four minutes for 10,000 tenants). A block instead reads the
profiles, plan histories, plan versions, billed lines, overlapping invoices and usage of
all its tenants in six set-based statements (plus one per meter and window for charges
that price a meter), prices each invoice in Python with the same pure code as a single
close (InvoicePricer.price_basis), and writes the drafts and their lines (COPY), the
cursors, the audit entries, the finalization, the payment records, the Stripe push jobs
and the invoice.finalized events in a few more, with one commit. The guarantees are those of a single close:

- exactly once: the block holds each tenant's invoice lock and profile row from the moment
  it takes the tenant (InvoiceBook.run_in_due_block) to its commit;
- gap-free numbering: the block's numbers are taken together, last (Lifecycle.finalize_block_in);
- a crash (or any failure) midway rolls the whole block back, numbers included: committed
  blocks are complete, and the next round closes the rest, each tenant once.

A tenant the fast path does not handle is handed back to be closed on its own
(Periods.close_in, its own transaction): one with a final invoice over the period already
(a draft from GenerateInvoice to finalize, or an overlap to refuse), usage without a rate,
or a pricing error. That path finalizes, refuses, or logs and postpones it, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from server.billing.lifecycle import Lifecycle
from server.billing.pricer import InvoicePricer, PricedInvoice, meter_values_of, plan_ids_of, pricing_basis
from server.domain.access import Caller
from server.domain.audit import AuditAction, AuditEntry, invoice_state
from server.domain.errors import TallyError
from server.domain.models import Invoice, InvoiceKind
from server.domain.plans import billing_period
from server.domain.stores import BillingTransaction


@dataclass(frozen=True, slots=True)
class BlockClose:
    """What a block did: invoices finalized, and the tenants left to close one by one."""

    closed: list[Invoice]
    left: list[str]


async def close_block(
    tx: BillingTransaction,
    tenants: list[str],
    pricer: InvoicePricer,
    lifecycle: Lifecycle,
    caller: Caller,
    at: datetime,
    grace: timedelta,
) -> BlockClose:
    """Close the oldest open period of each of `tenants` in `tx`, which holds their locks."""
    found = await tx.profiles(tenants)
    periods = {
        tenant: billing_period(profile.anchor_day, profile.billing_start, profile.closed_until)
        for tenant, (profile, _) in found.items()
    }
    overlapped = await tx.with_final_invoice_over([(t, p.start, p.end) for t, p in periods.items()])
    ours = [t for t in tenants if t in periods and t not in overlapped]
    plan_ids = sorted({plan for t in ours for plan in plan_ids_of(found[t][1])})
    versions = await tx.plan_versions(plan_ids)
    billed = await tx.billed_lines_of([(t, periods[t].start, periods[t].end) for t in ours])
    bases = {t: pricing_basis(periods[t].start, periods[t].end, found[t], versions, billed[t]) for t in ours}
    usage = await tx.usage_rows_of(
        [(t, label, start, end) for t in ours for label, start, end in bases[t].labels()]
    )
    meters = await meter_values_of(tx, {t: bases[t] for t in ours})

    left = [t for t in tenants if t not in ours]
    drafts: list[tuple[Invoice, PricedInvoice]] = []
    for tenant in ours:
        basis = bases[tenant]
        try:
            priced = pricer.price_basis(
                basis, {label: usage[(tenant, label)] for label, _, _ in basis.labels()}, meters[tenant]
            )
        except TallyError:
            left.append(tenant)  # the single close reports it
            continue
        if priced.unpriced:
            left.append(tenant)
            continue
        drafts.append((priced.draft(tenant, basis.start, basis.end, InvoiceKind.FINAL, at), priced))
    if not drafts:
        return BlockClose([], left)

    await tx.save_drafts([draft for draft, _ in drafts])
    closes = []
    for draft, _ in drafts:
        profile = found[draft.tenant_id][0]
        following = billing_period(profile.anchor_day, profile.billing_start, draft.period_end)
        closes.append((draft.tenant_id, draft.period_end, following.end + grace))
    await tx.mark_closed_many(closes)
    states = [invoice_state(draft) for draft, _ in drafts]
    await tx.append_audit_many(
        [
            AuditEntry(
                principal=caller.principal.subject,
                request_id=caller.request_id,
                action=AuditAction.INVOICE_CREATED,
                tenant_id=draft.tenant_id,
                resource=f"invoices/{draft.id}",
                before=None,
                after=state,
            )
            for (draft, _), state in zip(drafts, states, strict=True)
        ]
    )
    # The numbers last: the sequence's row is held from here to the commit.
    return BlockClose(await lifecycle.finalize_block_in(tx, drafts, caller, states), left)
