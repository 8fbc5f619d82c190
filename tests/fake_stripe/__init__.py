"""A local, stateful fake of Stripe's v1 HTTP API, for tests that drive the real `stripe` SDK.

Stripe cannot be reached from the test machines, and stripe-mock is stateless and ignores idempotency. This
server keeps objects, replays idempotent requests and fails on demand, so the code that pushes invoices is
tested against Stripe's behaviour at the HTTP level while the SDK in between is the real one, pointed here
with `stripe.StripeClient(key, base_addresses={"api": fake.url})` (or `fake.client()`).

It runs the stdlib HTTP server on threads of its own, not on the event loop: a synchronous SDK call made from
an async test blocks the loop, and an in-loop server could then never answer it. Both the sync client
(requests) and the async one (httpx, the `_async` methods) are answered.

What it models (the part of Stripe that Tally's push and webhooks use):
- form bodies and query strings as Stripe parses them (`metadata[k]=v`, `lines[0][amount]=`, `expand[]=`),
  values as strings, unknown parameters refused (400 parameter_unknown) so a misspelt one fails loudly;
- `Authorization: Bearer <key>` against the keys it was given (401 otherwise);
- customers, invoice items, invoices (draft -> open -> paid / void / uncollectible, totals from the items,
  a `lines` list of at most 10 with `has_more`, as Stripe embeds it), credit notes; amounts are integers in
  the currency's minor units; lists and searches paginate like Stripe's;
- idempotency: a POST's `Idempotency-Key` with the same method, path and parameters replays the stored
  response with `Idempotent-Replayed: true`; other parameters get 400 idempotency_error. As at Stripe, only
  requests that ran are stored (successes and card declines), not ones refused before running;
- payment methods by Stripe's test names: `pm_card_visa` pays, `pm_card_chargeDeclined*` declines (402);
- faults: `fail_next` (an error status before the request runs, so nothing is stored under its key),
  `delay_next` (hold a request before or after it runs, until `release()`: client timeouts without racing
  the clock), `disconnect_next` (close the connection without an answer, before or after running);
- events: every state change appends a Stripe event (`events()`), and `event()` / `sign()` build and sign
  any event with the SDK's own `WebhookSignature`.

Usage: the `fake_stripe` fixture (tests/conftest.py) gives each test a fresh one.

    client = fake_stripe.client(max_network_retries=2)      # a real stripe.StripeClient
    fake_stripe.fail_next("/v1/invoices/*/pay", 500)        # fnmatch on the path
    ... code under test ...
    assert len(fake_stripe.objects("invoice")) == 1
    body, signature = fake_stripe.sign(fake_stripe.event("invoice.paid", invoice_id))

Modules: forms.py (the wire format and Stripe's errors), api.py (objects and endpoints, no HTTP),
server.py (the HTTP server, faults, request log, events).

Not modelled: taxes, discounts, prices/products, customer balances, subscriptions, Stripe's own automatic
retries (with `auto_advance` off Stripe does not retry; Tally drives dunning), rate limiting (inject 429s).
"""

from tests.fake_stripe.api import TEST_PAYMENT_METHODS, StripeState
from tests.fake_stripe.forms import StripeApiError, parse_form
from tests.fake_stripe.server import DEFAULT_API_KEY, DEFAULT_WEBHOOK_SECRET, FakeStripe, RecordedRequest

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_WEBHOOK_SECRET",
    "TEST_PAYMENT_METHODS",
    "FakeStripe",
    "RecordedRequest",
    "StripeApiError",
    "StripeState",
    "parse_form",
]
