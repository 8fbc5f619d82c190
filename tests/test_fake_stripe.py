"""The fake Stripe API (tests/fake_stripe) driven by the real `stripe` SDK.

These tests pin down the Stripe behaviour that Tally's push relies on, so that a test passing against the
fake means something: idempotent replay, the SDK's retry rules, error types, webhook signatures.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import stripe

from tests.fake_stripe import DEFAULT_WEBHOOK_SECRET, FakeStripe, StripeApiError, parse_form


def open_invoice(
    client: stripe.StripeClient, amounts: list[int], *, payment_method: str = "pm_card_visa"
) -> stripe.Invoice:
    customer = client.v1.customers.create(
        params={"email": "ops@example.com", "invoice_settings": {"default_payment_method": payment_method}}
    )
    invoice = client.v1.invoices.create(
        params={"customer": customer.id, "auto_advance": False, "currency": "eur"}
    )
    for amount in amounts:
        client.v1.invoice_items.create(
            params={"customer": customer.id, "invoice": invoice.id, "amount": amount, "description": "usage"}
        )
    return client.v1.invoices.finalize_invoice(invoice.id)


def test_form_bodies_nest_as_stripe_parses_them() -> None:
    body = (
        "customer=cus_1&metadata[tally_invoice]=inv-9&metadata[0]=zero&lines[1][amount]=5&lines[0][amount]=7"
        "&lines[0][type]=custom_line_item&expand[]=lines&expand[]=customer&auto_advance=false"
    )
    assert parse_form(body) == {
        "customer": "cus_1",
        "metadata": {"tally_invoice": "inv-9", "0": "zero"},
        "lines": [{"amount": "7", "type": "custom_line_item"}, {"amount": "5"}],
        "expand": ["lines", "customer"],
        "auto_advance": "false",
    }


def test_invoice_is_itemized_finalized_and_paid_with_totals_from_its_items(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    customer = client.v1.customers.create(
        params={
            "name": "Acme",
            "metadata": {"tally_tenant": "t-1"},
            "invoice_settings": {"default_payment_method": "pm_card_visa"},
        }
    )
    draft = client.v1.invoices.create(
        params={
            "customer": customer.id,
            "auto_advance": False,
            "currency": "EUR",
            "metadata": {"tally": "i-1"},
        }
    )
    assert (draft.object, draft.status, draft.auto_advance, draft.livemode) == (
        "invoice",
        "draft",
        False,
        False,
    )
    for index in range(12):  # more than the 10 lines an invoice embeds
        client.v1.invoice_items.create(
            params={
                "customer": customer.id,
                "invoice": draft.id,
                "amount": 1_000 + index,
                "description": f"l{index}",
            }
        )
    item = client.v1.invoice_items.create(
        params={"customer": customer.id, "invoice": draft.id, "quantity": 3, "unit_amount_decimal": "0.5"}
    )
    assert item.amount == 2  # 1.5 minor units rounds half up, as Stripe rounds a line

    invoice = client.v1.invoices.finalize_invoice(draft.id)

    assert customer.id.startswith("cus_") and draft.id.startswith("in_") and item.id.startswith("ii_")
    assert invoice.status == "open" and invoice.number is not None and invoice.currency == "eur"
    assert invoice.total == invoice.amount_due == invoice.amount_remaining == 12_066 + 2
    assert len(invoice.lines.data) == 10 and invoice.lines.has_more
    lines = list(client.v1.invoices.line_items.list(invoice.id, params={"limit": 5}).auto_paging_iter())
    assert [line.amount for line in lines] == [*range(1_000, 1_012), 2]
    assert lines[0].parent.invoice_item_details.invoice_item.startswith("ii_")
    found = client.v1.customers.search(params={"query": "metadata['tally_tenant']:'t-1'"})
    assert [c.id for c in found.data] == [customer.id]

    paid = client.v1.invoices.pay(invoice.id)

    assert (paid.status, paid.amount_paid, paid.amount_remaining, paid.attempt_count) == (
        "paid",
        12_068,
        0,
        1,
    )
    assert [i["status"] for i in fake_stripe.objects("invoice")] == ["paid"]
    assert [e["type"] for e in fake_stripe.events() if e["type"].startswith("invoice.")] == [
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
    ]
    with pytest.raises(stripe.InvalidRequestError) as late:
        client.v1.invoice_items.create(params={"customer": customer.id, "invoice": invoice.id, "amount": 1})
    assert late.value.code == "invoice_not_editable"


def test_replayed_idempotency_key_returns_the_stored_invoice_and_creates_nothing(
    fake_stripe: FakeStripe,
) -> None:
    client = fake_stripe.client()
    customer = client.v1.customers.create()
    params: dict[str, Any] = {"customer": customer.id, "auto_advance": False, "metadata": {"tally": "i-1"}}

    first = client.v1.invoices.create(params=params, options={"idempotency_key": "tally-i-1-create"})
    again = client.v1.invoices.create(params=params, options={"idempotency_key": "tally-i-1-create"})

    assert again.id == first.id
    assert again.last_response is not None and again.last_response.headers["Idempotent-Replayed"] == "true"
    assert first.last_response is not None and "Idempotent-Replayed" not in first.last_response.headers
    assert len(fake_stripe.objects("invoice")) == 1
    sent = fake_stripe.requests("POST", "/v1/invoices")
    assert [(r.idempotency_key, r.replayed) for r in sent] == [
        ("tally-i-1-create", False),
        ("tally-i-1-create", True),
    ]


def test_reused_idempotency_key_with_other_parameters_is_an_idempotency_error(
    fake_stripe: FakeStripe,
) -> None:
    client = fake_stripe.client()
    customer = client.v1.customers.create()
    client.v1.invoices.create(params={"customer": customer.id}, options={"idempotency_key": "k"})

    with pytest.raises(stripe.IdempotencyError) as error:
        client.v1.invoices.create(
            params={"customer": customer.id, "description": "x"}, options={"idempotency_key": "k"}
        )

    assert error.value.http_status == 400
    assert len(fake_stripe.objects("invoice")) == 1


def test_server_error_is_retried_by_the_sdk_with_the_same_key_and_creates_one_invoice(
    fake_stripe: FakeStripe,
) -> None:
    customer = fake_stripe.client().v1.customers.create()
    fake_stripe.fail_next("/v1/invoices", 500, method="POST")

    invoice = fake_stripe.client(max_network_retries=2).v1.invoices.create(params={"customer": customer.id})

    attempts = fake_stripe.requests("POST", "/v1/invoices")
    assert [r.status for r in attempts] == [500, 200]
    assert attempts[0].idempotency_key is not None  # the SDK's own key, kept across its retry
    assert attempts[0].idempotency_key == attempts[1].idempotency_key
    assert [i["id"] for i in fake_stripe.objects("invoice")] == [invoice.id]


def test_server_error_without_retries_surfaces_as_api_error(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail_next("/v1/customers", 503)

    with pytest.raises(stripe.APIError) as error:
        fake_stripe.client().v1.customers.create()

    assert error.value.http_status == 503
    assert error.value.request_id is not None and error.value.request_id.startswith("req_")
    assert fake_stripe.objects("customer") == []


def test_rate_limit_is_not_retried_by_the_sdk(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail_next("/v1/customers", 429)

    with pytest.raises(stripe.RateLimitError) as error:
        fake_stripe.client(max_network_retries=3).v1.customers.create()

    assert error.value.http_status == 429
    assert error.value.error is not None and error.value.error.code == "rate_limit"
    assert len(fake_stripe.requests("POST", "/v1/customers")) == 1
    assert fake_stripe.objects("customer") == []


def test_stripe_should_retry_header_makes_the_sdk_retry_a_rate_limit(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail_next("/v1/customers", 429, code="lock_timeout", should_retry=True)

    customer = fake_stripe.client(max_network_retries=1).v1.customers.create()

    assert [r.status for r in fake_stripe.requests("POST", "/v1/customers")] == [429, 200]
    assert [c["id"] for c in fake_stripe.objects("customer")] == [customer.id]


def test_declined_card_raises_card_error_and_counts_the_attempt(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    invoice = open_invoice(client, [2_500], payment_method="pm_card_chargeDeclinedInsufficientFunds")

    with pytest.raises(stripe.CardError) as error:
        client.v1.invoices.pay(invoice.id, options={"idempotency_key": "pay-1"})
    with pytest.raises(stripe.CardError) as replayed:
        client.v1.invoices.pay(invoice.id, options={"idempotency_key": "pay-1"})

    assert (error.value.http_status, error.value.code) == (402, "card_declined")
    assert error.value.error is not None and error.value.error.decline_code == "insufficient_funds"
    assert replayed.value.headers is not None and replayed.value.headers["Idempotent-Replayed"] == "true"
    stored = fake_stripe.get(invoice.id)
    assert (stored["status"], stored["attempt_count"], stored["amount_paid"]) == ("open", 1, 0)
    [failed] = fake_stripe.events("invoice.payment_failed")
    assert failed["data"]["object"]["attempt_count"] == 1

    fake_stripe.set_default_payment_method(invoice.customer, "pm_card_visa")
    paid = client.v1.invoices.pay(invoice.id, options={"idempotency_key": "pay-2"})

    assert (paid.status, paid.attempt_count, paid.amount_paid) == ("paid", 2, 2_500)


def test_invoice_charges_the_default_payment_method_not_a_merely_attached_one(
    fake_stripe: FakeStripe,
) -> None:
    client = fake_stripe.client()
    customer = client.v1.customers.create(params={"payment_method": "pm_card_visa"})
    invoice = client.v1.invoices.create(params={"customer": customer.id})
    client.v1.invoice_items.create(params={"customer": customer.id, "invoice": invoice.id, "amount": 100})
    client.v1.invoices.finalize_invoice(invoice.id)

    with pytest.raises(stripe.CardError) as error:
        client.v1.invoices.pay(invoice.id)

    assert (error.value.http_status, error.value.code) == (402, "missing")
    assert fake_stripe.get(invoice.id)["attempt_count"] == 1
    assert client.v1.invoices.pay(invoice.id, params={"payment_method": "pm_card_visa"}).status == "paid"


def test_injected_decline_carries_its_decline_code_and_changes_nothing(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    invoice = open_invoice(client, [700])
    fake_stripe.fail_next("/v1/invoices/*/pay", 402, decline_code="do_not_honor")

    with pytest.raises(stripe.CardError) as error:
        client.v1.invoices.pay(invoice.id)

    assert error.value.error is not None and error.value.error.decline_code == "do_not_honor"
    assert fake_stripe.get(invoice.id)["attempt_count"] == 0
    assert client.v1.invoices.pay(invoice.id).status == "paid"


def test_unknown_or_revoked_api_key_is_an_authentication_error(fake_stripe: FakeStripe) -> None:
    with pytest.raises(stripe.AuthenticationError) as wrong:
        fake_stripe.client(api_key="sk_test_not_the_right_one").v1.customers.create()
    assert wrong.value.http_status == 401
    client = fake_stripe.client()
    client.v1.customers.create()

    fake_stripe.revoke_api_key()

    with pytest.raises(stripe.AuthenticationError):
        client.v1.customers.create()
    assert len(fake_stripe.objects("customer")) == 1


def test_signed_event_verifies_with_the_sdk_and_a_tampered_one_is_refused(fake_stripe: FakeStripe) -> None:
    invoice = open_invoice(fake_stripe.client(), [900])
    next_attempt = int(time.time()) + 3 * 86_400
    event = fake_stripe.event(
        "invoice.payment_failed", invoice.id, attempt_count=2, next_payment_attempt=next_attempt
    )
    body, header = fake_stripe.sign(event)

    verified = stripe.Webhook.construct_event(body, header, DEFAULT_WEBHOOK_SECRET, tolerance=300)

    assert (verified.id, verified.type) == (event["id"], "invoice.payment_failed")
    assert verified.data.object.id == invoice.id
    assert (verified.data.object.attempt_count, verified.data.object.next_payment_attempt) == (
        2,
        next_attempt,
    )
    tampered = body.replace(b'"attempt_count": 2', b'"attempt_count": 1')
    assert tampered != body
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered, header, DEFAULT_WEBHOOK_SECRET, tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, header, "whsec_someone_else", tolerance=300)
    old_body, old_header = fake_stripe.sign(event, timestamp=int(time.time()) - 3_600)
    with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
        stripe.Webhook.construct_event(old_body, old_header, DEFAULT_WEBHOOK_SECRET, tolerance=300)


def test_recorded_events_carry_the_object_as_it_was(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    invoice = open_invoice(client, [300])
    client.v1.invoices.void_invoice(invoice.id)

    [finalized] = fake_stripe.events("invoice.finalized")
    [voided] = fake_stripe.events("invoice.voided")

    assert finalized["data"]["object"]["status"] == "open"
    assert voided["data"]["object"]["status"] == "void"
    assert json.loads(fake_stripe.sign(voided)[0])["id"] == voided["id"]


# The SDK's httpx client passes the form body as `data=`, which httpx deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
async def test_async_client_and_a_blocking_sync_call_both_get_answers(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client(max_network_retries=1)
    customer = await client.v1.customers.create_async(
        params={"invoice_settings": {"default_payment_method": "pm_card_visa"}}
    )
    invoice = await client.v1.invoices.create_async(params={"customer": customer.id, "auto_advance": False})
    await client.v1.invoice_items.create_async(
        params={"customer": customer.id, "invoice": invoice.id, "amount": 4_200}
    )
    fake_stripe.fail_next("/v1/invoices/*/finalize", 500)

    finalized = await client.v1.invoices.finalize_invoice_async(invoice.id)
    paid = await client.v1.invoices.pay_async(finalized.id)
    # A sync call blocks this event loop; the fake answers from its own threads, so it cannot deadlock.
    again = client.v1.invoices.retrieve(invoice.id)

    assert (paid.status, paid.amount_paid, again.status) == ("paid", 4_200, "paid")
    assert [r.status for r in fake_stripe.requests("POST", "/v1/invoices/*/finalize")] == [500, 200]


def test_connection_dropped_after_the_request_ran_is_answered_by_replay(fake_stripe: FakeStripe) -> None:
    customer = fake_stripe.client().v1.customers.create()
    fake_stripe.disconnect_next("/v1/invoices", method="POST")

    invoice = fake_stripe.client(max_network_retries=1).v1.invoices.create(params={"customer": customer.id})

    attempts = fake_stripe.requests("POST", "/v1/invoices")
    assert [(r.status, r.replayed, r.fault) for r in attempts] == [
        (None, False, "disconnect"),
        (200, True, None),
    ]
    assert [i["id"] for i in fake_stripe.objects("invoice")] == [invoice.id]


def test_response_held_past_the_client_timeout_is_replayed_on_retry(fake_stripe: FakeStripe) -> None:
    customer = fake_stripe.client().v1.customers.create()
    fake_stripe.delay_next("/v1/invoices", method="POST", after=True)
    # The hold lasts until release(), so the first attempt always times out; the retries are answered at
    # once (three of them, so that even a machine too loaded to answer one in 2 s does not fail the test).
    client = fake_stripe.client(max_network_retries=3, timeout=2.0)

    invoice = client.v1.invoices.create(
        params={"customer": customer.id}, options={"idempotency_key": "inv-1"}
    )

    fake_stripe.release()
    attempts = fake_stripe.requests("POST", "/v1/invoices")
    assert (attempts[0].status, attempts[0].replayed) == (200, False)
    assert len(attempts) >= 2 and all(r.status == 200 and r.replayed for r in attempts[1:])
    assert [i["id"] for i in fake_stripe.objects("invoice")] == [invoice.id]


def test_timeout_without_retries_is_a_connection_error(fake_stripe: FakeStripe) -> None:
    fake_stripe.delay_next("/v1/customers")

    with pytest.raises(stripe.APIConnectionError):
        fake_stripe.client(timeout=0.5).v1.customers.create()


def test_credit_notes_reduce_an_open_invoice_and_settle_it_when_they_cover_the_rest(
    fake_stripe: FakeStripe,
) -> None:
    client = fake_stripe.client()
    invoice = open_invoice(client, [600, 400])
    [_, second] = client.v1.invoices.line_items.list(invoice.id).data

    note = client.v1.credit_notes.create(
        params={
            "invoice": invoice.id,
            "lines": [{"type": "invoice_line_item", "invoice_line_item": second.id, "amount": 400}],
            "reason": "order_change",
        }
    )

    assert (note.object, note.amount, note.type, note.status) == ("credit_note", 400, "pre_payment", "issued")
    assert note.id.startswith("cn_")
    reduced = client.v1.invoices.retrieve(invoice.id)
    assert (reduced.status, reduced.total, reduced.amount_due, reduced.pre_payment_credit_notes_amount) == (
        "open",
        1_000,
        600,
        400,
    )
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.credit_notes.create(
            params={
                "invoice": invoice.id,
                "lines": [{"type": "invoice_line_item", "invoice_line_item": second.id}],
            }
        )
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.credit_notes.create(params={"invoice": invoice.id, "amount": 601})

    client.v1.credit_notes.create(params={"invoice": invoice.id, "amount": 600})

    assert client.v1.invoices.retrieve(invoice.id).status == "paid"
    assert [cn.amount for cn in client.v1.credit_notes.list(params={"invoice": invoice.id}).data] == [
        600,
        400,
    ]


def test_credit_note_on_a_paid_invoice_is_post_payment(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    invoice = client.v1.invoices.pay(open_invoice(client, [1_000]).id)

    note = client.v1.credit_notes.create(params={"invoice": invoice.id, "amount": 250, "refund_amount": 250})

    assert (note.type, note.post_payment_amount, note.customer_balance_transaction) == (
        "post_payment",
        250,
        None,
    )
    assert [refund.amount_refunded for refund in note.refunds] == [250]
    paid = client.v1.invoices.retrieve(invoice.id)
    assert (paid.status, paid.amount_paid, paid.post_payment_credit_notes_amount) == ("paid", 1_000, 250)


def test_invoice_states_move_only_as_stripes_do(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    voided = client.v1.invoices.void_invoice(open_invoice(client, [100]).id)
    assert voided.status == "void" and voided.status_transitions.voided_at is not None
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.pay(voided.id)

    uncollectible = client.v1.invoices.mark_uncollectible(open_invoice(client, [200]).id)
    assert uncollectible.status == "uncollectible"
    assert client.v1.invoices.pay(uncollectible.id).status == "paid"  # Stripe still collects it if it can
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.void_invoice(uncollectible.id)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.finalize_invoice(uncollectible.id)

    customer = client.v1.customers.create()
    draft = client.v1.invoices.create(params={"customer": customer.id})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.void_invoice(draft.id)
    empty = client.v1.invoices.finalize_invoice(draft.id)
    assert (empty.status, empty.amount_due) == ("paid", 0)  # a zero invoice closes at finalization


def test_send_invoice_needs_its_collection_method_and_finalizes_a_draft(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    customer = client.v1.customers.create()
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.invoices.create(params={"customer": customer.id, "collection_method": "send_invoice"})
    assert missing.value.param == "days_until_due"
    draft = client.v1.invoices.create(
        params={"customer": customer.id, "collection_method": "send_invoice", "days_until_due": 30}
    )
    client.v1.invoice_items.create(params={"customer": customer.id, "invoice": draft.id, "amount": 5_000})

    sent = client.v1.invoices.send_invoice(draft.id)

    assert sent.status == "open"
    assert sent.due_date == sent.status_transitions.finalized_at + 30 * 86_400
    assert len(fake_stripe.events("invoice.sent")) == 1
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.send_invoice(open_invoice(client, [1]).id)


def test_unknown_parameters_and_missing_objects_are_refused_precisely(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    customer = client.v1.customers.create()
    with pytest.raises(stripe.InvalidRequestError) as typo:
        client.v1.invoices.create(params={"customer": customer.id, "auto_advnce": False})
    assert (typo.value.http_status, typo.value.code, typo.value.param) == (
        400,
        "parameter_unknown",
        "auto_advnce",
    )
    with pytest.raises(stripe.InvalidRequestError) as absent:
        client.v1.invoices.retrieve("in_missing")
    assert (absent.value.http_status, absent.value.code) == (404, "resource_missing")
    with pytest.raises(stripe.InvalidRequestError) as reference:
        client.v1.invoices.create(params={"customer": "cus_missing"})
    assert (reference.value.http_status, reference.value.param) == (400, "customer")
    with pytest.raises(stripe.InvalidRequestError) as amount:
        client.v1.invoice_items.create(params={"customer": customer.id, "currency": "usd", "amount": "1.5"})
    assert amount.value.code == "parameter_invalid_integer"
    assert fake_stripe.objects("invoice") == [] and fake_stripe.objects("invoiceitem") == []


def test_lists_page_newest_first(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    created = [client.v1.customers.create().id for _ in range(5)]

    page = client.v1.customers.list(params={"limit": 2})
    everything = [c.id for c in page.auto_paging_iter()]

    assert [c.id for c in page.data] == created[:-3:-1] and page.has_more
    assert everything == created[::-1]


def test_an_invoice_holds_at_most_250_items(fake_stripe: FakeStripe) -> None:
    # Through the state directly: 250 HTTP round trips would only slow the suite down.
    state = fake_stripe.state
    auth = {"authorization": f"Bearer {fake_stripe.api_key}"}
    customer, _ = state.handle("POST", "/v1/customers", {}, auth)
    invoice, _ = state.handle("POST", "/v1/invoices", {"customer": customer.body["id"]}, auth)
    item = {"customer": customer.body["id"], "invoice": invoice.body["id"], "amount": "1"}
    for _ in range(250):
        state.handle("POST", "/v1/invoiceitems", item, auth)

    with pytest.raises(StripeApiError) as error:
        state.handle("POST", "/v1/invoiceitems", item, auth)

    assert error.value.status == 400 and error.value.error["param"] == "invoice"
    assert fake_stripe.get(invoice.body["id"])["total"] == 250


def test_refused_request_leaves_nothing_half_written(fake_stripe: FakeStripe) -> None:
    client = fake_stripe.client()
    customer = client.v1.customers.create(params={"name": "Before", "metadata": {"plan": "a"}})

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.update(
            customer.id,
            params={"name": "After", "invoice_settings": {"default_payment_method": "pm_card_unknown"}},
        )

    assert fake_stripe.get(customer.id)["name"] == "Before"
    assert [e["type"] for e in fake_stripe.events()] == ["customer.created"]


def test_a_bug_in_the_fake_answers_500_and_is_kept_for_the_fixture_to_report() -> None:
    with FakeStripe() as fake:

        def broken_emit(event_type: str, obj: dict[str, Any]) -> None:
            raise KeyError(event_type)

        fake.state.emit = broken_emit  # type: ignore[method-assign]

        with pytest.raises(stripe.APIError, match="fake Stripe bug"):
            fake.client().v1.customers.create()

        assert [type(e) for e in fake.internal_errors] == [KeyError]
