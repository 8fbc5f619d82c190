"""An in-memory view of which usage types the rate card prices, for validating events fast.

Ingestion checks every event's (service, usage_type) against this cache instead of the
database. A usage type added by SetRate in this process is visible at once; one added
through another process is picked up on the first miss (at most one reload per
`min_reload_seconds`, so a flood of unknown types cannot turn into a flood of queries),
and in any case once the cache is `max_age_seconds` old (an earlier first rate set
elsewhere changes which event times are accepted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from server.domain.stores import RateBook
from server.domain.timeutil import to_micros


class RateCardCache:
    def __init__(
        self,
        store: RateBook,
        *,
        min_reload_seconds: float = 1.0,
        max_age_seconds: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._min_reload_seconds = min_reload_seconds
        self._max_age_seconds = max_age_seconds
        self._monotonic = monotonic
        self._first_effective: dict[tuple[str, str], int] = {}
        self._loaded_at = float("-inf")

    async def reload(self) -> None:
        times = await self._store.first_effective_times()
        self._first_effective = {key: to_micros(value) for key, value in times.items()}
        self._loaded_at = self._monotonic()

    async def ensure_current(self, usage_types: Iterable[tuple[str, str]]) -> None:
        """Reload if the cache is old, or one of these types is unknown and the cache is not brand new."""
        age = self._monotonic() - self._loaded_at
        if age >= self._max_age_seconds or (
            age >= self._min_reload_seconds and any(key not in self._first_effective for key in usage_types)
        ):
            await self.reload()

    def first_effective(self, service: str, usage_type: str) -> int | None:
        return self._first_effective.get((service, usage_type))

    def note_rate(self, service: str, usage_type: str, effective_micros: int) -> None:
        """Record a rate just set in this process."""
        key = (service, usage_type)
        current = self._first_effective.get(key)
        if current is None or effective_micros < current:
            self._first_effective[key] = effective_micros
