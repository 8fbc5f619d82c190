"""The pure parts of Stripe webhooks and dunning: signatures, event reading, payment rules, schedule.

Signatures are computed here as Stripe computes them (HMAC-SHA256 of "{t}.{body}" with the
endpoint's secret, hex, in `t=...,v1=...`), independently of the SDK that checks them. The
payment rules are checked over every order of arrival of a set of events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from server.domain.models import InvoiceStatus, PaymentState
from server.payments import states
from server.payments.dunning import DEFAULT_SCHEDULE, DunningSchedule
from server.payments.events import EventType, read_event
from server.payments.signature import BadDelivery, load_webhook_secret, verify
from server.payments.states import CollectionState, Payment

SECRET = "whsec_test_rules_0123456789"
NOW = 1_790_000_000
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def stripe_header(body: bytes, secret: str, timestamp: int) -> str:
    signature = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={signature}"


def event_body(event_type: str = "invoice.paid", **fields: Any) -> bytes:
    obj = {"id": "in_1", "object": "invoice", "metadata": {"tally_invoice_id": "inv_1"}} | fields
    return json.dumps(
        {"id": "evt_1", "object": "event", "type": event_type, "created": NOW, "data": {"object": obj}}
    ).encode()


def clock(seconds: float) -> Any:
    return lambda: seconds


def test_delivery_signed_as_stripe_signs_is_accepted() -> None:
    body = event_body()
    values = verify(body, stripe_header(body, SECRET, NOW), SECRET, clock(NOW + 10))
    assert values["id"] == "evt_1"


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "no header"),
        ("", "empty header"),
        ("t=1790000000", "no v1 signature"),
        ("garbage", "no timestamp"),
    ],
)
def test_delivery_without_a_usable_signature_is_refused(header: str | None, why: str) -> None:
    with pytest.raises(BadDelivery):
        verify(event_body(), header, SECRET, clock(NOW))


def test_delivery_signed_with_another_secret_is_refused() -> None:
    body = event_body()
    with pytest.raises(BadDelivery, match="signature"):
        verify(body, stripe_header(body, "whsec_someone_else", NOW), SECRET, clock(NOW))


def test_body_changed_after_signing_is_refused() -> None:
    body = event_body()
    header = stripe_header(body, SECRET, NOW)
    with pytest.raises(BadDelivery, match="signature"):
        verify(body.replace(b"invoice.paid", b"invoice.voided"), header, SECRET, clock(NOW))


def test_delivery_older_than_five_minutes_on_the_injected_clock_is_refused() -> None:
    body = event_body()
    header = stripe_header(body, SECRET, NOW)
    assert verify(body, header, SECRET, clock(NOW + 300))["id"] == "evt_1"
    with pytest.raises(BadDelivery, match="300 s old"):
        verify(body, header, SECRET, clock(NOW + 301))


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"object": "list", "id": "x"}'])
def test_signed_body_that_is_not_an_event_is_refused(body: bytes) -> None:
    with pytest.raises(BadDelivery, match="event"):
        verify(body, stripe_header(body, SECRET, NOW), SECRET, clock(NOW))


def test_invoice_event_reads_attempts_metadata_and_payment_refs() -> None:
    values = json.loads(
        event_body(
            "invoice.payment_failed",
            attempt_count=2,
            amount_paid=0,
            currency="eur",
            charge="ch_1",
            payments={"data": [{"payment": {"type": "payment_intent", "payment_intent": "pi_1"}}]},
        )
    )
    event = read_event(values)
    assert (event.kind, event.stripe_invoice_id, event.tally_invoice_id) == (
        EventType.PAYMENT_FAILED,
        "in_1",
        "inv_1",
    )
    assert (event.attempt_count, event.currency, event.refs) == (2, "EUR", ("ch_1", "pi_1"))
    assert event.created == datetime.fromtimestamp(NOW, UTC)


def test_refund_names_its_charge_and_amount_in_minor_units() -> None:
    values = json.loads(event_body("charge.refunded", id="ch_9", object="charge", amount_refunded=1250))
    event = read_event(values)
    assert (event.kind, event.object_id, event.amount_minor, event.refs) == (
        EventType.CHARGE_REFUNDED,
        "ch_9",
        1250,
        ("ch_9",),
    )
    assert event.stripe_invoice_id is None  # charges of recent API versions name no invoice


def test_event_of_another_type_reads_without_a_kind() -> None:
    assert read_event(json.loads(event_body("customer.created", id="cus_1"))).kind is None


# -- the dunning schedule --


def test_default_schedule_retries_3_5_and_7_days_after_the_first_failure() -> None:
    assert [DEFAULT_SCHEDULE.next_attempt(T0, n) for n in (1, 2, 3, 4)] == [
        T0 + 3 * DAY,
        T0 + 5 * DAY,
        T0 + 7 * DAY,
        None,
    ]
    assert DEFAULT_SCHEDULE.attempts == 4


@pytest.mark.parametrize("seconds", [[], [0], [86_400, 86_400], [5, 3], [1] * 21])
def test_schedule_must_be_increasing_and_positive(seconds: list[int]) -> None:
    with pytest.raises(ValueError):
        DunningSchedule.of_seconds(seconds)


# -- payment rules, in any order --

OPEN = Payment("inv_1", PaymentState.OPEN, "in_1", attempt_count=0)


def fail(attempt: int, at: datetime, action_required: bool = False) -> Any:
    return lambda p: states.failed(p, attempt, at, "", DEFAULT_SCHEDULE, action_required=action_required)


def run(events: list[Any], payment: Payment = OPEN) -> tuple[Payment, list[InvoiceStatus]]:
    moves = []
    for apply in events:
        change = apply(payment)
        if change is not None:
            payment = change.payment
            if change.invoice_status is not None:
                moves.append(change.invoice_status)
    return payment, moves


def test_paid_wins_whatever_order_failures_arrive_in() -> None:
    events = [fail(1, T0), fail(2, T0 + 3 * DAY), fail(3, T0 + 5 * DAY, action_required=True), states.paid]
    for order in itertools.permutations(events):
        payment, moves = run(list(order))
        assert payment.state is PaymentState.PAID, order
        assert payment.next_attempt_time is None
        assert moves[-1] is InvoiceStatus.PAID and moves.count(InvoiceStatus.PAID) == 1


def test_late_payment_failed_after_paid_changes_nothing() -> None:
    paid = states.paid(OPEN)
    assert paid is not None
    assert fail(5, T0)(paid.payment) is None
    assert states.uncollectible(paid.payment) is None
    assert states.voided(paid.payment) is None


def test_failures_in_any_order_count_the_most_attempts_and_keep_the_first_failure_time() -> None:
    events = [fail(1, T0), fail(2, T0 + 3 * DAY), fail(3, T0 + 5 * DAY)]
    for order in itertools.permutations(events):
        payment, moves = run(list(order))
        assert (payment.state, payment.attempt_count) == (PaymentState.FAILED, 3), order
        assert (payment.first_failure_time, payment.next_attempt_time) == (T0, T0 + 7 * DAY), order
        assert moves == []


def test_last_failed_attempt_makes_the_invoice_uncollectible_once() -> None:
    events = [fail(1, T0), fail(2, T0 + 3 * DAY), fail(3, T0 + 5 * DAY), fail(4, T0 + 7 * DAY)]
    payment, moves = run([*events, fail(4, T0 + 7 * DAY), fail(2, T0)])
    assert (payment.state, payment.attempt_count, payment.next_attempt_time) == (
        PaymentState.UNCOLLECTIBLE,
        4,
        None,
    )
    assert moves == [InvoiceStatus.UNCOLLECTIBLE]


def test_uncollectible_can_still_be_paid_or_voided_but_not_fail_again() -> None:
    gone = states.uncollectible(OPEN)
    assert gone is not None and gone.invoice_status is InvoiceStatus.UNCOLLECTIBLE
    assert fail(2, T0)(gone.payment) is None
    assert (states.paid(gone.payment) or pytest.fail()).invoice_status is InvoiceStatus.PAID
    assert (states.voided(gone.payment) or pytest.fail()).invoice_status is InvoiceStatus.VOID


def test_a_first_failure_counted_by_the_push_still_starts_the_schedule() -> None:
    counted = dataclasses.replace(OPEN, state=PaymentState.FAILED, attempt_count=1)
    change = fail(1, T0)(counted)
    assert change is not None and change.retry_due == T0 + 3 * DAY
    assert fail(1, T0)(change.payment) is None  # the webhook repeating it is old news


def test_action_required_for_the_same_attempt_keeps_its_schedule() -> None:
    first = fail(1, T0)(OPEN).payment
    change = fail(1, T0 + DAY, action_required=True)(first)
    assert change is not None
    assert change.payment.state is PaymentState.ACTION_REQUIRED
    assert change.retry_due == T0 + 3 * DAY


@pytest.mark.parametrize(
    ("uncollectible", "past_due", "state"),
    [
        (0, 0, CollectionState.GOOD_STANDING),
        (0, 2, CollectionState.PAST_DUE),
        (1, 2, CollectionState.DELINQUENT),
    ],
)
def test_collection_state_follows_the_worst_invoice(uncollectible: int, past_due: int, state: Any) -> None:
    assert states.collection_state(uncollectible, past_due) is state


def test_webhook_secret_comes_from_its_file_else_the_variable_else_nowhere(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("whsec_from_file\n")
    variable = {"TALLY_STRIPE_WEBHOOK_SECRET": "whsec_from_env"}
    assert load_webhook_secret(secret_file, variable) == "whsec_from_file"
    assert load_webhook_secret(None, variable) == "whsec_from_env"
    assert load_webhook_secret(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_webhook_secret(tmp_path / "empty", variable)
    with pytest.raises(ValueError, match="cannot read"):
        load_webhook_secret(tmp_path / "missing", variable)
