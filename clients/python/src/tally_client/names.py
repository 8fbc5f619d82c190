"""Resource names (AIP-122) of Tally's API, built from and split into plain ids.

The patterns are declared in protos/tally/v1/resources.proto. A tenant id may
contain "/", so names are split on their fixed collection ids, never on every "/".
"""

from __future__ import annotations

TENANTS = "tenants/"
INVOICES = "/invoices/"
USAGE_SUMMARY = "/usageSummary"
BILLING_PROFILE = "/billingProfile"
CREDIT_NOTES = "/creditNotes/"
METERS = "meters/"
PLANS = "plans/"
COLLECTION_STATUS = "/collectionStatus"
WEBHOOK_SUBSCRIPTIONS = "webhookSubscriptions/"


def tenant_name(tenant_id: str) -> str:
    """The name "tenants/{tenant}"."""
    return f"{TENANTS}{tenant_id}"


def usage_summary_name(tenant_id: str) -> str:
    """The name "tenants/{tenant}/usageSummary"."""
    return f"{TENANTS}{tenant_id}{USAGE_SUMMARY}"


def invoice_name(tenant_id: str, invoice_id: str) -> str:
    """The name "tenants/{tenant}/invoices/{invoice}"."""
    return f"{TENANTS}{tenant_id}{INVOICES}{invoice_id}"


def billing_profile_name(tenant_id: str) -> str:
    """The name "tenants/{tenant}/billingProfile"."""
    return f"{TENANTS}{tenant_id}{BILLING_PROFILE}"


def collection_status_name(tenant_id: str) -> str:
    """The name "tenants/{tenant}/collectionStatus"."""
    return f"{TENANTS}{tenant_id}{COLLECTION_STATUS}"


def webhook_subscription_name(subscription: str) -> str:
    """The name "webhookSubscriptions/{webhook_subscription}" of a subscription given by id or by name."""
    return (
        subscription
        if subscription.startswith(WEBHOOK_SUBSCRIPTIONS)
        else WEBHOOK_SUBSCRIPTIONS + subscription
    )


def meter_name(meter: str) -> str:
    """The name "meters/{meter}" of a meter given by id or already by name."""
    return meter if meter.startswith(METERS) else f"{METERS}{meter}"


def plan_name(plan: str) -> str:
    """The name "plans/{plan}" of a plan given by id or already by name."""
    return plan if plan.startswith(PLANS) else f"{PLANS}{plan}"


def parse_tenant_name(name: str) -> str:
    """The tenant id of "tenants/{tenant}"."""
    if not name.startswith(TENANTS) or len(name) == len(TENANTS):
        raise ValueError(f"not a tenant name (tenants/{{tenant}}): {name!r}")
    return name[len(TENANTS) :]


def parse_invoice_name(name: str) -> tuple[str, str]:
    """(tenant id, invoice id) of "tenants/{tenant}/invoices/{invoice}"."""
    tenant_part, separator, invoice_id = name.rpartition(INVOICES)
    if not separator or not invoice_id or "/" in invoice_id:
        raise ValueError(f"not an invoice name (tenants/{{tenant}}/invoices/{{invoice}}): {name!r}")
    return parse_tenant_name(tenant_part), invoice_id


def parse_credit_note_name(name: str) -> tuple[str, str]:
    """(tenant id, credit note id) of "tenants/{tenant}/creditNotes/{credit_note}"."""
    tenant_part, separator, note_id = name.rpartition(CREDIT_NOTES)
    if not separator or not note_id or "/" in note_id:
        raise ValueError(f"not a credit note name (tenants/{{tenant}}/creditNotes/{{credit_note}}): {name!r}")
    return parse_tenant_name(tenant_part), note_id
