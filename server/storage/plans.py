"""Queries on plans, plan versions, billing profiles and tenants' plan history.

Charges are stored as JSON (exact decimals as strings), in the shape of the domain's
charge models; this module is the one place that reads and writes that shape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from server.domain.charges import (
    Charge,
    ChargeModel,
    FeeTiming,
    FlatFee,
    Graduated,
    Package,
    PerUnit,
    Tier,
    Volume,
)
from server.domain.names import invoice_name
from server.domain.plans import (
    DEFAULT_PLAN,
    BillingProfile,
    Measures,
    MeterRef,
    Plan,
    PlanAssignment,
    PlanCharge,
    PlanVersion,
    PriceOverride,
    UsageTypeRef,
)


def _tiers_json(tiers: Sequence[Tier]) -> list[dict[str, Any]]:
    return [
        {
            "up_to": None if t.up_to is None else str(t.up_to),
            "unit_price": str(t.unit_price),
            "flat_fee": str(t.flat_fee),
        }
        for t in tiers
    ]


def model_json(model: ChargeModel) -> dict[str, Any]:
    """A charge model in its stored JSON shape (exact decimals as strings)."""
    match model:
        case PerUnit(unit_price=price):
            return {"per_unit": {"unit_price": str(price)}}
        case Graduated(tiers=tiers):
            return {"graduated": {"tiers": _tiers_json(tiers)}}
        case Volume(tiers=tiers):
            return {"volume": {"tiers": _tiers_json(tiers)}}
        case Package(size=size, price=price):
            return {"package": {"size": str(size), "price": str(price)}}
        case FlatFee(amount=amount, timing=timing):
            return {"flat_fee": {"amount": str(amount), "timing": timing.value}}
    raise AssertionError(f"unknown model {model!r}")


def _tiers(data: list[dict[str, Any]]) -> tuple[Tier, ...]:
    return tuple(
        Tier(
            None if t["up_to"] is None else Decimal(t["up_to"]),
            Decimal(t["unit_price"]),
            Decimal(t["flat_fee"]),
        )
        for t in data
    )


def model_of(data: dict[str, Any]) -> ChargeModel:
    """A charge model read back from its stored JSON shape."""
    ((kind, body),) = data.items()
    if kind == "per_unit":
        return PerUnit(Decimal(body["unit_price"]))
    if kind == "graduated":
        return Graduated(_tiers(body["tiers"]))
    if kind == "volume":
        return Volume(_tiers(body["tiers"]))
    if kind == "package":
        return Package(Decimal(body["size"]), Decimal(body["price"]))
    if kind == "flat_fee":
        return FlatFee(Decimal(body["amount"]), FeeTiming(body["timing"]))
    raise AssertionError(f"unknown model {kind!r}")


def _measures_json(measures: Measures | None) -> dict[str, str] | None:
    match measures:
        case None:
            return None
        case MeterRef(meter_id=meter_id):
            return {"meter": meter_id}
        case UsageTypeRef(service=service, usage_type=usage_type):
            return {"service": service, "usage_type": usage_type}


def _measures_of(data: dict[str, str] | None) -> Measures | None:
    if data is None:
        return None
    if "meter" in data:
        return MeterRef(data["meter"])
    return UsageTypeRef(data["service"], data["usage_type"])


def charges_json(charges: Sequence[PlanCharge]) -> str:
    """A plan version's charges as stored JSON text."""
    return json.dumps(
        [
            {
                "key": c.charge.key,
                "description": c.charge.description,
                "model": model_json(c.charge.model),
                "included_quantity": str(c.charge.included_quantity),
                "measures": _measures_json(c.measures),
            }
            for c in charges
        ]
    )


def charges_of(text: str) -> tuple[PlanCharge, ...]:
    """A plan version's charges read back from stored JSON text."""
    return tuple(
        PlanCharge(
            Charge(c["key"], c["description"], model_of(c["model"]), Decimal(c["included_quantity"])),
            _measures_of(c["measures"]),
        )
        for c in json.loads(text)
    )


def overrides_json(overrides: Sequence[PriceOverride]) -> str:
    """A billing profile's price overrides as stored JSON text."""
    return json.dumps(
        [
            {
                "charge_key": o.charge_key,
                "model": model_json(o.model),
                "included_quantity": str(o.included_quantity),
            }
            for o in overrides
        ]
    )


def overrides_of(text: str) -> tuple[PriceOverride, ...]:
    """A billing profile's price overrides read back from stored JSON text."""
    return tuple(
        PriceOverride(o["charge_key"], model_of(o["model"]), Decimal(o["included_quantity"]))
        for o in json.loads(text)
    )


_VERSION_COLUMNS = "plan_id, version, effective_from, charges::text AS charges, minimum, create_time"


def _version(row: asyncpg.Record) -> PlanVersion:
    return PlanVersion(
        plan_id=row["plan_id"],
        version=row["version"],
        effective_from=row["effective_from"],
        charges=charges_of(row["charges"]),
        minimum=row["minimum"],
        create_time=row["create_time"],
    )


async def versions(conn: asyncpg.Connection, plan_ids: Sequence[str]) -> dict[str, list[PlanVersion]]:
    """Every version of these plans, oldest first, per plan."""
    found: dict[str, list[PlanVersion]] = {plan_id: [] for plan_id in plan_ids}
    if plan_ids:
        for row in await conn.fetch(
            f"SELECT {_VERSION_COLUMNS} FROM plan_versions WHERE plan_id = ANY($1::text[])"
            " ORDER BY plan_id, effective_from",
            list(plan_ids),
        ):
            found[row["plan_id"]].append(_version(row))
    return found


async def plans(conn: asyncpg.Connection, after: str, limit: int) -> list[Plan]:
    """Plans in id order after `after`, with their versions."""
    rows = await conn.fetch(
        "SELECT id, display_name, currency, create_time FROM plans WHERE id > $1 ORDER BY id LIMIT $2",
        after,
        limit,
    )
    by_plan = await versions(conn, [r["id"] for r in rows])
    return [
        Plan(r["id"], r["display_name"], r["currency"], r["create_time"], tuple(by_plan[r["id"]]))
        for r in rows
    ]


async def insert_plan(conn: asyncpg.Connection, plan_id: str, display_name: str, currency: str) -> bool:
    """Create the plan row; False if the id is taken."""
    return bool(
        await conn.fetchval(
            "INSERT INTO plans (id, display_name, currency) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING true",
            plan_id,
            display_name,
            currency,
        )
    )


async def lock_plan(conn: asyncpg.Connection, plan_id: str) -> Plan | None:
    """The plan with its versions, its row locked (versions of one plan are added one at a time)."""
    return await get_plan(conn, plan_id, lock=True)


async def get_plan(conn: asyncpg.Connection, plan_id: str, *, lock: bool = False) -> Plan | None:
    """The plan with its versions, or None."""
    row = await conn.fetchrow(
        "SELECT id, display_name, currency, create_time FROM plans WHERE id = $1"
        + (" FOR UPDATE" if lock else ""),
        plan_id,
    )
    if row is None:
        return None
    return Plan(
        row["id"],
        row["display_name"],
        row["currency"],
        row["create_time"],
        tuple((await versions(conn, [plan_id]))[plan_id]),
    )


async def insert_version(
    conn: asyncpg.Connection,
    plan_id: str,
    version: int,
    effective_from: datetime,
    charges: Sequence[PlanCharge],
    minimum: Decimal,
) -> PlanVersion:
    """Store a plan version, inside the caller's transaction; the version as stored."""
    row = await conn.fetchrow(
        f"INSERT INTO plan_versions (plan_id, version, effective_from, charges, minimum)"
        f" VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING {_VERSION_COLUMNS}",
        plan_id,
        version,
        effective_from,
        charges_json(charges),
        minimum,
    )
    return _version(row)


async def billed_after(conn: asyncpg.Connection, plan_id: str, at: datetime) -> str | None:
    """The name of an invoice billed with this plan whose period ends after `at`, if any."""
    row = await conn.fetchrow(
        "SELECT tenant_id, id FROM invoices WHERE $1 = ANY(plan_ids) AND period_end > $2"
        " AND status IN ('finalized', 'paid', 'uncollectible') LIMIT 1",
        plan_id,
        at,
    )
    return None if row is None else invoice_name(row["tenant_id"], row["id"])


async def billed_usage_after(
    conn: asyncpg.Connection, service: str, usage_type: str, at: datetime
) -> str | None:
    """The name of an invoice billed with the rate card for this usage type in a period ending after `at`."""
    row = await conn.fetchrow(
        "SELECT i.tenant_id, i.id FROM invoices i JOIN invoice_line_items l ON l.invoice_id = i.id"
        " WHERE $3 = ANY(i.plan_ids) AND i.period_end > $4"
        " AND i.status IN ('finalized', 'paid', 'uncollectible')"
        " AND l.service = $1 AND l.usage_type = $2 AND l.charge_key = $1 || '/' || $2 LIMIT 1",
        service,
        usage_type,
        DEFAULT_PLAN,
        at,
    )
    return None if row is None else invoice_name(row["tenant_id"], row["id"])


async def tenant_billed_after(conn: asyncpg.Connection, tenant_id: str, at: datetime) -> str | None:
    """The name of a billed invoice of the tenant whose period ends after `at`, if any."""
    invoice_id: str | None = await conn.fetchval(
        "SELECT id FROM invoices WHERE tenant_id = $1 AND period_end > $2"
        " AND status IN ('finalized', 'paid', 'uncollectible') ORDER BY period_end DESC LIMIT 1",
        tenant_id,
        at,
    )
    return None if invoice_id is None else invoice_name(tenant_id, invoice_id)


_PROFILE_COLUMNS = (
    "tenant_id, display_name, email, currency, anchor_day, billing_start, tax_percentage, spend_threshold,"
    " overrides::text AS overrides, closed_until, create_time, update_time, next_close_time"
)


def _profile(row: asyncpg.Record, plan_id: str) -> BillingProfile:
    return BillingProfile(
        tenant_id=row["tenant_id"],
        display_name=row["display_name"],
        email=row["email"],
        currency=row["currency"],
        plan_id=plan_id,
        anchor_day=row["anchor_day"],
        billing_start=row["billing_start"],
        tax_percentage=row["tax_percentage"],
        spend_threshold=row["spend_threshold"],
        overrides=overrides_of(row["overrides"]),
        closed_until=row["closed_until"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        next_close_time=row["next_close_time"],
    )


async def profile(
    conn: asyncpg.Connection, tenant_id: str, *, lock: bool = False
) -> tuple[BillingProfile, list[PlanAssignment]] | None:
    """The tenant's profile (its plan: the latest assignment) and its plan history."""
    row = await conn.fetchrow(
        f"SELECT {_PROFILE_COLUMNS} FROM billing_profiles WHERE tenant_id = $1"
        + (" FOR UPDATE" if lock else ""),
        tenant_id,
    )
    if row is None:
        return None
    history = [
        PlanAssignment(r["effective_from"], r["plan_id"])
        for r in await conn.fetch(
            "SELECT effective_from, plan_id FROM tenant_plans WHERE tenant_id = $1 ORDER BY effective_from",
            tenant_id,
        )
    ]
    return _profile(row, history[-1].plan_id), history


async def profiles(
    conn: asyncpg.Connection, tenant_ids: Sequence[str]
) -> dict[str, tuple[BillingProfile, list[PlanAssignment]]]:
    """`profile` for many tenants at once (two statements); tenants without a profile are left out."""
    rows = await conn.fetch(
        f"SELECT {_PROFILE_COLUMNS} FROM billing_profiles WHERE tenant_id = ANY($1::text[])", list(tenant_ids)
    )
    history: dict[str, list[PlanAssignment]] = {r["tenant_id"]: [] for r in rows}
    for r in await conn.fetch(
        "SELECT tenant_id, effective_from, plan_id FROM tenant_plans WHERE tenant_id = ANY($1::text[])"
        " ORDER BY tenant_id, effective_from",
        list(history),
    ):
        history[r["tenant_id"]].append(PlanAssignment(r["effective_from"], r["plan_id"]))
    return {
        r["tenant_id"]: (_profile(r, history[r["tenant_id"]][-1].plan_id), history[r["tenant_id"]])
        for r in rows
    }


async def mark_closed_many(
    conn: asyncpg.Connection, closes: Sequence[tuple[str, datetime, datetime]]
) -> None:
    """mark_closed for many (tenant, closed_until, next_close_time) in one statement."""
    await conn.execute(
        "UPDATE billing_profiles b SET closed_until = c.closed_until, next_close_time = c.next_close_time"
        " FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])"
        "   AS c(tenant_id, closed_until, next_close_time)"
        " WHERE b.tenant_id = c.tenant_id",
        [tenant for tenant, _, _ in closes],
        [until for _, until, _ in closes],
        [due for _, _, due in closes],
    )


async def save_profile(conn: asyncpg.Connection, profile: BillingProfile, next_close_time: datetime) -> None:
    """Insert or update the profile (billing_start, anchor and closed_until are fixed at creation)."""
    await conn.execute(
        """INSERT INTO billing_profiles (tenant_id, display_name, email, currency, anchor_day, billing_start,
               tax_percentage, spend_threshold, overrides, closed_until, next_close_time)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $6, $10)
           ON CONFLICT (tenant_id) DO UPDATE SET
               display_name = excluded.display_name, email = excluded.email, currency = excluded.currency,
               tax_percentage = excluded.tax_percentage, spend_threshold = excluded.spend_threshold,
               overrides = excluded.overrides, update_time = now()""",
        profile.tenant_id,
        profile.display_name,
        profile.email,
        profile.currency,
        profile.anchor_day,
        profile.billing_start,
        profile.tax_percentage,
        profile.spend_threshold,
        overrides_json(profile.overrides),
        next_close_time,
    )


async def assign_plan(
    conn: asyncpg.Connection, tenant_id: str, effective_from: datetime, plan_id: str
) -> None:
    """Put the tenant on the plan from `effective_from`; later assignments are dropped (superseded)."""
    await conn.execute(
        "DELETE FROM tenant_plans WHERE tenant_id = $1 AND effective_from >= $2", tenant_id, effective_from
    )
    await conn.execute(
        "INSERT INTO tenant_plans (tenant_id, effective_from, plan_id) VALUES ($1, $2, $3)",
        tenant_id,
        effective_from,
        plan_id,
    )


async def postpone_close(conn: asyncpg.Connection, tenant_id: str, next_close_time: datetime) -> None:
    """Try the tenant's due close again at `next_close_time` (after a failure); the cursor stays."""
    await conn.execute(
        "UPDATE billing_profiles SET next_close_time = $2 WHERE tenant_id = $1", tenant_id, next_close_time
    )


async def mark_closed(
    conn: asyncpg.Connection, tenant_id: str, closed_until: datetime, next_close_time: datetime
) -> None:
    """Record that the tenant's periods are closed up to `closed_until`, and when the next close is due.

    Inside the caller's transaction: the one that generated and finalized the period's invoice.
    """
    await conn.execute(
        "UPDATE billing_profiles SET closed_until = $2, next_close_time = $3 WHERE tenant_id = $1",
        tenant_id,
        closed_until,
        next_close_time,
    )
