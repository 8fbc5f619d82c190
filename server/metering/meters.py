"""The meter catalog: the use cases behind MeterService, and the meters ingestion matches.

Ingestion matches every batch against an in-memory map of the active non-additive meters
(server.domain.meters.MeterMap). A meter created in this process is in the map at once; one
created through another process is picked up within `max_age_seconds` (the map is
reloaded when that old, before the next batch is validated), so "a meter counts the
events recorded after its creation" holds to within that delay across processes.

Which events are accepted stays the rate card's decision (every recorded event is
billed, and an invoice fails for usage without a rate), so a meter may only read a
priced (service, usage_type): every event a meter reads is valid, and every valid event
is read by its usage type's SUM (the rollups; the seven defaults are also meter resources).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.domain.access import Caller
from server.domain.audit import AuditAction, AuditEntry, State
from server.domain.errors import InvalidArgument
from server.domain.meters import Meter, MeterMap, MeterSpec, check_spec, meter_name, parse_meter_name
from server.domain.pagination import PageTokens, TextPart, check_page_size
from server.domain.requests import Once, Replayed
from server.domain.stores import MeterBook
from server.ratecard import RateCardCache
from server.storage.meters import not_found

MAX_SUMMARY_METERS = 20
_METER_ID = TextPart(63)


@dataclass(frozen=True, slots=True)
class Page:
    meters: list[Meter]
    next_page_token: str


def meter_state(meter: Meter) -> State:
    spec = meter.spec
    return {
        "meter_id": spec.meter_id,
        "service": spec.service,
        "usage_type": spec.usage_type,
        "aggregation": spec.aggregation.value,
        "filter": dict(spec.filter),
        "value_dimension": spec.value_dimension,
        "group_by_dimensions": list(spec.group_by),
        "state": meter.state.value,
    }


class MeterCatalog:
    def __init__(
        self,
        store: MeterBook,
        rate_card: RateCardCache,
        page_tokens: PageTokens,
        *,
        max_age_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._rate_card = rate_card
        self._page_tokens = page_tokens
        self._max_age = max_age_seconds
        self._monotonic = monotonic
        self._meters: dict[str, Meter] = {}
        self._map = MeterMap(())
        self._loaded_at = float("-inf")

    async def reload(self) -> None:
        self._install(await self._store.all())

    def _install(self, meters: Sequence[Meter]) -> None:
        self._meters = {meter.spec.meter_id: meter for meter in meters}
        self._map = MeterMap(self._meters.values())
        self._loaded_at = self._monotonic()

    def _note(self, meter: Meter) -> None:
        """A meter just created or archived in this process: in force for the next batch."""
        self._meters[meter.spec.meter_id] = meter
        self._map = MeterMap(self._meters.values())

    async def ensure_current(self) -> None:
        if self._monotonic() - self._loaded_at >= self._max_age:
            await self.reload()

    def active_map(self) -> MeterMap:
        return self._map

    def non_additive(self, service: str, usage_type: str) -> list[Meter]:
        """Every meter of the usage type that stores per-event data, archived ones included."""
        return [
            meter
            for meter in self._meters.values()
            if meter.spec.service == service
            and meter.spec.usage_type == usage_type
            and not meter.spec.aggregation.additive
        ]

    async def resolve(self, names: Sequence[str], dimension: str) -> list[Meter]:
        """The named meters, in name order, for a summary grouped by `dimension`."""
        if len(names) > MAX_SUMMARY_METERS:
            raise InvalidArgument.single("meters", f"lists more than {MAX_SUMMARY_METERS} meters")
        ids = sorted({parse_meter_name(name, f"meters[{i}]") for i, name in enumerate(names)})
        if any(meter_id not in self._meters for meter_id in ids):
            await self.reload()
        meters = []
        for meter_id in ids:
            meter = self._meters.get(meter_id)
            if meter is None:
                raise not_found(meter_id)
            if not meter.may_group_by(dimension):
                raise InvalidArgument.single(
                    "group_by_dimension",
                    f"{meter.name} can be grouped only by one of its group_by_dimensions "
                    f"({', '.join(meter.spec.group_by) or 'none'})",
                )
            meters.append(meter)
        return meters

    async def create(self, spec: MeterSpec, caller: Caller, once: Once[Meter] | None) -> Meter | Replayed:
        caller.principal.require_all_tenants("defining a meter")
        check_spec(spec)
        await self._rate_card.ensure_current([(spec.service, spec.usage_type)])
        if self._rate_card.first_effective(spec.service, spec.usage_type) is None:
            raise InvalidArgument.single(
                "meter.usage_type",
                f"{spec.service}/{spec.usage_type} is not on the rate card: every recorded event is billed,"
                " so set its rate first (BillingService.SetRate)",
            )

        def entry(meter: Meter) -> AuditEntry:
            return AuditEntry(
                caller.principal.subject,
                caller.request_id,
                AuditAction.METER_CREATED,
                "",
                meter.name,
                None,
                meter_state(meter),
            )

        result = await self._store.create(spec, entry, once)
        if isinstance(result, Meter):
            self._note(result)
        return result

    async def get(self, name: str) -> Meter:
        return await self._store.get(parse_meter_name(name))

    async def list(self, page_size: int, page_token: str) -> Page:
        limit = check_page_size(page_size, default=100, maximum=1_000)
        last = self._page_tokens.decode(page_token, "meters", (_METER_ID,))
        meters = await self._store.page(last[0] if last else "", limit + 1)
        next_token = ""
        if len(meters) > limit:
            meters = meters[:limit]
            next_token = self._page_tokens.encode("meters", [meters[-1].spec.meter_id])
        return Page(meters, next_token)

    async def archive(self, name: str, caller: Caller, once: Once[Meter] | None) -> Meter | Replayed:
        meter_id = parse_meter_name(name)
        caller.principal.require_all_tenants("archiving a meter")

        def entry(before: Meter, after: Meter) -> AuditEntry:
            return AuditEntry(
                caller.principal.subject,
                caller.request_id,
                AuditAction.METER_ARCHIVED,
                "",
                meter_name(meter_id),
                meter_state(before),
                meter_state(after),
            )

        result = await self._store.archive(meter_id, entry, once)
        if isinstance(result, Meter):
            self._note(result)
        return result
