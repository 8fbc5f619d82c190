"""The invoice lifecycle: which status may follow which, and how documents are numbered.

    draft -> finalized -> paid | void | uncollectible
    draft -> void
    uncollectible -> paid | void   (a payment can still arrive after a write-off)

Paid and void are final. Finalizing prices the draft one last time, freezes its lines and
gives it the next number of its issuer's sequence; afterwards only the status moves on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from server.domain.errors import ErrorReason, FailedPrecondition
from server.domain.models import InvoiceStatus

_S = InvoiceStatus
TRANSITIONS: Mapping[InvoiceStatus, frozenset[InvoiceStatus]] = MappingProxyType(
    {
        _S.DRAFT: frozenset({_S.FINALIZED, _S.VOID}),
        _S.FINALIZED: frozenset({_S.PAID, _S.VOID, _S.UNCOLLECTIBLE}),
        _S.UNCOLLECTIBLE: frozenset({_S.PAID, _S.VOID}),
        _S.PAID: frozenset(),
        _S.VOID: frozenset(),
    }
)

# Documents that count as billed: what a tenant was asked to pay (void ones were withdrawn).
BILLED = frozenset({_S.FINALIZED, _S.PAID, _S.UNCOLLECTIBLE})

NUMBER_DIGITS = 6


def check_transition(invoice_name: str, current: InvoiceStatus, target: InvoiceStatus) -> None:
    """FailedPrecondition (INVOICE_STATUS_INVALID) unless `target` may follow `current`."""
    if target not in TRANSITIONS[current]:
        allowed = sorted(s.value for s in TRANSITIONS[current]) or ["none: it is final"]
        raise FailedPrecondition(
            f"invoice is {current.value}; it cannot become {target.value} (allowed: {', '.join(allowed)})",
            reason=ErrorReason.INVOICE_STATUS_INVALID,
            metadata={"invoice": invoice_name, "status": current.value, "requestedStatus": target.value},
        )


def period_finalized(invoice_name: str) -> FailedPrecondition:
    """The refusal of a rate, plan or profile change that would reach into a billed period."""
    return FailedPrecondition(
        f"the change would take effect inside a period already billed by invoice {invoice_name}",
        reason=ErrorReason.PERIOD_FINALIZED,
        metadata={"invoice": invoice_name},
    )


def expand_prefix(template: str, at: datetime) -> str:
    """The prefix of a sequence at a time: "{year}" becomes the UTC year ("TALLY-{year}-" -> "TALLY-2026-").

    Each expanded prefix is its own gap-free sequence, so numbering starts again at 1 each year
    when the template holds the year, as many jurisdictions expect.
    """
    return template.replace("{year}", f"{at.year:04d}")


def document_number(prefix: str, sequence_number: int) -> str:
    """E.g. "TALLY-2026-" and 123 -> "TALLY-2026-000123" (more digits once past 999,999)."""
    return f"{prefix}{sequence_number:0{NUMBER_DIGITS}d}"


@dataclass(frozen=True, slots=True)
class Issuer:
    """The operator running Tally, as printed on its invoices and credit notes (from the settings).

    `name` also keys the numbering sequences: one per issuer and expanded prefix.
    """

    name: str = "Tally"
    address: str = ""
    tax_id: str = ""
    invoice_prefix: str = "TALLY-{year}-"
    credit_note_prefix: str = "TALLY-CN-{year}-"

    def as_party(self) -> dict[str, str]:
        """The issuer as printed on a document (the `issuer` party of an invoice or credit note)."""
        return {"name": self.name, "address": self.address, "tax_id": self.tax_id}
