"""Queries on the rate card (table rates)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import asyncpg

from server.domain.audit import AuditEntry
from server.domain.lifecycle import period_finalized
from server.domain.models import Rate
from server.domain.requests import Once, Replayed
from server.storage import audit, plans, request_ids
from server.storage.database import run_with_retries

_FIRST_EFFECTIVE = """
SELECT service, usage_type, min(effective_from) AS first_effective FROM rates GROUP BY 1, 2
"""

# The rate of each usage type in effect at $1, after the page key ($2, $3).
_IN_EFFECT = """
SELECT * FROM (
    SELECT DISTINCT ON (service, usage_type)
           service, usage_type, effective_from, unit_price, currency, created_at
    FROM rates
    WHERE effective_from <= $1
    ORDER BY service, usage_type, effective_from DESC
) current
WHERE (service, usage_type) > ($2, $3)
ORDER BY service, usage_type
LIMIT $4
"""

_HISTORY = """
SELECT service, usage_type, effective_from, unit_price, currency, created_at
FROM rates
WHERE (service, usage_type, effective_from) > ($1, $2, $3)
ORDER BY service, usage_type, effective_from
LIMIT $4
"""

_UPSERT = """
INSERT INTO rates AS r (service, usage_type, effective_from, unit_price, currency)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (service, usage_type, effective_from) DO UPDATE
    SET unit_price = excluded.unit_price, currency = excluded.currency, created_at = now()
RETURNING service, usage_type, effective_from, unit_price, currency, created_at
"""


# The rate of a usage type in effect at $3: the one a new rate from $3 on replaces or follows.
_IN_EFFECT_AT = """
SELECT service, usage_type, effective_from, unit_price, currency, created_at
FROM rates
WHERE service = $1 AND usage_type = $2 AND effective_from <= $3
ORDER BY effective_from DESC
LIMIT 1
"""


def _rate(row: asyncpg.Record) -> Rate:
    return Rate(
        service=row["service"],
        usage_type=row["usage_type"],
        unit_price=row["unit_price"],
        currency=row["currency"],
        effective_from=row["effective_from"],
        created_at=row["created_at"],
    )


class RateStore:
    """The RateBook of server.domain.stores on PostgreSQL: the rates table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def first_effective_times(self) -> dict[tuple[str, str], datetime]:
        """When each usage type's first rate took effect: the usage types on the rate card."""

        async def attempt() -> dict[tuple[str, str], datetime]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_FIRST_EFFECTIVE)
            return {(r["service"], r["usage_type"]): r["first_effective"] for r in rows}

        return await run_with_retries(attempt)

    async def in_effect(self, at: datetime, after: tuple[str, str], limit: int) -> list[Rate]:
        """The rate of each usage type in effect at `at`, after the page key (service, usage_type)."""

        async def attempt() -> list[Rate]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_IN_EFFECT, at, after[0], after[1], limit)
            return [_rate(row) for row in rows]

        return await run_with_retries(attempt)

    async def history(self, after: tuple[str, str, datetime], limit: int) -> list[Rate]:
        """Every rate ever set, after the page key (service, usage_type, effective_from), in that order."""

        async def attempt() -> list[Rate]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_HISTORY, *after, limit)
            return [_rate(row) for row in rows]

        return await run_with_retries(attempt)

    async def upsert(
        self,
        service: str,
        usage_type: str,
        effective_from: datetime | None,
        default_effective_from: tuple[datetime, datetime],
        unit_price: Decimal,
        currency: str,
        audit_entry: Callable[[Rate | None, Rate], AuditEntry],
        once: Once[Rate] | None = None,
    ) -> Rate | Replayed:
        """Set a rate. With no effective time, a new usage type gets default[0], a known one default[1].

        The choice is made under a lock on the usage type so that two concurrent
        first rates of a new type cannot both take the "new type" default. The audit
        entry, made from the rate in effect before and the rate set, is written in the
        same transaction, and so is the response for `once`'s key: a call with a key
        already claimed returns the stored response and changes nothing.
        """

        async def attempt() -> Rate | Replayed:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('rate:' || $1 || '/' || $2, 0))",
                    service,
                    usage_type,
                )
                if once is not None and (stored := await request_ids.claim(conn, once.key)) is not None:
                    return Replayed(stored)
                effective = effective_from
                if effective is None:
                    known = await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM rates WHERE service = $1 AND usage_type = $2)",
                        service,
                        usage_type,
                    )
                    effective = default_effective_from[1] if known else default_effective_from[0]
                # The rate card is the default plan: no change inside a period it has billed
                # this usage type in.
                if billed := await plans.billed_usage_after(conn, service, usage_type, effective):
                    raise period_finalized(billed)
                before = await conn.fetchrow(_IN_EFFECT_AT, service, usage_type, effective)
                rate = _rate(
                    await conn.fetchrow(_UPSERT, service, usage_type, effective, unit_price, currency)
                )
                await audit.append(conn, audit_entry(None if before is None else _rate(before), rate))
                if once is not None:
                    await request_ids.complete(conn, once.key, once.encode(rate))
                return rate

        return await run_with_retries(attempt)
