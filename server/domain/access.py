"""Who is calling and what it may do: the principal named by a verified token, and its checks.

A principal acts for a fixed set of tenants, or for every tenant (internal services that
report usage on behalf of all of them), and holds scopes that say which kinds of calls it
may make. The use cases ask `may_act_for` before reading or writing a tenant's data; the
API layer asks `require_scope` before calling them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from server.domain.errors import ErrorReason, PermissionDenied

USAGE_WRITE: Final = "usage:write"
USAGE_READ: Final = "usage:read"
BILLING_READ: Final = "billing:read"
BILLING_ADMIN: Final = "billing:admin"
# Recording usage older than the ingestion window (audited), on top of usage:write.
USAGE_BACKFILL: Final = "usage:backfill"
# Defining and archiving meters (shared by every tenant, like the rate card).
METERS_ADMIN: Final = "meters:admin"
# Managing outbound webhook subscriptions and reading their deliveries (every tenant's events).
NOTIFICATIONS_ADMIN: Final = "notifications:admin"
SCOPES: Final = (
    USAGE_WRITE,
    USAGE_READ,
    BILLING_READ,
    BILLING_ADMIN,
    USAGE_BACKFILL,
    METERS_ADMIN,
    NOTIFICATIONS_ADMIN,
)

ALL_TENANTS: Final = "all"
AllTenants = Literal["all"]

# One message for every tenant the caller may not see, whether or not the tenant exists,
# so that the answer reveals nothing about other tenants.
TENANT_DENIED = "the caller may not act for this tenant"


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified identity behind a call."""

    subject: str
    tenants: frozenset[str] | AllTenants
    scopes: frozenset[str]

    @property
    def all_tenants(self) -> bool:
        """True if the token covers every tenant, present and future."""
        return self.tenants == ALL_TENANTS

    def may_act_for(self, tenant_id: str) -> bool:
        """True if the token covers `tenant_id`."""
        return self.all_tenants or tenant_id in self.tenants

    def require_scope(self, scope: str) -> None:
        """PermissionDenied (SCOPE_MISSING, naming the scope) unless the token grants `scope`."""
        if scope not in self.scopes:
            raise PermissionDenied(
                f"the token lacks the scope {scope}",
                reason=ErrorReason.SCOPE_MISSING,
                metadata={"scope": scope},
            )

    def require_tenant(self, tenant_id: str) -> None:
        """PermissionDenied (TENANT_NOT_PERMITTED) unless the token covers `tenant_id`.

        The message is the same whether or not the tenant exists.
        """
        if not self.may_act_for(tenant_id):
            raise PermissionDenied(TENANT_DENIED, reason=ErrorReason.TENANT_NOT_PERMITTED)

    def require_all_tenants(self, what: str) -> None:
        """PermissionDenied (ALL_TENANTS_REQUIRED) unless the token covers every tenant.

        For changes that affect every tenant (rates, plans, meters); `what` names the change in
        the message.
        """
        if not self.all_tenants:
            raise PermissionDenied(
                f"{what} needs a token for all tenants", reason=ErrorReason.ALL_TENANTS_REQUIRED
            )


@dataclass(frozen=True, slots=True)
class Caller:
    """A principal within one call: the request id ties audit entries and logs to the call."""

    principal: Principal
    request_id: str
