"""Corrections: cancelling a recorded event, the use case behind UsageService.CancelEvent.

A cancelled event stops counting in every summary, meter and draft invoice at once, and its
(tenant_id, event_id) stays taken, so the event sent again is still a duplicate. Needs the
scope billing:admin (it changes what the tenant is billed; the API checks it) and a token
for the tenant. Audited, with the event as it was recorded.
"""

from __future__ import annotations

from server.domain.access import Caller
from server.domain.audit import AuditAction, AuditEntry
from server.domain.decimals import format_quantity
from server.domain.errors import InvalidArgument
from server.domain.events import CancelledEvent, check_id
from server.domain.requests import Once, Replayed
from server.metering.meters import MeterCatalog
from server.storage.corrections import CorrectionStore


def _entry(caller: Caller, event: CancelledEvent) -> AuditEntry:
    return AuditEntry(
        principal=caller.principal.subject,
        request_id=caller.request_id,
        action=AuditAction.USAGE_EVENT_CANCELLED,
        tenant_id=event.tenant_id,
        resource=f"tenants/{event.tenant_id}/events/{event.event_id}",
        before={
            "service": event.service,
            "usage_type": event.usage_type,
            "quantity": format_quantity(event.quantity),
            "event_time": event.event_time.isoformat(),
            "dimensions": dict(event.dimensions),
        },
        after={"cancel_time": event.cancel_time.isoformat()},
    )


class Corrections:
    def __init__(self, store: CorrectionStore, meters: MeterCatalog) -> None:
        self._store = store
        self._meters = meters

    async def cancel(
        self, tenant_id: str, event_id: str, caller: Caller, once: Once[CancelledEvent] | None
    ) -> CancelledEvent | Replayed:
        violations = [
            InvalidArgument.single(name, problem).violations[0]
            for name, value in (("tenant_id", tenant_id), ("event_id", event_id))
            if (problem := check_id(value))
        ]
        if violations:
            raise InvalidArgument(violations)
        caller.principal.require_tenant(tenant_id)
        # The meters of every usage type, fresh: an event must leave every meter that counted it.
        await self._meters.reload()
        return await self._store.cancel(
            tenant_id, event_id, self._meters.non_additive, lambda event: _entry(caller, event), once
        )
