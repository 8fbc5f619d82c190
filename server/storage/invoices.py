"""Queries on invoices and their line items, and the priced usage they are computed from."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from server.domain.audit import AuditEntry
from server.domain.charges import TierPortion
from server.domain.models import CreditNote, Invoice, InvoiceKind, InvoicePayment, InvoiceStatus, PaymentState
from server.domain.plans import PlanVersion
from server.domain.pricing import LineItem, LineKind
from server.domain.requests import RequestKey
from server.domain.stores import BilledLine, MeterWindow, Period, ProfileAndPlans, TenantPeriod, UsageRow
from server.payments.events import StripeEvent
from server.payments.states import CollectionState, Payment
from server.storage import audit, credit_notes, outbox, payment_events, payments, plans, request_ids, webhooks
from server.storage.database import run_with_retries, unavailable_when_unreachable
from server.storage.meter_summaries import meter_totals

# Usage of tenant $1[i] over the period [$3[i], $4[i]) (labelled $2[i]) per usage type
# and unit price. Each rate holds from its effective_from until the next rate of its
# usage type; rollups are hourly and rates change on whole hours, so each hour has
# exactly one price. Hours without a rate (impossible through the API) come back with
# a NULL unit_price. Several periods in one query, so that a page of drafts, or a
# period close's block of tenants, is priced in one round trip.
_PRICED_USAGE = """
WITH periods AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
        AS p(tenant_id, label, period_start, period_end)
), rate_periods AS MATERIALIZED (
    SELECT service, usage_type, unit_price, effective_from,
           lead(effective_from, 1, 'infinity') OVER (
               PARTITION BY service, usage_type ORDER BY effective_from) AS effective_until
    FROM rates
)
SELECT pe.tenant_id, pe.label, u.service, u.usage_type, u.unit_price, u.quantity, u.event_count
FROM periods pe
-- Each period on its own: one index range scan of its tenant's rollups and a small
-- aggregate, never a scan of every tenant's rollups nor one sort of all of a block's
-- rows (both chosen by the planner for a period close's block of 500 tenants' months).
CROSS JOIN LATERAL (
    SELECT r.service, r.usage_type, p.unit_price,
           sum(r.quantity) AS quantity, sum(r.event_count)::bigint AS event_count
    FROM usage_rollups r
    LEFT JOIN rate_periods p
           ON p.service = r.service AND p.usage_type = r.usage_type
          AND r.hour >= p.effective_from AND r.hour < p.effective_until
    WHERE r.tenant_id = pe.tenant_id AND r.hour >= pe.period_start AND r.hour < pe.period_end
    GROUP BY 1, 2, 3
) u
"""

T = TypeVar("T")

# One period per tenant, as p(tenant_id, period_start, period_end), from three arrays.
_TENANT_PERIODS = (
    "unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS p(tenant_id, period_start, period_end)"
)


async def _usage_rows(
    conn: asyncpg.Connection, periods: Sequence[TenantPeriod]
) -> dict[tuple[str, str], list[UsageRow]]:
    """Per (tenant, label), the usage per type and rate card price (None: no rate covers it)."""
    found: dict[tuple[str, str], list[UsageRow]] = {(t, label): [] for t, label, _, _ in periods}
    if not periods:
        return found
    rows = await conn.fetch(
        _PRICED_USAGE,
        [tenant for tenant, _, _, _ in periods],
        [label for _, label, _, _ in periods],
        [start for _, _, start, _ in periods],
        [end for _, _, _, end in periods],
    )
    for row in rows:
        found[(row["tenant_id"], row["label"])].append(
            (row["service"], row["usage_type"], row["unit_price"], row["quantity"], row["event_count"])
        )
    return found


_INVOICE_COLUMNS = (
    "id, tenant_id, period_start, period_end, currency, total, status, created_at, updated_at, kind, number,"
    " finalize_time, paid_time, void_time, uncollectible_time, parties::text AS parties, plan_ids"
)
_LINE_COLUMNS = (
    "l.invoice_id, l.service, l.usage_type, l.quantity, l.unit_price, l.amount, l.event_count, l.kind,"
    " l.description, l.charge_key, l.period_start, l.period_end, l.tiers::text AS tiers"
)


def _tiers_json(tiers: Sequence[TierPortion]) -> str:
    return json.dumps(
        [
            {
                "tier": t.tier,
                "above": str(t.above),
                "up_to": None if t.up_to is None else str(t.up_to),
                "quantity": str(t.quantity),
                "unit_price": str(t.unit_price),
                "flat_fee": str(t.flat_fee),
                "amount": str(t.amount),
            }
            for t in tiers
        ]
    )


def _tiers(text: str) -> tuple[TierPortion, ...]:
    return tuple(
        TierPortion(
            tier=t["tier"],
            above=Decimal(t["above"]),
            up_to=None if t["up_to"] is None else Decimal(t["up_to"]),
            quantity=Decimal(t["quantity"]),
            unit_price=Decimal(t["unit_price"]),
            flat_fee=Decimal(t["flat_fee"]),
            amount=Decimal(t["amount"]),
        )
        for t in json.loads(text)
    )


def line_item(line: asyncpg.Record) -> LineItem:
    """A stored invoice line (with its tiers) as a LineItem."""
    return LineItem(
        service=line["service"],
        usage_type=line["usage_type"],
        quantity=line["quantity"],
        unit_price=line["unit_price"],
        amount=line["amount"],
        event_count=line["event_count"],
        kind=LineKind(line["kind"]),
        description=line["description"],
        charge_key=line["charge_key"],
        period_start=line["period_start"],
        period_end=line["period_end"],
        tiers=_tiers(line["tiers"]),
    )


async def _load(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> list[Invoice]:
    """Attach the line items to invoice rows (one query for all of them)."""
    lines: dict[str, list[LineItem]] = {row["id"]: [] for row in rows}
    found: dict[str, InvoicePayment] = {}
    if rows:
        for line in await conn.fetch(
            f"SELECT {_LINE_COLUMNS} FROM invoice_line_items l WHERE l.invoice_id = ANY($1::text[])"
            " ORDER BY l.invoice_id, l.position",
            list(lines),
        ):
            lines[line["invoice_id"]].append(line_item(line))
        if any(row["status"] != "draft" for row in rows):
            found = await payments.of_invoices(conn, list(lines))
    return [_invoice(row, tuple(lines[row["id"]]), found.get(row["id"])) for row in rows]


def _invoice(
    row: asyncpg.Record, lines: tuple[LineItem, ...], payment: InvoicePayment | None = None
) -> Invoice:
    return Invoice(
        id=row["id"],
        tenant_id=row["tenant_id"],
        period_start=row["period_start"],
        period_end=row["period_end"],
        currency=row["currency"],
        lines=lines,
        total=row["total"],
        status=InvoiceStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        computed_at=row["finalize_time"] or row["updated_at"],
        kind=InvoiceKind(row["kind"]),
        number=row["number"] or "",
        finalize_time=row["finalize_time"],
        paid_time=row["paid_time"],
        void_time=row["void_time"],
        uncollectible_time=row["uncollectible_time"],
        parties=None if row["parties"] is None else json.loads(row["parties"]),
        plan_ids=tuple(row["plan_ids"]),
        payment=payment,
    )


class InvoiceTransaction:
    """The reads and writes of one invoice change, inside one transaction.

    server.domain.stores.BillingTransaction and server.payments.stores.PaymentTransaction:
    the invoice and payment use cases see this class only through those Protocols.
    `connection` is for the Stripe push's own queries.
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @property
    def connection(self) -> asyncpg.Connection:
        """The transaction's connection, for the other stores' queries in the same transaction."""
        return self._conn

    async def lock_tenant(self, tenant_id: str) -> None:
        """Hold the tenant's invoice lock until the transaction ends (see InvoiceStore.tenant_transaction)."""
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('invoices:' || $1, 0))", tenant_id
        )

    async def overlapping(
        self, tenant_id: str, start: datetime, end: datetime
    ) -> list[tuple[str, datetime, datetime, InvoiceStatus]]:
        """(id, period_start, period_end, status) of the tenant's final invoices overlapping [start, end).

        Void invoices no longer hold their period; interim invoices belong to their period's
        final invoice and never count as an overlap.
        """
        rows = await self._conn.fetch(
            "SELECT id, period_start, period_end, status FROM invoices"
            " WHERE tenant_id = $1 AND period_start < $3 AND period_end > $2"
            " AND status <> 'void' AND kind = 'final' ORDER BY period_start",
            tenant_id,
            start,
            end,
        )
        return [(r["id"], r["period_start"], r["period_end"], InvoiceStatus(r["status"])) for r in rows]

    async def with_final_invoice_over(self, periods: Sequence[tuple[str, datetime, datetime]]) -> set[str]:
        """The tenants of (tenant, start, end) that have a final invoice overlapping their period.

        The set-based check of `overlapping`, for a block of tenants: the same rule (void
        invoices do not hold their period, interim invoices never overlap).
        """
        rows = await self._conn.fetch(
            f"SELECT DISTINCT p.tenant_id"
            f" FROM {_TENANT_PERIODS}"
            " JOIN invoices i ON i.tenant_id = p.tenant_id"
            " AND i.period_start < p.period_end AND i.period_end > p.period_start"
            " WHERE i.status <> 'void' AND i.kind = 'final'",
            [tenant for tenant, _, _ in periods],
            [start for _, start, _ in periods],
            [end for _, _, end in periods],
        )
        return {r["tenant_id"] for r in rows}

    async def usage_rows(self, tenant_id: str, periods: Sequence[Period]) -> dict[str, list[UsageRow]]:
        """The tenant's usage per labelled period, per type and rate card price (None: no rate)."""
        found = await _usage_rows(self._conn, [(tenant_id, label, s, e) for label, s, e in periods])
        return {label: rows for (_, label), rows in found.items()}

    async def usage_rows_of(self, periods: Sequence[TenantPeriod]) -> dict[tuple[str, str], list[UsageRow]]:
        """usage_rows for many tenants at once, per (tenant, label)."""
        return await _usage_rows(self._conn, periods)

    async def billed_lines(self, tenant_id: str, start: datetime, end: datetime) -> list[BilledLine]:
        """(period_start, period_end, line) of the billed lines that bear on pricing [start, end).

        Billed: finalized, paid or uncollectible (a void invoice was withdrawn). They are the
        lines of invoices of periods ending by `start`, of the interim invoices of [start, end),
        and every adjustment of an earlier period wherever it was billed. Adjustment lines name
        the period they correct in their own period_start/period_end.
        """
        return (await self.billed_lines_of([(tenant_id, start, end)]))[tenant_id]

    async def billed_lines_of(
        self, periods: Sequence[tuple[str, datetime, datetime]]
    ) -> dict[str, list[BilledLine]]:
        """billed_lines for many (tenant, start, end) at once (one period per tenant), per tenant."""
        found: dict[str, list[BilledLine]] = {t: [] for t, _, _ in periods}
        rows = await self._conn.fetch(
            f"SELECT p.tenant_id AS for_tenant, i.period_start AS invoice_start, i.period_end AS invoice_end,"
            f" {_LINE_COLUMNS}"
            f" FROM {_TENANT_PERIODS}"
            " JOIN invoices i ON i.tenant_id = p.tenant_id"
            " JOIN invoice_line_items l ON l.invoice_id = i.id"
            " WHERE i.status IN ('finalized', 'paid', 'uncollectible')"
            " AND (i.period_end <= p.period_start"
            "      OR (i.kind = 'interim'"
            "          AND i.period_start = p.period_start AND i.period_end = p.period_end)"
            "      OR (l.kind = 'adjustment' AND l.period_end <= p.period_start))"
            " ORDER BY p.tenant_id, i.period_start, l.invoice_id, l.position",
            [tenant for tenant, _, _ in periods],
            [start for _, start, _ in periods],
            [end for _, _, end in periods],
        )
        for r in rows:
            found[r["for_tenant"]].append((r["invoice_start"], r["invoice_end"], line_item(r)))
        return found

    async def meter_totals(self, windows: Sequence[MeterWindow]) -> dict[tuple[str, str, str], Decimal]:
        """Each window's meter aggregate, by (tenant, label, meter id) (meter_summaries.meter_totals)."""
        return await meter_totals(self._conn, windows)

    async def profile(self, tenant_id: str, *, lock: bool = False) -> ProfileAndPlans | None:
        """The tenant's billing profile and plan history (the row locked with `lock`), or None."""
        return await plans.profile(self._conn, tenant_id, lock=lock)

    async def profiles(self, tenant_ids: Sequence[str]) -> dict[str, ProfileAndPlans]:
        """`profile` for many tenants (two statements); tenants without a profile are left out."""
        return await plans.profiles(self._conn, tenant_ids)

    async def plan_versions(self, plan_ids: Sequence[str]) -> dict[str, list[PlanVersion]]:
        """Every version of these plans, oldest first, per plan."""
        return await plans.versions(self._conn, plan_ids)

    async def mark_closed(self, tenant_id: str, closed_until: datetime, next_close_time: datetime) -> None:
        """Record that the periods are closed up to `closed_until`, and when the next close is due."""
        await plans.mark_closed(self._conn, tenant_id, closed_until, next_close_time)

    async def mark_closed_many(self, closes: Sequence[tuple[str, datetime, datetime]]) -> None:
        """mark_closed for many (tenant, closed_until, next_close_time) in one statement."""
        await plans.mark_closed_many(self._conn, closes)

    async def postpone_close(self, tenant_id: str, next_close_time: datetime) -> None:
        """Try the tenant's due close again at `next_close_time` (after a failure)."""
        await plans.postpone_close(self._conn, tenant_id, next_close_time)

    async def credited(self, invoice_id: str) -> Decimal:
        """The sum of the invoice's credit notes so far."""
        return await credit_notes.credited(self._conn, invoice_id)

    async def insert_credit_note(self, note: CreditNote) -> CreditNote:
        """Store a credit note (its invoice is locked by this transaction); the note as stored."""
        return await credit_notes.insert(self._conn, note)

    async def publish(
        self, event_type: str, data: Mapping[str, Any], *, time: datetime | None = None
    ) -> str | None:
        """Publish a webhook event with the change (webhooks.publish); its id, or None."""
        return await webhooks.publish(self._conn, event_type, data, time=time)

    async def publish_many(
        self, event_type: str, datas: Sequence[Mapping[str, Any]], *, time: datetime
    ) -> None:
        """`publish` of many events of one type; one query when nobody subscribes."""
        await webhooks.publish_many(self._conn, event_type, datas, time=time)

    async def create_payments(self, invoice_ids: Sequence[str], state: PaymentState, at: datetime) -> None:
        """Record the payment of each new invoice, in `state` (one statement)."""
        await payments.create_many(self._conn, invoice_ids, state, at)

    async def payment(self, invoice_id: str) -> InvoicePayment | None:
        """The invoice's payment record, or None."""
        return await payments.get(self._conn, invoice_id)

    async def enqueue(
        self,
        kind: str,
        subjects: Sequence[str],
        payload: Mapping[str, Any] | None = None,
        *,
        due: datetime,
        reopen: bool = False,
    ) -> None:
        """Add an outbox job of `kind` per subject, due at `due` (outbox.enqueue, with `reopen`)."""
        if len(subjects) == 1:
            await outbox.enqueue(self._conn, kind, subjects[0], payload, due=due, reopen=reopen)
        else:
            assert payload is None and not reopen, "a block of jobs is new and carries no payload"
            await outbox.enqueue_many(self._conn, kind, subjects, due=due)

    # --- the payments' rows (server.payments.stores.PaymentTransaction) ---

    async def tenant_of(self, invoice_id: str) -> str | None:
        """The tenant of the invoice, or None if there is no such invoice."""
        tenant: str | None = await self._conn.fetchval(
            "SELECT tenant_id FROM invoices WHERE id = $1", invoice_id
        )
        return tenant

    async def record_event(self, event: StripeEvent, payload: str, at: datetime) -> bool:
        """Store a delivered event once; False if its id was stored before (a redelivery)."""
        return await payment_events.record_event(self._conn, event, payload, at)

    async def set_event_outcome(self, event_id: str, outcome: str, invoice_id: str | None) -> None:
        """Record what a stored event did (applied, unchanged, unmatched...) and its invoice."""
        await payment_events.set_outcome(self._conn, event_id, outcome, invoice_id)

    async def find_invoice(self, event: StripeEvent) -> tuple[str, str] | None:
        """(invoice id, tenant id) of the Tally invoice an event is about, or None."""
        return await payment_events.find_invoice(self._conn, event)

    async def remember_refs(self, invoice_id: str, refs: Sequence[str]) -> None:
        """Remember the Stripe objects (charges, payment intents) that name the invoice."""
        await payment_events.remember_refs(self._conn, invoice_id, refs)

    async def lock_payment(self, invoice_id: str) -> Payment | None:
        """The invoice's payment row, locked until the transaction ends; None if it has none yet."""
        return await payment_events.lock_payment(self._conn, invoice_id)

    async def read_payment(self, invoice_id: str) -> Payment | None:
        """The invoice's payment row as the rules see it, or None."""
        return await payment_events.read_payment(self._conn, invoice_id)

    async def save_payment(self, payment: Payment, at: datetime) -> None:
        """Write the columns webhooks and dunning own; the push's other columns stay as they are."""
        await payment_events.save_payment(self._conn, payment, at)

    async def collection_counts(self, tenant_id: str) -> tuple[int, int]:
        """(uncollectible, past due) counts of the tenant's outstanding invoice payments."""
        return await payment_events.collection_counts(self._conn, tenant_id)

    async def collection(self, tenant_id: str) -> tuple[CollectionState, datetime] | None:
        """The tenant's recorded collection status and when it was set; None: never recorded."""
        return await payment_events.collection(self._conn, tenant_id)

    async def set_collection(self, tenant_id: str, state: CollectionState, at: datetime) -> None:
        """Record the tenant's collection status."""
        await payment_events.set_collection(self._conn, tenant_id, state, at)

    async def past_due_invoices(self, tenant_id: str, limit: int) -> list[tuple[str, str]]:
        """(invoice id, payment state) of the tenant's outstanding payments."""
        return await payment_events.past_due_invoices(self._conn, tenant_id, limit)

    async def job_state(self, kind: str, subject: str) -> str | None:
        """The state of the outbox job (kind, subject), or None if there is none."""
        job = await outbox.get(self._conn, kind, subject)
        return None if job is None else job.state

    async def lock(self, invoice_id: str) -> Invoice | None:
        """The invoice, its row locked until the transaction ends."""
        rows = await self._conn.fetch(
            f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1 FOR UPDATE", invoice_id
        )
        invoices = await _load(self._conn, rows)
        return invoices[0] if invoices else None

    async def next_number(self, issuer: str, prefix: str) -> int:
        """The next number of the (issuer, prefix) sequence, taken in this transaction.

        The counter row stays locked until commit, so concurrent finalizations from any
        process wait for each other; a rollback gives the number back. No gap, no repeat.
        """
        return await self.take_numbers(issuer, prefix, 1)

    async def take_numbers(self, issuer: str, prefix: str, count: int) -> int:
        """The first of the next `count` numbers of the sequence, taken together (as next_number)."""
        last: int = await self._conn.fetchval(
            "INSERT INTO document_sequences AS s (issuer, prefix, last_number) VALUES ($1, $2, $3)"
            " ON CONFLICT (issuer, prefix) DO UPDATE SET last_number = s.last_number + $3"
            " RETURNING last_number",
            issuer,
            prefix,
            count,
        )
        return last - count + 1

    async def finalize(
        self,
        invoice_id: str,
        number: str,
        parties: Mapping[str, Any],
        plan_ids: Sequence[str],
        at: datetime,
        lines: Sequence[LineItem],
    ) -> Invoice:
        """Freeze a draft whose `lines` were just saved: number it, mark it finalized, return it.

        One round trip (RETURNING, the lines as saved): it runs while the numbering
        sequence's row is locked, which every concurrent finalization waits for.
        """
        row = await self._conn.fetchrow(
            "UPDATE invoices SET status = 'finalized', number = $2, parties = $3::jsonb, plan_ids = $4,"
            " finalize_time = $5, issuer = $6, updated_at = now() WHERE id = $1 AND status = 'draft'"
            f" RETURNING {_INVOICE_COLUMNS}",
            invoice_id,
            number,
            json.dumps(parties, sort_keys=True),
            list(plan_ids),
            at,
            parties["issuer"]["name"],
        )
        return _invoice(row, tuple(lines))

    async def finalize_many(
        self, numbered: Sequence[tuple[str, str, Mapping[str, Any]]], at: datetime, issuer: str
    ) -> None:
        """Freeze drafts just saved by save_drafts, each (id, number, parties), in one statement.

        Like finalize, it runs while the numbering sequence's row is locked.
        """
        result = await self._conn.execute(
            "UPDATE invoices i SET status = 'finalized', number = f.number, parties = f.parties::jsonb,"
            " finalize_time = $4, issuer = $5, updated_at = now()"
            " FROM unnest($1::text[], $2::text[], $3::text[]) AS f(id, number, parties)"
            " WHERE i.id = f.id AND i.status = 'draft'",
            [invoice_id for invoice_id, _, _ in numbered],
            [number for _, number, _ in numbered],
            [json.dumps(parties, sort_keys=True) for _, _, parties in numbered],
            at,
            issuer,
        )
        # Every draft was saved in this transaction under its tenant's lock.
        assert result == f"UPDATE {len(numbered)}", result

    async def set_status(self, invoice_id: str, status: InvoiceStatus, at: datetime) -> None:
        """Move a finalized invoice along its lifecycle, stamping the time of the new status."""
        column = {
            InvoiceStatus.PAID: "paid_time",
            InvoiceStatus.VOID: "void_time",
            InvoiceStatus.UNCOLLECTIBLE: "uncollectible_time",
        }[status]
        await self._conn.execute(
            f"UPDATE invoices SET status = $2, {column} = $3 WHERE id = $1", invoice_id, status.value, at
        )

    async def claim(self, key: RequestKey) -> bytes | None:
        """Claim a request's key for this change; the first call's response if it ran before."""
        return await request_ids.claim(self._conn, key)

    async def complete(self, key: RequestKey, response: bytes) -> None:
        """Store the response of the change that claimed `key`, committed (or not) with it."""
        await request_ids.complete(self._conn, key, response)

    async def append_audit(self, entry: AuditEntry) -> None:
        """Record the change in the audit trail, committed (or not) with it."""
        await audit.append(self._conn, entry)

    async def append_audit_many(self, entries: Sequence[AuditEntry]) -> None:
        """Record many changes in the audit trail, in order, committed (or not) with them."""
        await audit.append_many(self._conn, entries)

    async def find(self, invoice_id: str) -> Invoice | None:
        """The invoice (not locked), or None."""
        rows = await self._conn.fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1", invoice_id)
        invoices = await _load(self._conn, rows)
        return invoices[0] if invoices else None

    async def load(self, invoice_id: str) -> Invoice:
        """The invoice `invoice_id` as stored now, with its lines; it must exist."""
        invoice = await self.find(invoice_id)
        if invoice is None:
            raise LookupError(f"invoice {invoice_id} is not stored")
        return invoice

    async def save(
        self,
        invoice_id: str,
        tenant_id: str,
        start: datetime,
        end: datetime,
        currency: str,
        total: Decimal,
        lines: Sequence[LineItem],
        kind: InvoiceKind = InvoiceKind.FINAL,
    ) -> None:
        """Insert or overwrite the draft invoice and replace its lines."""
        await self._conn.execute(
            """INSERT INTO invoices (id, tenant_id, period_start, period_end, currency, total, status, kind)
               VALUES ($1, $2, $3, $4, $5, $6, 'draft', $7)
               ON CONFLICT (id) DO UPDATE
                   SET total = excluded.total, currency = excluded.currency, updated_at = now()""",
            invoice_id,
            tenant_id,
            start,
            end,
            currency,
            total,
            kind.value,
        )
        await self._conn.execute("DELETE FROM invoice_line_items WHERE invoice_id = $1", invoice_id)
        if lines:
            await self._conn.executemany(
                """INSERT INTO invoice_line_items
                       (invoice_id, position, service, usage_type, quantity, unit_price, amount, event_count,
                        kind, description, charge_key, period_start, period_end, tiers)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb)""",
                [_line_record(invoice_id, position, line) for position, line in enumerate(lines)],
            )

    async def save_drafts(self, drafts: Sequence[Invoice]) -> None:
        """Insert new draft invoices (ids not used before) with their lines and plans, by COPY.

        A period close saves a block of tenants' invoices this way: two statements for the
        block instead of three per invoice.
        """
        await self._conn.copy_records_to_table(
            "invoices",
            columns=_DRAFT_COLUMNS,
            records=[
                (
                    d.id,
                    d.tenant_id,
                    d.period_start,
                    d.period_end,
                    d.currency,
                    d.total,
                    InvoiceStatus.DRAFT.value,
                    d.kind.value,
                    list(d.plan_ids),
                )
                for d in drafts
            ],
        )
        await self._conn.copy_records_to_table(
            "invoice_line_items",
            columns=_LINE_ITEM_COLUMNS,
            records=[
                _line_record(d.id, position, line) for d in drafts for position, line in enumerate(d.lines)
            ],
        )


_DRAFT_COLUMNS = (
    "id",
    "tenant_id",
    "period_start",
    "period_end",
    "currency",
    "total",
    "status",
    "kind",
    "plan_ids",
)
_LINE_ITEM_COLUMNS = (
    "invoice_id",
    "position",
    "service",
    "usage_type",
    "quantity",
    "unit_price",
    "amount",
    "event_count",
    "kind",
    "description",
    "charge_key",
    "period_start",
    "period_end",
    "tiers",
)


def _line_record(invoice_id: str, position: int, line: LineItem) -> tuple[Any, ...]:
    """A line item as a row of invoice_line_items, in the order of _LINE_ITEM_COLUMNS."""
    return (
        invoice_id,
        position,
        line.service,
        line.usage_type,
        line.quantity,
        line.unit_price,
        line.amount,
        line.event_count,
        line.kind.value,
        line.description,
        line.charge_key,
        line.period_start,
        line.period_end,
        _tiers_json(line.tiers),
    )


class InvoiceStore:
    """Invoices and the priced usage they are computed from, and the transactions that change them."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[InvoiceTransaction]:
        """A read-only, repeatable-read transaction: several queries see one snapshot."""
        with unavailable_when_unreachable():
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                yield InvoiceTransaction(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[InvoiceTransaction]:
        """A plain transaction, for changes that lock what they touch themselves."""
        with unavailable_when_unreachable():
            async with self._pool.acquire() as conn, conn.transaction():
                yield InvoiceTransaction(conn)

    @asynccontextmanager
    async def tenant_transaction(self, tenant_id: str) -> AsyncIterator[InvoiceTransaction]:
        """A transaction holding the tenant's invoice lock: generations of one tenant run one at a time."""
        with unavailable_when_unreachable():
            async with self._pool.acquire() as conn, conn.transaction():
                tx = InvoiceTransaction(conn)
                await tx.lock_tenant(tenant_id)
                yield tx

    @asynccontextmanager
    async def try_tenant_transaction(self, tenant_id: str) -> AsyncIterator[InvoiceTransaction | None]:
        """Like tenant_transaction, but None at once if another transaction holds the tenant's lock."""
        with unavailable_when_unreachable():
            async with self._pool.acquire() as conn, conn.transaction():
                locked = await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended('invoices:' || $1, 0))", tenant_id
                )
                yield InvoiceTransaction(conn) if locked else None

    @asynccontextmanager
    async def due_block_transaction(
        self, now: datetime, limit: int
    ) -> AsyncIterator[tuple[InvoiceTransaction, list[str]]]:
        """A transaction holding the invoice locks of up to `limit` tenants whose close is due at `now`.

        Profiles another transaction has locked are skipped (SKIP LOCKED), and so are tenants
        whose invoice lock another transaction holds (tried, never waited for), so several
        processes closing at once take disjoint blocks and never wait for each other here.
        The profiles come back locked: their close is still due, as of this transaction.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT tenant_id FROM ("
                "  SELECT tenant_id FROM billing_profiles WHERE next_close_time <= $1"
                "  ORDER BY next_close_time, tenant_id LIMIT $2 FOR UPDATE SKIP LOCKED"
                ") due WHERE pg_try_advisory_xact_lock(hashtextextended('invoices:' || tenant_id, 0))",
                now,
                limit,
            )
            yield InvoiceTransaction(conn), sorted(r["tenant_id"] for r in rows)

    # A unit of work in one transaction, with the retry policy (run_with_retries): a
    # deadlock or serialization failure runs `work` again in a fresh transaction, so
    # `work` must do nothing outside it that a second run would repeat. The caller sees
    # its result or a domain error (Unavailable, Aborted TRANSACTION_CONFLICT), never a
    # connection or a driver error.

    async def run_read(self, work: Callable[[InvoiceTransaction], Awaitable[T]]) -> T:
        """`work` in a read-only, repeatable-read transaction (read_transaction), with retries."""

        async def attempt() -> T:
            async with self.read_transaction() as tx:
                return await work(tx)

        return await run_with_retries(attempt)

    async def run_in_transaction(self, work: Callable[[InvoiceTransaction], Awaitable[T]]) -> T:
        """`work` in a plain transaction (transaction), with retries."""

        async def attempt() -> T:
            async with self.transaction() as tx:
                return await work(tx)

        return await run_with_retries(attempt)

    async def run_in_tenant_transaction(
        self, tenant_id: str, work: Callable[[InvoiceTransaction], Awaitable[T]]
    ) -> T:
        """`work` in a transaction holding the tenant's invoice lock (tenant_transaction), with retries."""

        async def attempt() -> T:
            async with self.tenant_transaction(tenant_id) as tx:
                return await work(tx)

        return await run_with_retries(attempt)

    async def run_if_tenant_free(
        self, tenant_id: str, work: Callable[[InvoiceTransaction | None], Awaitable[T]]
    ) -> T:
        """`work` in try_tenant_transaction (None if another holds the tenant's lock), with retries."""

        async def attempt() -> T:
            async with self.try_tenant_transaction(tenant_id) as tx:
                return await work(tx)

        return await run_with_retries(attempt)

    async def run_in_due_block(
        self, now: datetime, limit: int, work: Callable[[InvoiceTransaction, list[str]], Awaitable[T]]
    ) -> T:
        """`work` in due_block_transaction, with the tenants it locked, with retries.

        A block that runs out of its time raises Unavailable caused by TimeoutError,
        rolled back whole, as run_with_retries does.
        """

        async def attempt() -> T:
            async with self.due_block_transaction(now, limit) as (tx, tenants):
                return await work(tx, tenants)

        return await run_with_retries(attempt)

    async def with_threshold(self) -> list[str]:
        """Tenants whose billing profile has a spend threshold."""

        async def attempt() -> list[str]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT tenant_id FROM billing_profiles WHERE spend_threshold IS NOT NULL"
                    " ORDER BY tenant_id"
                )
            return [r["tenant_id"] for r in rows]

        return await run_with_retries(attempt)

    async def due_for_close(self, now: datetime, limit: int) -> list[str]:
        """Tenants whose next period close is due at `now` (not locked: each close checks again)."""

        async def attempt() -> list[str]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT tenant_id FROM billing_profiles WHERE next_close_time <= $1"
                    " ORDER BY next_close_time, tenant_id LIMIT $2",
                    now,
                    limit,
                )
            return [r["tenant_id"] for r in rows]

        return await run_with_retries(attempt)

    async def get(self, invoice_id: str) -> Invoice | None:
        """The stored invoice `invoice_id` with its lines, or None."""

        async def attempt() -> Invoice | None:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = $1", invoice_id)
                invoices = await _load(conn, rows)
            return invoices[0] if invoices else None

        return await run_with_retries(attempt)

    async def list_for_tenant(
        self, tenant_id: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Invoice]:
        """Invoices of a tenant, newest period first, after the page key (period_start, id)."""

        async def attempt() -> list[Invoice]:
            async with self._pool.acquire() as conn:
                if before is None:
                    rows = await conn.fetch(
                        f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE tenant_id = $1"
                        " ORDER BY period_start DESC, id DESC LIMIT $2",
                        tenant_id,
                        limit,
                    )
                else:
                    rows = await conn.fetch(
                        f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE tenant_id = $1"
                        " AND (period_start, id) < ($2, $3)"
                        " ORDER BY period_start DESC, id DESC LIMIT $4",
                        tenant_id,
                        before[0],
                        before[1],
                        limit,
                    )
                return await _load(conn, rows)

        return await run_with_retries(attempt)
