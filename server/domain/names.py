"""Resource names (AIP-122): how the API names tenants, invoices, rates and audit entries.

The patterns are declared in protos/tally/v1/resources.proto; this module is their one
implementation, so that formatting and parsing cannot drift apart. A tenant id is
already restricted (server.domain.events.check_id) but may contain "/", so parsing
splits on the fixed collection ids rather than on every "/".
"""

from __future__ import annotations

from datetime import UTC, datetime

from server.domain.errors import InvalidArgument
from server.domain.events import check_id

TENANTS = "tenants/"
INVOICES = "/invoices/"
USAGE_SUMMARY = "/usageSummary"
CREDIT_NOTES = "/creditNotes/"
BILLING_PROFILE = "/billingProfile"
PLANS = "plans/"
COLLECTION_STATUS = "/collectionStatus"


def tenant_name(tenant_id: str) -> str:
    """The resource name "tenants/{tenant}"."""
    return f"{TENANTS}{tenant_id}"


def invoice_name(tenant_id: str, invoice_id: str) -> str:
    """The resource name "tenants/{tenant}/invoices/{invoice}"."""
    return f"{TENANTS}{tenant_id}{INVOICES}{invoice_id}"


def credit_note_name(tenant_id: str, credit_note_id: str) -> str:
    """The resource name "tenants/{tenant}/creditNotes/{credit_note}"."""
    return f"{TENANTS}{tenant_id}{CREDIT_NOTES}{credit_note_id}"


def billing_profile_name(tenant_id: str) -> str:
    """The resource name "tenants/{tenant}/billingProfile"."""
    return f"{TENANTS}{tenant_id}{BILLING_PROFILE}"


def plan_name(plan_id: str) -> str:
    """The resource name "plans/{plan}"."""
    return f"{PLANS}{plan_id}"


def parse_billing_profile_name(name: str, field: str = "name") -> str:
    """The tenant id of "tenants/{tenant}/billingProfile"."""
    if not name.endswith(BILLING_PROFILE):
        raise _bad(field, "tenants/{tenant}/billingProfile")
    return parse_tenant_name(name[: -len(BILLING_PROFILE)], field)


def parse_plan_name(name: str, field: str = "name") -> str:
    """The plan id of "plans/{plan}" (checked by the plans' own rule later)."""
    if not name.startswith(PLANS) or "/" in name[len(PLANS) :] or len(name) == len(PLANS):
        raise _bad(field, "plans/{plan}")
    return name[len(PLANS) :]


def usage_summary_name(tenant_id: str) -> str:
    """The resource name "tenants/{tenant}/usageSummary"."""
    return f"{TENANTS}{tenant_id}{USAGE_SUMMARY}"


def rate_name(service: str, usage_type: str, effective: datetime) -> str:
    """The resource name of a rate: services/{service}/usageTypes/{usage_type}/rates/{RFC 3339 UTC}."""
    stamp = effective.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"services/{service}/usageTypes/{usage_type}/rates/{stamp}"


def audit_event_name(position: int) -> str:
    """The resource name "auditEvents/{position}" of the entry at that position in the trail."""
    return f"auditEvents/{position}"


def _bad(field: str, pattern: str) -> InvalidArgument:
    return InvalidArgument.single(field, f"must be a resource name of the form {pattern!r}")


def parse_tenant_name(name: str, field: str = "parent") -> str:
    """The tenant id of "tenants/{tenant}"; InvalidArgument naming `field` otherwise."""
    if not name.startswith(TENANTS):
        raise _bad(field, "tenants/{tenant}")
    tenant_id = name[len(TENANTS) :]
    if problem := check_id(tenant_id):
        raise InvalidArgument.single(field, f"tenant id {problem}")
    return tenant_id


def parse_invoice_name(name: str, field: str = "name") -> tuple[str, str]:
    """(tenant id, invoice id) of "tenants/{tenant}/invoices/{invoice}"."""
    tenant_part, separator, invoice_id = name.rpartition(INVOICES)
    if not separator or "/" in invoice_id:
        raise _bad(field, "tenants/{tenant}/invoices/{invoice}")
    tenant_id = parse_tenant_name(tenant_part, field)
    if problem := check_id(invoice_id):
        raise InvalidArgument.single(field, f"invoice id {problem}")
    return tenant_id, invoice_id


def collection_status_name(tenant_id: str) -> str:
    """The resource name of a tenant's collection status, `tenants/{tenant}/collectionStatus`."""
    return f"{TENANTS}{tenant_id}{COLLECTION_STATUS}"


def parse_collection_status_name(name: str, field: str = "name") -> str:
    """The tenant id of "tenants/{tenant}/collectionStatus"."""
    if not name.endswith(COLLECTION_STATUS):
        raise _bad(field, "tenants/{tenant}/collectionStatus")
    return parse_tenant_name(name[: -len(COLLECTION_STATUS)], field)


def parse_usage_summary_name(name: str, field: str = "name") -> str:
    """The tenant id of "tenants/{tenant}/usageSummary"."""
    if not name.endswith(USAGE_SUMMARY):
        raise _bad(field, "tenants/{tenant}/usageSummary")
    return parse_tenant_name(name[: -len(USAGE_SUMMARY)], field)
