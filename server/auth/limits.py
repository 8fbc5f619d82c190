"""Rate limits and stream slots, in memory in each server process (shared: server.auth.sharing).

Token buckets: each key (a tenant or a principal) has a bucket holding up to one second
of its rate, refilled continuously. A unary call takes its tokens only if every bucket
involved has them (`try_take`), otherwise it is refused with the time after which a
retry can succeed. A stream takes what its batch needs even if that drives the buckets
into debt (`take`), and then waits for the debt to be repaid before it reads the next
message, so that gRPC flow control slows the client down instead of failing it.

Each process decides alone, at once, from its own buckets; server.auth.sharing settles
them with the other processes' through PostgreSQL several times a second (what each spent
goes to a shared bucket, whose balance comes back), so that a limit holds for all
processes together. Without sharing, limits are per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from server.config import LimitSettings
from server.domain.errors import ErrorReason, ResourceExhausted

MAX_BUCKETS = 100_000
# The limits' resolution: a wait shorter than this is none. Settled through PostgreSQL
# (server.auth.sharing), a balance carries the rounding of wall-clock seconds held in a
# double (2**-22 s, about 0.24 microseconds, until 2038): a caller who waited exactly the
# advertised delay, or a stream whose debt the clock has just repaid, would otherwise find
# a few millionths of a token missing and wait again (for ever, on a test's stopped clock).
RESOLUTION_SECONDS = 1e-6


class LimitClock(Protocol):
    """The limits' time, both readings from one clock, so that a test's fake clock governs all of it.

    Calling it gives seconds on a monotonic scale, by which the buckets refill; wall() gives
    seconds since the epoch that move with it, which the buckets shared with other processes
    carry (server.auth.sharing) and which must be comparable between hosts. Reading the two
    from different clocks mixes time domains: a fake-clock limiter whose shared buckets
    refilled in real time.
    """

    def __call__(self) -> float:
        """Seconds on a monotonic scale, by which the buckets refill."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch that move with the monotonic reading (for the shared buckets)."""
        ...


class SystemClock:
    """The real clocks: time.monotonic for the buckets, time.time for the shared rows."""

    def __call__(self) -> float:
        """time.monotonic(), by which the buckets refill."""
        return time.monotonic()

    def wall(self) -> float:
        """time.time(), carried by the buckets shared with other processes."""
        return time.time()


SYSTEM_CLOCK = SystemClock()


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per key, all with the same rate; capacity is one second of that rate."""

    def __init__(self, name: str, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.rate = rate
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        # For server.auth.sharing: what was taken since the last settlement and when the
        # first of it was taken, and when each key was last asked about (a refused key must
        # learn the shared balance too).
        self.unsettled: dict[str, float] = {}
        self.unsettled_since: dict[str, float] = {}
        self.asked: dict[str, float] = {}

    @property
    def unlimited(self) -> bool:
        """True if the rate is 0 or less: nothing is limited and no bucket is kept."""
        return self.rate <= 0

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(self.rate, now)
        else:
            bucket.tokens = min(self.rate, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        return bucket

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: a fresh bucket is the same, so nothing is lost."""
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * self.rate >= self.rate:
                del self._buckets[key]

    def wait_for(self, key: str, amount: float) -> float:
        """Seconds until `amount` tokens are available for `key` (0 if they are now)."""
        if self.unlimited:
            return 0.0
        now = self._clock()
        self.asked[key] = now
        bucket = self._bucket(key, now)
        # A request larger than the capacity can never be covered at once; it waits for a full bucket.
        wait = (min(amount, self.rate) - bucket.tokens) / self.rate
        return wait if wait >= RESOLUTION_SECONDS else 0.0

    def remove(self, key: str, amount: float) -> None:
        """Take `amount` tokens from the bucket of `key`, into debt if need be (noted for settling)."""
        if not self.unlimited:
            now = self._clock()
            self._bucket(key, now).tokens -= amount
            self.unsettled[key] = self.unsettled.get(key, 0.0) + amount
            self.unsettled_since.setdefault(key, now)
            self.asked[key] = now

    def settled(self, key: str, shared_tokens: float) -> None:
        """Take the shared balance as this bucket's, less what was taken here since it was read."""
        bucket = self._bucket(key, self._clock())
        bucket.tokens = shared_tokens - self.unsettled.get(key, 0.0)

    def debt_seconds(self, key: str) -> float:
        """Seconds until the bucket of `key` is no longer in debt."""
        if self.unlimited:
            return 0.0
        bucket = self._bucket(key, self._clock())
        wait = -bucket.tokens / self.rate
        return wait if wait >= RESOLUTION_SECONDS else 0.0


@dataclass(frozen=True, slots=True)
class Charge:
    """An amount to take from one key's bucket."""

    buckets: TokenBuckets
    key: str
    amount: float


def try_take(charges: Iterable[Charge]) -> None:
    """Take every charge, or none of them and raise ResourceExhausted with the retry delay."""
    charges = list(charges)
    worst: tuple[float, Charge] | None = None
    for charge in charges:
        wait = charge.buckets.wait_for(charge.key, charge.amount)
        if wait > 0 and (worst is None or wait > worst[0]):
            worst = (wait, charge)
    if worst is not None:
        wait, charge = worst
        raise ResourceExhausted(
            f"rate limit of {charge.buckets.rate:g} {charge.buckets.name} per second reached",
            retry_after_seconds=wait,
            subject=charge.key,
            limit=charge.buckets.name,
        )
    for charge in charges:
        charge.buckets.remove(charge.key, charge.amount)


def take(charges: Iterable[Charge]) -> float:
    """Take every charge even into debt; return the seconds to wait before the next message."""
    charges = list(charges)
    for charge in charges:
        charge.buckets.remove(charge.key, charge.amount)
    return debt_seconds(charges)


def debt_seconds(charges: Iterable[Charge]) -> float:
    """Seconds until no bucket of these charges is in debt (0 if none is now)."""
    return max((charge.buckets.debt_seconds(charge.key) for charge in charges), default=0.0)


class StreamSlots:
    """At most `limit` concurrent streams per principal (here and, with sharing, in other processes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self.elsewhere: dict[str, int] = {}  # other processes' open streams, as last settled

    @property
    def open(self) -> dict[str, int]:
        """Open streams per principal in this process."""
        return dict(self._open)

    def acquire(self, subject: str) -> None:
        """Count a new stream of `subject`; ResourceExhausted (STREAM_LIMIT_REACHED) if it has its limit.

        The limit counts the principal's streams here and, as last settled, in other processes.
        """
        count = self._open.get(subject, 0)
        if self.limit > 0 and count + self.elsewhere.get(subject, 0) >= self.limit:
            raise ResourceExhausted(
                f"at most {self.limit} concurrent streams per principal",
                retry_after_seconds=1.0,
                subject=subject,
                limit="streams",
                reason=ErrorReason.STREAM_LIMIT_REACHED,
            )
        self._open[subject] = count + 1

    def release(self, subject: str) -> None:
        """Count a stream of `subject` as ended; call it once per successful acquire."""
        count = self._open.get(subject, 0) - 1
        if count > 0:
            self._open[subject] = count
        else:
            self._open.pop(subject, None)


class Limiter:
    """The limits as one server process sees them: request and event buckets per tenant and per principal."""

    def __init__(self, settings: LimitSettings, clock: LimitClock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.clock = clock  # server.auth.sharing settles on it too
        self.tenant_requests = TokenBuckets("requests", settings.tenant_requests_per_second, clock)
        self.principal_requests = TokenBuckets("requests", settings.principal_requests_per_second, clock)
        self.tenant_events = TokenBuckets("events", settings.tenant_events_per_second, clock)
        self.principal_events = TokenBuckets("events", settings.principal_events_per_second, clock)
        self.streams = StreamSlots(settings.max_streams_per_principal)

    @property
    def buckets(self) -> tuple[TokenBuckets, ...]:
        """The four kinds of bucket: requests and events, per tenant and per principal."""
        return (self.tenant_requests, self.principal_requests, self.tenant_events, self.principal_events)

    @property
    def unlimited(self) -> bool:
        """No rate and no stream limit: nothing to share with other processes."""
        return self.streams.limit <= 0 and all(b.unlimited for b in self.buckets)

    def request(self, subject: str, tenant_id: str | None) -> None:
        """Admit one call of a principal, about one tenant (if the call names one it may act for)."""
        charges = [Charge(self.principal_requests, f"principal:{subject}", 1)]
        if tenant_id is not None:
            charges.append(Charge(self.tenant_requests, f"tenant:{tenant_id}", 1))
        try_take(charges)

    def event_charges(self, subject: str, total: int, per_tenant: Mapping[str, int]) -> list[Charge]:
        """`total` events of a principal, `per_tenant` of them for tenants it may act for."""
        charges = [Charge(self.principal_events, f"principal:{subject}", total)]
        charges += [Charge(self.tenant_events, f"tenant:{t}", n) for t, n in sorted(per_tenant.items())]
        return charges
