"""Plans and billing profiles: CreatePlan, GetPlan, ListPlans, CreatePlanVersion, Set/GetBillingProfile.

Plans are shared by every tenant, so changing them needs an all-tenants principal, as the
rate card does. The default plan is the rate card itself: it is shown, not stored, and
SetRate edits it. No change takes effect inside a period that an invoice has billed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from server.billing.service import Page
from server.domain.access import Caller, Principal
from server.domain.audit import AuditAction, AuditEntry, State
from server.domain.charges import Charge, PerUnit
from server.domain.currencies import currency_of
from server.domain.decimals import (
    PERCENT_FRACTION_DIGITS,
    PERCENT_INTEGER_DIGITS,
    PRICE_FRACTION_DIGITS,
    PRICE_INTEGER_DIGITS,
    check_decimal,
    format_quantity,
)
from server.domain.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from server.domain.events import check_id
from server.domain.lifecycle import period_finalized
from server.domain.names import plan_name
from server.domain.pagination import NAME, PageTokens, check_page_size
from server.domain.period_pricing import PlanTerms, Tax
from server.domain.plans import (
    DEFAULT_PLAN,
    MAX_DISPLAY_NAME_CHARS,
    BillingProfile,
    Plan,
    PlanCharge,
    PlanVersion,
    PriceOverride,
    UsageTypeRef,
    billing_period,
    check_meter_refs,
    check_overrides,
    check_plan_id,
    meter_ids_of,
)
from server.domain.requests import Once, Replayed
from server.domain.stores import PlanTransaction, RateBook, Transactions
from server.domain.timeutil import EPOCH, MICROS_PER_HOUR, is_whole_hour, next_hour, to_datetime

MAX_EMAIL_CHARS = 254


@dataclass(frozen=True, slots=True)
class ProfileInput:
    """A SetBillingProfile request, as plain values (None: not given)."""

    tenant_id: str
    display_name: str
    email: str
    currency: str
    plan_id: str
    plan_effective_micros: int | None
    anchor_day: int
    billing_start_micros: int | None
    tax_percentage: str
    spend_threshold: str
    overrides: tuple[PriceOverride, ...]


def plan_not_found(plan_id: str) -> NotFound:
    """NotFound (PLAN_NOT_FOUND) naming the plan id (cut to 80 characters)."""
    return NotFound(f"plan {plan_id[:80]!r} not found", reason=ErrorReason.PLAN_NOT_FOUND)


def _hour(micros: int | None, field: str, default: int) -> datetime:
    if micros is None:
        return to_datetime(default)
    if micros < 0 or not is_whole_hour(micros):
        raise InvalidArgument.single(field, "must be a whole UTC hour, not before 1970")
    return to_datetime(micros)


def _amount(text: str, field: str) -> Decimal:
    if not text:
        return Decimal(0)
    if problem := check_decimal(
        text, max_integer_digits=PRICE_INTEGER_DIGITS, max_fraction_digits=PRICE_FRACTION_DIGITS
    ):
        raise InvalidArgument.single(field, problem)
    return Decimal(text)


def version_state(version: PlanVersion) -> State:
    """A plan version as recorded in an audit entry's after: its charge keys, minimum as a string."""
    return {
        "plan": plan_name(version.plan_id),
        "version": version.version,
        "effective_time": version.effective_from.isoformat(),
        "charges": [c.charge.key for c in version.charges],
        "minimum_amount": format_quantity(version.minimum),
    }


def profile_state(profile: BillingProfile) -> State:
    """A billing profile as recorded in an audit entry's before and after: decimals as strings."""
    return {
        "display_name": profile.display_name,
        "email": profile.email,
        "currency_code": profile.currency,
        "plan": plan_name(profile.plan_id),
        "billing_anchor_day": profile.anchor_day,
        "billing_start_time": profile.billing_start.isoformat(),
        "tax_percentage": "" if profile.tax_percentage is None else format_quantity(profile.tax_percentage),
        "spend_threshold": ""
        if profile.spend_threshold is None
        else format_quantity(profile.spend_threshold),
        "price_overrides": [o.charge_key for o in profile.overrides],
    }


class Plans:
    """The use cases of plans and billing profiles (see the module docstring).

    `default_currency` is the rate card's, the currency of the default plan; `grace` is the
    delay after a period's end before it closes, which sets a new profile's first close.
    """

    def __init__(
        self,
        plans: Transactions[PlanTransaction],
        rates: RateBook,
        page_tokens: PageTokens,
        now_micros: Callable[[], int],
        default_currency: str,
        grace: timedelta,
    ) -> None:
        self._plans = plans
        self._rates = rates
        self._page_tokens = page_tokens
        self._now_micros = now_micros
        self._default_currency = default_currency
        self._grace = grace

    # --- plans ---------------------------------------------------------------------

    async def default_plan(self) -> Plan:
        """The rate card in effect now, as a plan of per-unit charges keyed "service/usage_type"."""
        now = to_datetime(self._now_micros())
        rates = await self._rates.in_effect(now, ("", ""), 100_000)
        charges = tuple(
            PlanCharge(
                Charge(f"{r.service}/{r.usage_type}", "", PerUnit(r.unit_price)),
                UsageTypeRef(r.service, r.usage_type),
            )
            for r in rates
        )
        since = max((r.effective_from for r in rates), default=EPOCH)
        version = PlanVersion(DEFAULT_PLAN, 1, since, charges, Decimal(0), since)
        return Plan(DEFAULT_PLAN, "Default plan (the rate card)", self._default_currency, EPOCH, (version,))

    async def get_plan(self, plan_id: str) -> Plan:
        """One plan with its versions; the default plan is built from the rate card."""
        if plan_id == DEFAULT_PLAN:
            return await self.default_plan()
        if check_plan_id(plan_id):
            raise plan_not_found(plan_id)

        async def work(tx: PlanTransaction) -> Plan | None:
            return await tx.get_plan(plan_id)

        plan = await self._plans.run_read(work)
        if plan is None:
            raise plan_not_found(plan_id)
        return plan

    async def list_plans(self, page_size: int, page_token: str) -> Page[Plan]:
        """The plans in id order, the default plan first; one page."""
        limit = check_page_size(page_size, default=50, maximum=500)
        last = self._page_tokens.decode(page_token, "plans", (NAME,))
        after = last[0] if last else ""
        items: list[Plan] = []
        if not last:
            items.append(await self.default_plan())

        async def work(tx: PlanTransaction) -> list[Plan]:
            return await tx.plans(after, limit + 1 - len(items))

        items += await self._plans.run_read(work)
        next_token = ""
        if len(items) > limit:
            items = items[:limit]
            next_token = self._page_tokens.encode("plans", [items[-1].plan_id])
        return Page(items, next_token)

    def _terms(self, currency: str, charges: Sequence[PlanCharge], minimum: str) -> Decimal:
        value = _amount(minimum, "minimum_amount")
        PlanTerms(currency_of(currency), tuple(c.charge for c in charges), value)
        return value

    async def create_plan(
        self,
        plan_id: str,
        display_name: str,
        currency: str,
        charges: Sequence[PlanCharge],
        minimum: str,
        effective_micros: int | None,
        caller: Caller,
        once: Once[Plan] | None = None,
    ) -> Plan | Replayed:
        """Create a plan with its first version, audited; needs a token for all tenants.

        AlreadyExists for an id in use; the first version takes effect at `effective_micros`
        (a whole hour; None: the start of the current hour).
        """
        caller.principal.require_all_tenants("creating a plan")
        violations: list[FieldViolation] = []
        if problem := check_plan_id(plan_id):
            violations.append(FieldViolation("plan_id", problem))
        elif plan_id == DEFAULT_PLAN:
            violations.append(FieldViolation("plan_id", "'default' is the rate card's plan"))
        if not display_name or len(display_name) > MAX_DISPLAY_NAME_CHARS:
            violations.append(
                FieldViolation("display_name", f"must be 1 to {MAX_DISPLAY_NAME_CHARS} characters")
            )
        if violations:
            raise InvalidArgument(violations)
        currency_of(currency)
        minimum_value = self._terms(currency, charges, minimum)
        effective = _hour(
            effective_micros, "effective_time", self._now_micros() // MICROS_PER_HOUR * MICROS_PER_HOUR
        )

        async def work(tx: PlanTransaction) -> Plan | Replayed:
            if once is not None and (stored := await tx.claim(once.key)) is not None:
                return Replayed(stored)
            check_meter_refs(charges, await tx.meter_states(meter_ids_of(charges)))
            if not await tx.insert_plan(plan_id, display_name, currency):
                raise AlreadyExists(
                    f"plan {plan_id!r} exists already",
                    reason=ErrorReason.PLAN_EXISTS,
                    metadata={"plan": plan_name(plan_id)},
                )
            version = await tx.insert_version(plan_id, 1, effective, charges, minimum_value)
            plan = await tx.lock_plan(plan_id)
            assert plan is not None
            await tx.append_audit(
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=AuditAction.PLAN_CREATED,
                    tenant_id="",
                    resource=plan_name(plan_id),
                    before=None,
                    after={
                        "display_name": display_name,
                        "currency_code": currency,
                        **version_state(version),
                    },
                )
            )
            if once is not None:
                await tx.complete(once.key, once.encode(plan))
            return plan

        return await self._plans.run_in_transaction(work)

    async def create_version(
        self,
        plan_id: str,
        charges: Sequence[PlanCharge],
        minimum: str,
        effective_micros: int | None,
        caller: Caller,
        once: Once[Plan] | None = None,
    ) -> Plan | Replayed:
        """Add a version to a plan from `effective_micros` on (None: the next hour), audited.

        The time must be after the latest version's (InvalidArgument). FailedPrecondition for
        the default plan (PLAN_READ_ONLY) and for a time inside a period an invoice has billed
        with the plan (PERIOD_FINALIZED).
        """
        caller.principal.require_all_tenants("changing a plan")
        if plan_id == DEFAULT_PLAN:
            raise FailedPrecondition(
                "the default plan is the rate card: change it with SetRate", reason=ErrorReason.PLAN_READ_ONLY
            )
        effective = _hour(effective_micros, "effective_time", next_hour(self._now_micros()))

        async def work(tx: PlanTransaction) -> Plan | Replayed:
            if once is not None and (stored := await tx.claim(once.key)) is not None:
                return Replayed(stored)
            plan = await tx.lock_plan(plan_id) if not check_plan_id(plan_id) else None
            if plan is None:
                raise plan_not_found(plan_id)
            minimum_value = self._terms(plan.currency, charges, minimum)
            check_meter_refs(charges, await tx.meter_states(meter_ids_of(charges)))
            latest = plan.versions[-1]
            if effective <= latest.effective_from:
                raise InvalidArgument.single(
                    "effective_time",
                    f"must be after the latest version's ({latest.effective_from.isoformat()})",
                )
            if billed := await tx.billed_after(plan_id, effective):
                raise period_finalized(billed)
            version = await tx.insert_version(plan_id, latest.version + 1, effective, charges, minimum_value)
            updated = await tx.lock_plan(plan_id)
            assert updated is not None
            await tx.append_audit(
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=AuditAction.PLAN_VERSION_CREATED,
                    tenant_id="",
                    resource=plan_name(plan_id),
                    before=version_state(latest),
                    after=version_state(version),
                )
            )
            if once is not None:
                await tx.complete(once.key, once.encode(updated))
            return updated

        return await self._plans.run_in_transaction(work)

    # --- billing profiles ----------------------------------------------------------

    async def get_profile(self, tenant_id: str, principal: Principal) -> BillingProfile:
        """The tenant's billing profile; NotFound (BILLING_PROFILE_NOT_FOUND) if it has none."""
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("name", problem)
        principal.require_tenant(tenant_id)

        async def work(tx: PlanTransaction) -> BillingProfile | None:
            found = await tx.profile(tenant_id)
            return None if found is None else found[0]

        profile = await self._plans.run_read(work)
        if profile is None:
            raise NotFound("the tenant has no billing profile", reason=ErrorReason.BILLING_PROFILE_NOT_FOUND)
        return profile

    async def set_profile(
        self, given: ProfileInput, caller: Caller, once: Once[BillingProfile] | None = None
    ) -> BillingProfile | Replayed:
        """Create or replace the tenant's billing profile, audited.

        Checks every field at once (InvalidArgument names each), then, under the tenant's
        invoice lock, the plan, its currency and the overrides against its charges.
        """
        tenant_id = given.tenant_id
        if problem := check_id(tenant_id):
            raise InvalidArgument.single("billing_profile.name", problem)
        caller.principal.require_tenant(tenant_id)
        violations: list[FieldViolation] = []
        field = "billing_profile."
        if not given.display_name or len(given.display_name) > MAX_DISPLAY_NAME_CHARS:
            violations.append(
                FieldViolation(f"{field}display_name", f"must be 1 to {MAX_DISPLAY_NAME_CHARS} characters")
            )
        if len(given.email) > MAX_EMAIL_CHARS or (given.email and "@" not in given.email):
            violations.append(
                FieldViolation(f"{field}email", "must be an e-mail address of at most 254 characters")
            )
        if not 0 <= given.anchor_day <= 31:
            violations.append(FieldViolation(f"{field}billing_anchor_day", "must be 1 to 31 (0: 1)"))
        tax: Decimal | None = None
        if given.tax_percentage:
            if problem := check_decimal(
                given.tax_percentage,
                max_integer_digits=PERCENT_INTEGER_DIGITS,
                max_fraction_digits=PERCENT_FRACTION_DIGITS,
            ):
                violations.append(FieldViolation(f"{field}tax_percentage", problem))
            else:
                try:
                    tax = Tax("", Decimal(given.tax_percentage)).percentage
                except InvalidArgument as exc:
                    violations += [
                        FieldViolation(f"{field}tax_percentage", v.description) for v in exc.violations
                    ]
        threshold: Decimal | None = None
        if given.spend_threshold:
            if problem := check_decimal(
                given.spend_threshold,
                max_integer_digits=PRICE_INTEGER_DIGITS,
                max_fraction_digits=PRICE_FRACTION_DIGITS,
            ):
                violations.append(FieldViolation(f"{field}spend_threshold", problem))
            elif Decimal(given.spend_threshold) <= 0:
                violations.append(FieldViolation(f"{field}spend_threshold", "must be greater than 0"))
            else:
                threshold = Decimal(given.spend_threshold)
        plan_id = given.plan_id or DEFAULT_PLAN
        if plan_id != DEFAULT_PLAN and check_plan_id(plan_id):
            violations.append(FieldViolation(f"{field}plan", "must name a plan, 'plans/{plan}'"))
        if violations:
            raise InvalidArgument(violations)
        now = self._now_micros()
        anchor = given.anchor_day or 1
        start = _hour(
            given.billing_start_micros, f"{field}billing_start_time", now // MICROS_PER_HOUR * MICROS_PER_HOUR
        )

        async def work(tx: PlanTransaction) -> BillingProfile | Replayed:
            if once is not None and (stored := await tx.claim(once.key)) is not None:
                return Replayed(stored)
            charges: tuple[PlanCharge, ...] = ()
            if plan_id == DEFAULT_PLAN:
                plan_currency = self._default_currency
            else:
                plan = await tx.lock_plan(plan_id)
                if plan is None:
                    raise plan_not_found(plan_id)
                plan_currency, charges = plan.currency, plan.versions[-1].charges
            currency = given.currency or plan_currency
            if currency != plan_currency:
                raise InvalidArgument.single(
                    f"{field}currency_code", f"must be the plan's currency {plan_currency}"
                )
            if plan_id == DEFAULT_PLAN and given.overrides:
                raise InvalidArgument.single(f"{field}price_overrides", "the default plan takes no overrides")
            try:
                check_overrides(given.overrides, charges)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    [FieldViolation(field + v.field, v.description) for v in exc.violations]
                ) from None
            found = await tx.profile(tenant_id, lock=True)
            before = None if found is None else found[0]
            if before is None:
                billing_start = start
                effective = _hour(
                    given.plan_effective_micros,
                    f"{field}plan_effective_time",
                    int(billing_start.timestamp()) * 1_000_000,
                )
                if effective < billing_start:
                    raise InvalidArgument.single(
                        f"{field}plan_effective_time", "must not be before billing_start_time"
                    )
                if billed := await tx.tenant_billed_after(tenant_id, billing_start):
                    raise period_finalized(billed)
                closed_until = billing_start
            else:
                billing_start, closed_until = before.billing_start, before.closed_until
                if given.billing_start_micros is not None and start != billing_start:
                    raise InvalidArgument.single(
                        f"{field}billing_start_time", "is fixed when the profile is created"
                    )
                if given.anchor_day and anchor != before.anchor_day:
                    raise InvalidArgument.single(
                        f"{field}billing_anchor_day", "is fixed when the profile is created"
                    )
                anchor_day = before.anchor_day
                effective = _hour(given.plan_effective_micros, f"{field}plan_effective_time", next_hour(now))
            profile = BillingProfile(
                tenant_id=tenant_id,
                display_name=given.display_name,
                email=given.email,
                currency=currency,
                plan_id=plan_id,
                anchor_day=anchor if before is None else anchor_day,
                billing_start=billing_start,
                tax_percentage=tax,
                spend_threshold=threshold,
                overrides=given.overrides,
                closed_until=closed_until,
                create_time=to_datetime(now),
                update_time=to_datetime(now),
            )
            first = billing_period(profile.anchor_day, billing_start, closed_until)
            await tx.save_profile(profile, first.end + self._grace)
            if before is None or before.plan_id != plan_id:
                if effective < closed_until:
                    raise period_finalized_at(closed_until)
                if billed := await tx.tenant_billed_after(tenant_id, effective):
                    raise period_finalized(billed)
                if before is not None and before.currency != currency:
                    raise InvalidArgument.single(f"{field}currency_code", "cannot change once set")
                await tx.assign_plan(tenant_id, effective, plan_id)
            saved = await tx.profile(tenant_id)
            assert saved is not None
            result = saved[0]
            await tx.append_audit(
                AuditEntry(
                    principal=caller.principal.subject,
                    request_id=caller.request_id,
                    action=AuditAction.BILLING_PROFILE_SET,
                    tenant_id=tenant_id,
                    resource=f"tenants/{tenant_id}/billingProfile",
                    before=None if before is None else profile_state(before),
                    after={**profile_state(result), "plan_effective_time": effective.isoformat()},
                )
            )
            if once is not None:
                await tx.complete(once.key, once.encode(result))
            return result

        return await self._plans.run_in_tenant_transaction(tenant_id, work)


def period_finalized_at(closed_until: datetime) -> FailedPrecondition:
    """The refusal of a change that would take effect before `closed_until` (PERIOD_FINALIZED)."""
    return FailedPrecondition(
        f"the change would take effect inside a closed period (closed until {closed_until.isoformat()})",
        reason=ErrorReason.PERIOD_FINALIZED,
        metadata={"closedUntil": closed_until.isoformat()},
    )
