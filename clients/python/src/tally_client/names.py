"""Resource names (AIP-122) of Tally's API, built from and split into plain ids.

The patterns are declared in protos/tally/v1/resources.proto. A tenant id may
contain "/", so names are split on their fixed collection ids, never on every "/".
"""

from __future__ import annotations

TENANTS = "tenants/"
INVOICES = "/invoices/"
USAGE_SUMMARY = "/usageSummary"


def tenant_name(tenant_id: str) -> str:
    """The name "tenants/{tenant}"."""
    return f"{TENANTS}{tenant_id}"


def usage_summary_name(tenant_id: str) -> str:
    """The name "tenants/{tenant}/usageSummary"."""
    return f"{TENANTS}{tenant_id}{USAGE_SUMMARY}"


def invoice_name(tenant_id: str, invoice_id: str) -> str:
    """The name "tenants/{tenant}/invoices/{invoice}"."""
    return f"{TENANTS}{tenant_id}{INVOICES}{invoice_id}"


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
