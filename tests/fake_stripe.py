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

Not modelled: taxes, discounts, prices/products, customer balances, subscriptions, Stripe's own automatic
retries (with `auto_advance` off Stripe does not retry; Tally drives dunning), rate limiting (inject 429s).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import stripe

Obj = dict[str, Any]

DEFAULT_API_KEY = "sk_test_tally_fake_stripe_key"
DEFAULT_WEBHOOK_SECRET = "whsec_tally_fake_stripe_secret"
MAX_INVOICE_ITEMS = 250  # Stripe's limit on lines per invoice
LIST_LIMIT_DEFAULT = 10
LIST_LIMIT_MAX = 100
EMBEDDED_LINES = 10  # an invoice embeds its first 10 lines; the rest are paged from /lines

# Stripe's test payment methods: None pays, a (code, decline_code, message) declines.
TEST_PAYMENT_METHODS: dict[str, tuple[str, str, str] | None] = {
    "pm_card_visa": None,
    "pm_card_mastercard": None,
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "expired_card", "Your card has expired."),
    "pm_card_chargeDeclinedFraudulent": ("card_declined", "fraudulent", "Your card was declined."),
}


class StripeApiError(Exception):
    """An error answered as Stripe does: `{"error": {...}}` with an HTTP status.

    `ran` marks errors raised after the request changed state (a card decline): Stripe stores those under
    the idempotency key and replays them; errors refused before running are not stored.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        ran: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.ran = ran
        self.headers = headers or {}
        self.error: Obj = {"type": type, "message": message}
        if code is not None:
            self.error["code"] = code
        if param is not None:
            self.error["param"] = param
        if decline_code is not None:
            self.error["decline_code"] = decline_code


def _missing(kind: str, object_id: str, param: str = "id") -> StripeApiError:
    # An id in the URL that does not exist is 404; one passed as a parameter is 400, as at Stripe.
    status = 404 if param == "id" else 400
    return StripeApiError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


# --- form bodies -------------------------------------------------------------------------------------------

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SUBKEY = re.compile(r"\[([^\[\]]*)\]")


def parse_form(raw: str) -> Obj:
    """Parse a form-encoded body or query string into nested dicts and lists, values as strings.

    `a[b][c]=v` nests, `a[0][b]=v` and `a[]=v` make lists (metadata keys stay keys even when numeric).
    """
    root: Obj = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        match = _KEY.fullmatch(key)
        if match is None:
            raise StripeApiError(400, f"Invalid parameter name: {key}", code="parameter_unknown", param=key)
        parts = [match[1], *_SUBKEY.findall(match[2])]
        node = root
        for depth, part in enumerate(parts):
            if part == "":
                if depth != len(parts) - 1:
                    raise StripeApiError(400, f"Invalid array parameter: {key}", param=key)
                part = str(len(node))
            if depth == len(parts) - 1:
                if part in node:
                    raise StripeApiError(400, f"Parameter given twice: {key}", param=key)
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise StripeApiError(400, f"Invalid parameter: {key}", param=key)
                node = child
    return _listify(root, in_metadata=False)  # type: ignore[no-any-return]


def _listify(node: Any, *, in_metadata: bool) -> Any:
    if not isinstance(node, dict):
        return node
    if not in_metadata and node and all(k.isdigit() for k in node):
        return [_listify(node[k], in_metadata=False) for k in sorted(node, key=int)]
    return {k: _listify(v, in_metadata=(k == "metadata")) for k, v in node.items()}


# --- parameter readers: Stripe's form values are strings -------------------------------------------------


def _check_known(params: Obj, known: Iterable[str]) -> None:
    allowed = {*known, "expand"}
    for name in params:
        if name not in allowed:
            raise StripeApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


def _str(params: Obj, name: str, *, required: bool = False, choices: Iterable[str] = ()) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise StripeApiError(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
        return None
    if not isinstance(value, str):
        raise StripeApiError(400, f"Invalid string: {name}", code="parameter_invalid_string", param=name)
    allowed = tuple(choices)
    if allowed and value not in allowed:
        raise StripeApiError(
            400, f"Invalid {name}: must be one of {', '.join(allowed)}", code="parameter_invalid", param=name
        )
    return value


def _int(params: Obj, name: str, *, required: bool = False, minimum: int | None = None) -> int | None:
    raw = _str(params, name, required=required)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise StripeApiError(
            400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
        ) from None
    if minimum is not None and value < minimum:
        raise StripeApiError(
            400,
            f"This value must be greater than or equal to {minimum}.",
            code="parameter_invalid_integer",
            param=name,
        )
    return value


def _bool(params: Obj, name: str, default: bool) -> bool:
    raw = _str(params, name)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise StripeApiError(400, f"Invalid boolean: {raw}", code="parameter_invalid_boolean", param=name)
    return raw == "true"


def _decimal(params: Obj, name: str) -> Decimal | None:
    raw = _str(params, name)
    if raw is None:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise StripeApiError(400, f"Invalid decimal: {raw}", code="parameter_invalid", param=name) from None
    if not value.is_finite():
        raise StripeApiError(400, f"Invalid decimal: {raw}", code="parameter_invalid", param=name)
    return value


def _dict(params: Obj, name: str) -> Obj:
    value = params.get(name, {})
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise StripeApiError(400, f"Invalid object: {name}", code="parameter_invalid", param=name)
    return value


def _merge_metadata(current: dict[str, str], params: Obj) -> dict[str, str]:
    # An empty value unsets a key, and `metadata=` unsets them all, as at Stripe.
    if params.get("metadata") == "":
        return {}
    merged = dict(current)
    for key, value in _dict(params, "metadata").items():
        if not isinstance(value, str):
            raise StripeApiError(400, f"Invalid metadata value for {key}", param=f"metadata[{key}]")
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    if len(merged) > 50:
        raise StripeApiError(400, "Metadata can have at most 50 keys.", param="metadata")
    return merged


def _currency(params: Obj, name: str = "currency") -> str | None:
    value = _str(params, name)
    if value is not None and not re.fullmatch(r"[A-Za-z]{3}", value):
        raise StripeApiError(400, f"Invalid currency: {value}", code="parameter_invalid", param=name)
    return value.lower() if value else None


def _search_clauses(query: str) -> list[tuple[str, str]]:
    """Stripe's search language, the part worth having: `field:'v'` and `metadata['k']:'v'`, AND-ed."""
    clauses: list[tuple[str, str]] = []
    for clause in query.split(" AND "):
        match = re.fullmatch(r"\s*(metadata\['[^']+'\]|[a-z_]+):'([^']*)'\s*", clause)
        if match is None:
            raise StripeApiError(
                400, f"Invalid search query: {query}", code="parameter_invalid", param="query"
            )
        clauses.append((match[1], match[2]))
    return clauses


def _matches(obj: Obj, clauses: list[tuple[str, str]]) -> bool:
    for name, wanted in clauses:
        if name.startswith("metadata["):
            actual = obj["metadata"].get(name[len("metadata['") : -2])
        else:
            actual = obj.get(name)
        if actual is None or str(actual) != wanted:
            return False
    return True


# --- recorded traffic and faults ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake saw it, for assertions on what the code under test sent."""

    method: str
    path: str
    params: Obj
    idempotency_key: str | None
    status: int | None  # None: the connection was closed without an answer
    replayed: bool = False
    fault: str | None = None  # the injected fault that answered it, if any


@dataclass(slots=True)
class Response:
    status: int
    body: Obj
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Fault:
    kind: str  # "status", "delay" or "disconnect"
    pattern: str
    method: str | None
    remaining: int
    after: bool = False  # delay/disconnect after the request ran (its result stored) instead of before
    error: StripeApiError | None = None
    hold_seconds: float = 0.0
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and fnmatch.fnmatchcase(path, self.pattern)
        )


_DEFAULT_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", None, "Invalid API Key provided."),
    402: ("card_error", "card_declined", "Your card was declined."),
    403: ("invalid_request_error", None, "The provided key does not have access to this resource."),
    404: ("invalid_request_error", "resource_missing", "No such object."),
    409: (
        "invalid_request_error",
        "lock_timeout",
        "This object cannot be accessed right now because another API request or Stripe process is "
        "currently accessing it.",
    ),
    429: (
        "invalid_request_error",
        "rate_limit",
        "Too many requests hit the API too quickly. We recommend an exponential backoff of your requests.",
    ),
}


# --- the API: objects and endpoints ------------------------------------------------------------------------


class StripeState:
    """Stripe's objects and endpoints, free of HTTP: `handle()` answers one parsed request.

    Callers hold no lock of their own: `handle()` runs each request under one lock, so a request sees and
    leaves a consistent state, as one Stripe API call would.
    """

    def __init__(self, *, api_keys: Iterable[str], clock: Callable[[], float]) -> None:
        self.api_keys = set(api_keys)
        self.lock = threading.RLock()
        self._clock = clock
        self._objects: dict[str, Obj] = {}  # insertion order is creation order
        self._idempotent: dict[tuple[str, str], tuple[str, str, Obj, Response]] = {}
        self._events: list[Obj] = []
        self._invoice_numbers = 0
        routes: list[tuple[str, str, Callable[..., Obj]]] = [
            ("POST", r"/v1/customers", self.create_customer),
            ("GET", r"/v1/customers", self.list_customers),
            ("GET", r"/v1/customers/search", self.search_customers),
            ("GET", r"/v1/customers/([^/]+)", self.retrieve_customer),
            ("POST", r"/v1/customers/([^/]+)", self.update_customer),
            ("POST", r"/v1/invoiceitems", self.create_invoice_item),
            ("GET", r"/v1/invoiceitems", self.list_invoice_items),
            ("GET", r"/v1/invoiceitems/([^/]+)", self.retrieve_invoice_item),
            ("DELETE", r"/v1/invoiceitems/([^/]+)", self.delete_invoice_item),
            ("POST", r"/v1/invoices", self.create_invoice),
            ("GET", r"/v1/invoices", self.list_invoices),
            ("GET", r"/v1/invoices/search", self.search_invoices),
            ("GET", r"/v1/invoices/([^/]+)", self.retrieve_invoice),
            ("POST", r"/v1/invoices/([^/]+)", self.update_invoice),
            ("DELETE", r"/v1/invoices/([^/]+)", self.delete_invoice),
            ("GET", r"/v1/invoices/([^/]+)/lines", self.list_invoice_lines),
            ("POST", r"/v1/invoices/([^/]+)/finalize", self.finalize_invoice),
            ("POST", r"/v1/invoices/([^/]+)/pay", self.pay_invoice),
            ("POST", r"/v1/invoices/([^/]+)/send", self.send_invoice),
            ("POST", r"/v1/invoices/([^/]+)/void", self.void_invoice),
            ("POST", r"/v1/invoices/([^/]+)/mark_uncollectible", self.mark_uncollectible),
            ("POST", r"/v1/credit_notes", self.create_credit_note),
            ("GET", r"/v1/credit_notes", self.list_credit_notes),
            ("GET", r"/v1/credit_notes/([^/]+)", self.retrieve_credit_note),
            ("POST", r"/v1/credit_notes/([^/]+)/void", self.void_credit_note),
        ]
        self._routes = [(method, re.compile(pattern), handler) for method, pattern, handler in routes]

    # -- dispatch --

    def handle(self, method: str, path: str, params: Obj, headers: dict[str, str]) -> tuple[Response, bool]:
        """Answer one request; returns the response and whether it was an idempotent replay."""
        with self.lock:
            auth = headers.get("authorization", "")
            api_key = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
            if api_key not in self.api_keys:
                shown = f"{api_key[:8]}****{api_key[-4:]}" if len(api_key) > 12 else api_key
                raise StripeApiError(401, f"Invalid API Key provided: {shown}")
            handler, ids = self._route(method, path)
            key = headers.get("idempotency-key") if method == "POST" else None
            if key is not None:
                stored = self._idempotent.get((api_key, key))
                if stored is not None:
                    if stored[:3] != (method, path, params):
                        raise StripeApiError(
                            400,
                            "Keys for idempotent requests can only be used with the same parameters they "
                            f"were first used with. Try using a key other than '{key}' if you meant to "
                            "execute a different request.",
                            type="idempotency_error",
                        )
                    replay = stored[3]
                    return Response(replay.status, copy.deepcopy(replay.body), dict(replay.headers)), True
            try:
                response = Response(200, handler(params, *ids))
            except StripeApiError as error:
                if not error.ran:
                    raise
                response = Response(error.status, {"error": error.error}, dict(error.headers))
            if key is not None:
                self._idempotent[(api_key, key)] = (method, path, params, response)
            return Response(response.status, copy.deepcopy(response.body), dict(response.headers)), False

    def _route(self, method: str, path: str) -> tuple[Callable[..., Obj], tuple[str, ...]]:
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is not None and route_method == method:
                return handler, match.groups()
        raise StripeApiError(
            404,
            f"Unrecognized request URL ({method}: {path}). The fake Stripe does not model this endpoint; "
            "see tests/fake_stripe.py.",
        )

    # -- helpers --

    def now(self) -> int:
        return int(self._clock())

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:24]}"

    def _base(self, prefix: str, object_type: str) -> Obj:
        return {"id": self.new_id(prefix), "object": object_type, "created": self.now(), "livemode": False}

    def _find(self, object_type: str, object_id: str | None, *, param: str = "id") -> Obj:
        obj = self._objects.get(object_id or "")
        if obj is None or obj["object"] != object_type:
            raise _missing(object_type, object_id or "", param)
        return obj

    def stored(self, object_type: str) -> list[Obj]:
        return [obj for obj in self._objects.values() if obj["object"] == object_type]

    def render(self, obj: Obj) -> Obj:
        """An object as the API shows it: computed fields filled in, a copy safe to hand out."""
        if obj["object"] == "invoice":
            return self._render_invoice(obj)
        rendered = {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}  # "_": private
        if obj["object"] == "credit_note":
            rendered["lines"] = self._list(obj["lines"], f"/v1/credit_notes/{obj['id']}/lines", limit=10)
        return rendered

    def _list(self, data: list[Obj], url: str, *, limit: int, start: int = 0) -> Obj:
        return {
            "object": "list",
            "data": copy.deepcopy(data[start : start + limit]),
            "has_more": start + limit < len(data),
            "url": url,
        }

    def _page(self, objs: list[Obj], params: Obj, url: str, *, newest_first: bool = True) -> Obj:
        limit = _int(params, "limit", minimum=1) or LIST_LIMIT_DEFAULT
        if limit > LIST_LIMIT_MAX:
            raise StripeApiError(
                400, f"This value must be less than or equal to {LIST_LIMIT_MAX}.", param="limit"
            )
        ordered = list(reversed(objs)) if newest_first else list(objs)
        start = 0
        after = _str(params, "starting_after")
        if after is not None:
            ids = [obj["id"] for obj in ordered]
            if after not in ids:
                raise _missing("object", after, "starting_after")
            start = ids.index(after) + 1
        return self._list([self.render(obj) for obj in ordered], url, limit=limit, start=start)

    def emit(self, event_type: str, obj: Obj) -> None:
        self._events.append(self.event(event_type, self.render(obj)))

    def event(self, event_type: str, rendered: Obj, previous_attributes: Obj | None = None) -> Obj:
        data: Obj = {"object": rendered}
        if previous_attributes is not None:
            data["previous_attributes"] = previous_attributes
        return {
            "id": self.new_id("evt"),
            "object": "event",
            "api_version": stripe.api_version,
            "created": self.now(),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }

    def events(self) -> list[Obj]:
        return copy.deepcopy(self._events)

    # -- customers --

    def create_customer(self, params: Obj) -> Obj:
        _check_known(
            params, ("email", "name", "description", "metadata", "payment_method", "invoice_settings")
        )
        payment_method = self._payment_method(_str(params, "payment_method"), "payment_method")
        settings = _dict(params, "invoice_settings")
        _check_known(settings, ("default_payment_method",))
        default = self._payment_method(
            _str(settings, "default_payment_method"), "invoice_settings[default_payment_method]"
        )
        customer = self._base("cus", "customer") | {
            "email": _str(params, "email"),
            "name": _str(params, "name"),
            "description": _str(params, "description"),
            "metadata": _merge_metadata({}, params),
            "currency": None,
            "invoice_settings": {"default_payment_method": default},
            "_attached_payment_method": payment_method,
        }
        self._objects[customer["id"]] = customer
        self.emit("customer.created", customer)
        return self.render(customer)

    def retrieve_customer(self, params: Obj, customer_id: str) -> Obj:
        _check_known(params, ())
        return self.render(self._find("customer", customer_id))

    def update_customer(self, params: Obj, customer_id: str) -> Obj:
        _check_known(params, ("email", "name", "description", "metadata", "invoice_settings"))
        customer = self._find("customer", customer_id)
        for name in ("email", "name", "description"):
            if name in params:
                customer[name] = _str(params, name)
        customer["metadata"] = _merge_metadata(customer["metadata"], params)
        settings = _dict(params, "invoice_settings")
        _check_known(settings, ("default_payment_method",))
        if "default_payment_method" in settings:
            customer["invoice_settings"]["default_payment_method"] = self._payment_method(
                _str(settings, "default_payment_method"), "invoice_settings[default_payment_method]"
            )
        self.emit("customer.updated", customer)
        return self.render(customer)

    def list_customers(self, params: Obj) -> Obj:
        _check_known(params, ("limit", "starting_after", "email"))
        email = _str(params, "email")
        found = [c for c in self.stored("customer") if email is None or c["email"] == email]
        return self._page(found, params, "/v1/customers")

    def search_customers(self, params: Obj) -> Obj:
        return self._search("customer", params, "/v1/customers/search")

    def _search(self, object_type: str, params: Obj, url: str) -> Obj:
        _check_known(params, ("query", "limit", "page"))
        clauses = _search_clauses(_str(params, "query", required=True) or "")
        found = [self.render(o) for o in reversed(self.stored(object_type)) if _matches(o, clauses)]
        limit = _int(params, "limit", minimum=1) or LIST_LIMIT_DEFAULT
        start = _int(params, "page", minimum=0) or 0  # the fake's page token is simply an offset
        more = start + limit < len(found)
        return {
            "object": "search_result",
            "data": found[start : start + limit],
            "has_more": more,
            "next_page": str(start + limit) if more else None,
            "url": url,
        }

    def _payment_method(self, payment_method: str | None, param: str) -> str | None:
        if payment_method is not None and payment_method not in TEST_PAYMENT_METHODS:
            raise _missing("PaymentMethod", payment_method, param)
        return payment_method

    # -- invoice items --

    def create_invoice_item(self, params: Obj) -> Obj:
        _check_known(
            params,
            (
                "customer",
                "invoice",
                "amount",
                "currency",
                "quantity",
                "unit_amount_decimal",
                "description",
                "metadata",
                "period",
            ),
        )
        customer = self._find("customer", _str(params, "customer", required=True), param="customer")
        invoice_id = _str(params, "invoice")
        invoice = self._find("invoice", invoice_id, param="invoice") if invoice_id else None
        currency = _currency(params)
        if invoice is not None:
            if invoice["customer"] != customer["id"]:
                raise StripeApiError(
                    400, f"Invoice {invoice['id']} belongs to another customer.", param="invoice"
                )
            if invoice["status"] != "draft":
                raise StripeApiError(
                    400,
                    "Invoice items can only be added to draft invoices.",
                    code="invoice_not_editable",
                    param="invoice",
                )
            if len(self._items_of(invoice["id"])) >= MAX_INVOICE_ITEMS:
                raise StripeApiError(
                    400, f"An invoice can have at most {MAX_INVOICE_ITEMS} invoice items.", param="invoice"
                )
            if currency is not None and currency != invoice["currency"]:
                raise StripeApiError(
                    400,
                    f"The currency {currency} does not match the invoice's currency {invoice['currency']}.",
                    param="currency",
                )
            currency = invoice["currency"]
        if currency is None:
            raise StripeApiError(
                400, "Missing required param: currency.", code="parameter_missing", param="currency"
            )
        amount = _int(params, "amount")
        quantity = _int(params, "quantity", minimum=0)
        unit = _decimal(params, "unit_amount_decimal")
        if amount is not None and unit is not None:
            raise StripeApiError(
                400,
                "You may only specify one of these parameters: amount, unit_amount_decimal.",
                param="amount",
            )
        if amount is None and unit is None:
            raise StripeApiError(
                400, "Missing required param: amount.", code="parameter_missing", param="amount"
            )
        if unit is not None:
            quantity = 1 if quantity is None else quantity
            # Stripe keeps up to 12 decimals of unit price and rounds the line to the minor unit.
            amount = int((unit * quantity).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        else:
            if quantity is not None:
                raise StripeApiError(
                    400, "quantity needs unit_amount_decimal; amount is the line's total.", param="quantity"
                )
            assert amount is not None
            unit, quantity = Decimal(amount), 1
        period = _dict(params, "period")
        _check_known(period, ("start", "end"))
        now = self.now()
        item = self._base("ii", "invoiceitem") | {
            "amount": amount,
            "currency": currency,
            "customer": customer["id"],
            "date": now,
            "description": _str(params, "description"),
            "invoice": invoice["id"] if invoice else None,
            "metadata": _merge_metadata({}, params),
            "period": {
                "start": _int(period, "start") if "start" in period else now,
                "end": _int(period, "end") if "end" in period else now,
            },
            "quantity": quantity,
            "unit_amount_decimal": str(unit),
            "_line_id": self.new_id("il"),
        }
        self._objects[item["id"]] = item
        return self.render(item)

    def retrieve_invoice_item(self, params: Obj, item_id: str) -> Obj:
        _check_known(params, ())
        return self.render(self._find("invoiceitem", item_id))

    def list_invoice_items(self, params: Obj) -> Obj:
        _check_known(params, ("limit", "starting_after", "invoice", "customer", "pending"))
        invoice = _str(params, "invoice")
        customer = _str(params, "customer")
        pending = _bool(params, "pending", False) if "pending" in params else None
        found = [
            item
            for item in self.stored("invoiceitem")
            if (invoice is None or item["invoice"] == invoice)
            and (customer is None or item["customer"] == customer)
            and (pending is None or (item["invoice"] is None) == pending)
        ]
        return self._page(found, params, "/v1/invoiceitems")

    def delete_invoice_item(self, params: Obj, item_id: str) -> Obj:
        _check_known(params, ())
        item = self._find("invoiceitem", item_id)
        if item["invoice"] is not None and self._objects[item["invoice"]]["status"] != "draft":
            raise StripeApiError(
                400, "Invoice items on finalized invoices cannot be deleted.", code="invoice_not_editable"
            )
        del self._objects[item_id]
        return {"id": item_id, "object": "invoiceitem", "deleted": True}

    def _items_of(self, invoice_id: str) -> list[Obj]:
        return [item for item in self.stored("invoiceitem") if item["invoice"] == invoice_id]

    def _line(self, item: Obj) -> Obj:
        return {
            "id": item["_line_id"],
            "object": "line_item",
            "amount": item["amount"],
            "currency": item["currency"],
            "description": item["description"],
            "invoice": item["invoice"],
            "livemode": False,
            "metadata": dict(item["metadata"]),
            "period": dict(item["period"]),
            "quantity": item["quantity"],
            "pricing": {"type": None, "unit_amount_decimal": item["unit_amount_decimal"]},
            "parent": {
                "type": "invoice_item_details",
                "invoice_item_details": {"invoice_item": item["id"]},
            },
        }

    # -- invoices --

    def create_invoice(self, params: Obj) -> Obj:
        _check_known(
            params,
            (
                "customer",
                "auto_advance",
                "collection_method",
                "days_until_due",
                "currency",
                "description",
                "metadata",
                "default_payment_method",
                "pending_invoice_items_behavior",
            ),
        )
        customer = self._find("customer", _str(params, "customer", required=True), param="customer")
        collection = _str(params, "collection_method", choices=("charge_automatically", "send_invoice"))
        collection = collection or "charge_automatically"
        days_until_due = _int(params, "days_until_due", minimum=0)
        if collection == "send_invoice" and days_until_due is None:
            raise StripeApiError(
                400,
                "Missing required param: days_until_due (required when collection_method is send_invoice).",
                code="parameter_missing",
                param="days_until_due",
            )
        if collection == "charge_automatically" and days_until_due is not None:
            raise StripeApiError(
                400,
                "days_until_due is only valid with collection_method send_invoice.",
                param="days_until_due",
            )
        pending = _str(params, "pending_invoice_items_behavior", choices=("exclude", "include")) or "exclude"
        invoice = self._base("in", "invoice") | {
            "customer": customer["id"],
            "currency": _currency(params) or "usd",
            "status": "draft",
            "auto_advance": _bool(params, "auto_advance", False),
            "collection_method": collection,
            "days_until_due": days_until_due,
            "due_date": None,
            "description": _str(params, "description"),
            "metadata": _merge_metadata({}, params),
            "number": None,
            "default_payment_method": self._payment_method(
                _str(params, "default_payment_method"), "default_payment_method"
            ),
            "amount_paid": 0,
            "attempt_count": 0,
            "attempted": False,
            "next_payment_attempt": None,
            "paid_out_of_band": False,
            "pre_payment_credit_notes_amount": 0,
            "post_payment_credit_notes_amount": 0,
            "status_transitions": {
                "finalized_at": None,
                "paid_at": None,
                "voided_at": None,
                "marked_uncollectible_at": None,
            },
        }
        self._objects[invoice["id"]] = invoice
        if pending == "include":
            for item in self.stored("invoiceitem"):
                if item["customer"] == customer["id"] and item["invoice"] is None:
                    item["invoice"] = invoice["id"]
        self.emit("invoice.created", invoice)
        return self.render(invoice)

    def _render_invoice(self, invoice: Obj) -> Obj:
        rendered = copy.deepcopy(invoice)
        lines = [self._line(item) for item in self._items_of(invoice["id"])]
        total = sum(line["amount"] for line in lines)
        amount_due = max(total - invoice["pre_payment_credit_notes_amount"], 0)
        rendered |= {
            "subtotal": total,
            "total": total,
            "amount_due": amount_due,
            "amount_remaining": 0
            if invoice["status"] in ("paid", "void")
            else amount_due - invoice["amount_paid"],
            "lines": self._list(lines, f"/v1/invoices/{invoice['id']}/lines", limit=EMBEDDED_LINES),
        }
        return {k: v for k, v in rendered.items() if not k.startswith("_")}

    def retrieve_invoice(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ())
        return self.render(self._find("invoice", invoice_id))

    def update_invoice(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ("auto_advance", "description", "metadata", "default_payment_method"))
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] in ("paid", "void"):
            raise StripeApiError(
                400,
                f"This invoice is {invoice['status']} and can no longer be updated.",
                code="invoice_not_editable",
            )
        if "auto_advance" in params:
            invoice["auto_advance"] = _bool(params, "auto_advance", False)
        if "description" in params:
            invoice["description"] = _str(params, "description")
        if "default_payment_method" in params:
            invoice["default_payment_method"] = self._payment_method(
                _str(params, "default_payment_method"), "default_payment_method"
            )
        invoice["metadata"] = _merge_metadata(invoice["metadata"], params)
        self.emit("invoice.updated", invoice)
        return self.render(invoice)

    def delete_invoice(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ())
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] != "draft":
            raise StripeApiError(400, "You can only delete draft invoices.", code="invoice_not_editable")
        for item in self._items_of(invoice_id):
            del self._objects[item["id"]]
        del self._objects[invoice_id]
        self.emit("invoice.deleted", invoice)
        return {"id": invoice_id, "object": "invoice", "deleted": True}

    def list_invoices(self, params: Obj) -> Obj:
        _check_known(params, ("limit", "starting_after", "customer", "status", "collection_method"))
        wanted = {name: _str(params, name) for name in ("customer", "status", "collection_method")}
        found = [
            invoice
            for invoice in self.stored("invoice")
            if all(value is None or invoice[name] == value for name, value in wanted.items())
        ]
        return self._page(found, params, "/v1/invoices")

    def search_invoices(self, params: Obj) -> Obj:
        return self._search("invoice", params, "/v1/invoices/search")

    def list_invoice_lines(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ("limit", "starting_after"))
        invoice = self._find("invoice", invoice_id)
        lines = [self._line(item) for item in self._items_of(invoice["id"])]
        # Lines page in the order they were added, unlike most lists.
        limit = _int(params, "limit", minimum=1) or LIST_LIMIT_DEFAULT
        if limit > LIST_LIMIT_MAX:
            raise StripeApiError(
                400, f"This value must be less than or equal to {LIST_LIMIT_MAX}.", param="limit"
            )
        start = 0
        after = _str(params, "starting_after")
        if after is not None:
            ids = [line["id"] for line in lines]
            if after not in ids:
                raise _missing("line_item", after, "starting_after")
            start = ids.index(after) + 1
        return self._list(lines, f"/v1/invoices/{invoice_id}/lines", limit=limit, start=start)

    def finalize_invoice(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ("auto_advance",))
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] != "draft":
            raise StripeApiError(
                400,
                "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
                code="invoice_not_editable",
            )
        if "auto_advance" in params:
            invoice["auto_advance"] = _bool(params, "auto_advance", False)
        self._finalize(invoice)
        return self.render(invoice)

    def _finalize(self, invoice: Obj) -> None:
        now = self.now()
        self._invoice_numbers += 1
        invoice["status"] = "open"
        invoice["number"] = f"FAKE-{self._invoice_numbers:04d}"
        invoice["status_transitions"]["finalized_at"] = now
        if invoice["days_until_due"] is not None:
            invoice["due_date"] = now + invoice["days_until_due"] * 86_400
        self.emit("invoice.finalized", invoice)
        if self.render(invoice)["amount_due"] == 0:
            self._mark_paid(invoice)  # Stripe closes a zero-amount invoice at finalization

    def _mark_paid(self, invoice: Obj) -> None:
        invoice["amount_paid"] = self.render(invoice)["amount_due"]
        invoice["status"] = "paid"
        invoice["next_payment_attempt"] = None
        invoice["status_transitions"]["paid_at"] = self.now()
        self.emit("invoice.paid", invoice)

    def pay_invoice(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ("paid_out_of_band", "payment_method", "off_session", "forgive"))
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] == "paid":
            raise StripeApiError(400, "Invoice is already paid", code="invoice_already_paid")
        if invoice["status"] not in ("open", "uncollectible"):
            raise StripeApiError(
                400, f"You can only pay open or uncollectible invoices; this one is {invoice['status']}."
            )
        if _bool(params, "paid_out_of_band", False):
            invoice["paid_out_of_band"] = True
            self._mark_paid(invoice)
            return self.render(invoice)
        customer = self._objects[invoice["customer"]]
        payment_method = (
            self._payment_method(_str(params, "payment_method"), "payment_method")
            or invoice["default_payment_method"]
            or customer["invoice_settings"]["default_payment_method"]
            or customer["_attached_payment_method"]
        )
        invoice["attempt_count"] += 1
        invoice["attempted"] = True
        if payment_method is None:
            decline: tuple[str, str | None, str] | None = (
                "missing",
                None,
                "Cannot charge a customer that has no active card",
            )
        else:
            decline = TEST_PAYMENT_METHODS[payment_method]
        if decline is not None:
            self.emit("invoice.payment_failed", invoice)
            code, decline_code, message = decline
            raise StripeApiError(
                402, message, type="card_error", code=code, decline_code=decline_code, param="", ran=True
            )
        self._mark_paid(invoice)
        self.emit("invoice.payment_succeeded", invoice)
        return self.render(invoice)

    def send_invoice(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ())
        invoice = self._find("invoice", invoice_id)
        if invoice["collection_method"] != "send_invoice":
            raise StripeApiError(
                400, "You can only manually send an invoice if its collection method is 'send_invoice'."
            )
        if invoice["status"] == "draft":
            self._finalize(invoice)
        if invoice["status"] not in ("open", "paid"):
            raise StripeApiError(400, f"You cannot send an invoice that is {invoice['status']}.")
        self.emit("invoice.sent", invoice)
        return self.render(invoice)

    def void_invoice(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ())
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] not in ("open", "uncollectible"):
            raise StripeApiError(400, "You can only pass in open invoices. This invoice isn't open.")
        invoice["status"] = "void"
        invoice["next_payment_attempt"] = None
        invoice["status_transitions"]["voided_at"] = self.now()
        self.emit("invoice.voided", invoice)
        return self.render(invoice)

    def mark_uncollectible(self, params: Obj, invoice_id: str) -> Obj:
        _check_known(params, ())
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] != "open":
            raise StripeApiError(400, "You can only mark open invoices as uncollectible.")
        invoice["status"] = "uncollectible"
        invoice["next_payment_attempt"] = None
        invoice["status_transitions"]["marked_uncollectible_at"] = self.now()
        self.emit("invoice.marked_uncollectible", invoice)
        return self.render(invoice)

    # -- credit notes --

    def create_credit_note(self, params: Obj) -> Obj:
        _check_known(
            params,
            (
                "invoice",
                "amount",
                "lines",
                "reason",
                "memo",
                "metadata",
                "credit_amount",
                "refund_amount",
                "out_of_band_amount",
            ),
        )
        invoice = self._find("invoice", _str(params, "invoice", required=True), param="invoice")
        if invoice["status"] not in ("open", "paid", "uncollectible"):
            raise StripeApiError(
                400,
                f"Credit notes can only be issued on finalized invoices; this one is {invoice['status']}.",
            )
        reason = _str(
            params,
            "reason",
            choices=("duplicate", "fraudulent", "order_change", "product_unsatisfactory"),
        )
        lines = self._credit_note_lines(invoice, params.get("lines", []))
        amount = _int(params, "amount", minimum=1)
        if not lines:
            if amount is None:
                raise StripeApiError(
                    400, "You must pass either amount or lines.", code="parameter_missing", param="amount"
                )
            lines = [self._credit_line("custom_line_item", amount, 1, amount, "Credit", None)]
        total = sum(line["amount"] for line in lines)
        if amount is not None and amount != total:
            raise StripeApiError(
                400, f"The amount ({amount}) must equal the sum of the lines ({total}).", param="amount"
            )
        rendered = self.render(invoice)
        credited = sum(
            cn["amount"]
            for cn in self.stored("credit_note")
            if cn["invoice"] == invoice["id"] and cn["status"] != "void"
        )
        if total > rendered["total"] - credited:
            raise StripeApiError(
                400,
                f"The credit note amount ({total}) exceeds the invoice's remaining creditable amount "
                f"({rendered['total'] - credited}).",
                param="amount",
            )
        pre_payment = invoice["status"] != "paid"
        split = {
            name: _int(params, name, minimum=0)
            for name in ("credit_amount", "refund_amount", "out_of_band_amount")
        }
        if pre_payment:
            if any(value for value in split.values()):
                raise StripeApiError(
                    400, "credit_amount, refund_amount and out_of_band_amount apply to paid invoices only."
                )
            if total > rendered["amount_remaining"]:
                raise StripeApiError(
                    400, f"The credit note amount ({total}) exceeds the amount remaining.", param="amount"
                )
        elif all(value is None for value in split.values()):
            split["credit_amount"] = total  # Stripe's default: credit the customer's balance
        elif sum(value or 0 for value in split.values()) != total:
            raise StripeApiError(
                400,
                "The sum of credit amount, refund amount and out of band amount must equal the credit note "
                "amount.",
                param="amount",
            )
        previous = sum(1 for cn in self.stored("credit_note") if cn["invoice"] == invoice["id"])
        note = self._base("cn", "credit_note") | {
            "amount": total,
            "currency": invoice["currency"],
            "customer": invoice["customer"],
            "invoice": invoice["id"],
            "number": f"{invoice['number']}-CN-{previous + 1:02d}",
            "memo": _str(params, "memo"),
            "metadata": _merge_metadata({}, params),
            "reason": reason,
            "status": "issued",
            "type": "pre_payment" if pre_payment else "post_payment",
            "credit_amount": split["credit_amount"] or 0,
            "refund_amount": split["refund_amount"] or 0,
            "out_of_band_amount": split["out_of_band_amount"] or 0,
            "voided_at": None,
            "lines": lines,
        }
        self._objects[note["id"]] = note
        key = "pre_payment_credit_notes_amount" if pre_payment else "post_payment_credit_notes_amount"
        invoice[key] += total
        self.emit("credit_note.created", note)
        if pre_payment and self.render(invoice)["amount_remaining"] == 0:
            self._mark_paid(invoice)  # a credit note that covers what is left settles the invoice
        return self.render(note)

    def _credit_note_lines(self, invoice: Obj, raw_lines: Any) -> list[Obj]:
        if raw_lines == "":
            return []
        if not isinstance(raw_lines, list):
            raise StripeApiError(400, "Invalid array", param="lines")
        invoice_lines = {line["id"]: line for line in map(self._line, self._items_of(invoice["id"]))}
        credited_per_line: dict[str, int] = {}
        for cn in self.stored("credit_note"):
            if cn["invoice"] == invoice["id"] and cn["status"] != "void":
                for line in cn["lines"]:
                    if line["invoice_line_item"]:
                        credited_per_line[line["invoice_line_item"]] = (
                            credited_per_line.get(line["invoice_line_item"], 0) + line["amount"]
                        )
        lines: list[Obj] = []
        for index, raw in enumerate(raw_lines):
            where = f"lines[{index}]"
            if not isinstance(raw, dict):
                raise StripeApiError(400, "Invalid object", param=where)
            _check_known(
                raw,
                ("type", "invoice_line_item", "amount", "quantity", "unit_amount", "description", "metadata"),
            )
            kind = _str(raw, "type", required=True, choices=("invoice_line_item", "custom_line_item")) or ""
            quantity = _int(raw, "quantity", minimum=1)
            amount = _int(raw, "amount", minimum=1)
            if kind == "invoice_line_item":
                line_id = _str(raw, "invoice_line_item", required=True) or ""
                line = invoice_lines.get(line_id)
                if line is None:
                    raise _missing("line_item", line_id, f"{where}[invoice_line_item]")
                if amount is None:
                    quantity = quantity or line["quantity"]
                    if line["quantity"] == 0 or line["amount"] * quantity % line["quantity"]:
                        raise StripeApiError(400, "Pass amount for this line.", param=f"{where}[amount]")
                    amount = line["amount"] * quantity // line["quantity"]
                already = credited_per_line.get(line_id, 0)
                if amount + already > line["amount"]:
                    raise StripeApiError(
                        400,
                        f"The amount for {where} ({amount}) exceeds what is left to credit on that line "
                        f"({line['amount'] - already}).",
                        param=f"{where}[amount]",
                    )
                credited_per_line[line_id] = already + amount
                lines.append(
                    self._credit_line(
                        kind, amount, quantity or line["quantity"], None, line["description"], line_id, raw
                    )
                )
            else:
                unit = _int(raw, "unit_amount", minimum=1)
                quantity = quantity or 1
                if unit is None:
                    raise StripeApiError(
                        400,
                        "Missing required param: unit_amount.",
                        code="parameter_missing",
                        param=f"{where}[unit_amount]",
                    )
                description = _str(raw, "description", required=True)
                lines.append(self._credit_line(kind, unit * quantity, quantity, unit, description, None, raw))
        return lines

    def _credit_line(
        self,
        kind: str,
        amount: int,
        quantity: int,
        unit_amount: int | None,
        description: str | None,
        invoice_line_item: str | None,
        raw: Obj | None = None,
    ) -> Obj:
        return {
            "id": self.new_id("cnli"),
            "object": "credit_note_line_item",
            "type": kind,
            "amount": amount,
            "quantity": quantity,
            "unit_amount": unit_amount,
            "description": description,
            "invoice_line_item": invoice_line_item,
            "metadata": _merge_metadata({}, raw or {}),
            "livemode": False,
        }

    def retrieve_credit_note(self, params: Obj, note_id: str) -> Obj:
        _check_known(params, ())
        return self.render(self._find("credit_note", note_id))

    def list_credit_notes(self, params: Obj) -> Obj:
        _check_known(params, ("limit", "starting_after", "invoice", "customer"))
        invoice = _str(params, "invoice")
        customer = _str(params, "customer")
        found = [
            cn
            for cn in self.stored("credit_note")
            if (invoice is None or cn["invoice"] == invoice)
            and (customer is None or cn["customer"] == customer)
        ]
        return self._page(found, params, "/v1/credit_notes")

    def void_credit_note(self, params: Obj, note_id: str) -> Obj:
        _check_known(params, ())
        note = self._find("credit_note", note_id)
        if note["status"] == "void":
            raise StripeApiError(400, "This credit note is already void.")
        invoice = self._objects[note["invoice"]]
        if note["type"] == "pre_payment":
            if invoice["status"] == "paid":
                raise StripeApiError(
                    400, "The credit note's invoice is paid; its credit can no longer be voided."
                )
            invoice["pre_payment_credit_notes_amount"] -= note["amount"]
        else:
            invoice["post_payment_credit_notes_amount"] -= note["amount"]
        note["status"] = "void"
        note["voided_at"] = self.now()
        self.emit("credit_note.voided", note)
        return self.render(note)


# --- the HTTP server ----------------------------------------------------------------------------------------


class FakeStripe:
    """The fake Stripe API on 127.0.0.1 and a free port; use as a context manager or start()/close()."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (DEFAULT_API_KEY,),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_key = next(iter(api_keys))
        self.state = StripeState(api_keys=api_keys, clock=clock)
        self._clock = clock
        self._faults: list[_Fault] = []
        self._log: list[RecordedRequest] = []
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-stripe", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FakeStripe:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self.release()  # held requests end now instead of at their deadline
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(
        self, *, api_key: str | None = None, max_network_retries: int = 0, timeout: float = 30.0
    ) -> stripe.StripeClient:
        """A real StripeClient pointed here; sync calls go through requests, `_async` ones through httpx."""
        http_client = stripe.RequestsClient(
            timeout=timeout, async_fallback_client=stripe.HTTPXClient(timeout=timeout)
        )
        return stripe.StripeClient(
            api_key or self.api_key,
            base_addresses={"api": self.url},
            max_network_retries=max_network_retries,
            http_client=http_client,
        )

    # -- faults --

    def fail_next(
        self,
        pattern: str,
        status: int = 500,
        *,
        times: int = 1,
        method: str | None = None,
        code: str | None = None,
        decline_code: str | None = None,
        message: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        """Answer the next `times` requests whose path matches `pattern` (fnmatch: `/v1/invoices/*/pay`)
        with an error, before they run: nothing changes and nothing is stored under their idempotency key,
        as for a Stripe request refused by a busy or failing front end. `should_retry` sets the
        `Stripe-Should-Retry` header, which the SDK obeys over its own rules."""
        error_type, default_code, default_message = _DEFAULT_ERRORS.get(
            status, ("api_error", None, "An unknown error occurred on Stripe's side.")
        )
        if status == 402 and decline_code is None:
            decline_code = "generic_decline"
        headers = {} if should_retry is None else {"Stripe-Should-Retry": "true" if should_retry else "false"}
        error = StripeApiError(
            status,
            message or default_message,
            type=error_type,
            code=code or default_code,
            decline_code=decline_code,
            headers=headers,
        )
        self._add_fault(_Fault("status", pattern, method, times, error=error))

    def delay_next(
        self,
        pattern: str,
        *,
        times: int = 1,
        method: str | None = None,
        after: bool = False,
        seconds: float = 60.0,
    ) -> None:
        """Hold the next `times` matching requests until `release()` (or `seconds`, a backstop), before
        they run or, with `after=True`, after they ran and were stored. Give the client a short timeout:
        it times out because the hold outlasts it, never because of how fast the machine is."""
        self._add_fault(_Fault("delay", pattern, method, times, after=after, hold_seconds=seconds))

    def disconnect_next(
        self, pattern: str, *, times: int = 1, method: str | None = None, after: bool = True
    ) -> None:
        """Close the connection of the next `times` matching requests without an answer; by default after
        they ran (the object exists, the caller never heard): the crash window that idempotency keys cover."""
        self._add_fault(_Fault("disconnect", pattern, method, times, after=after))

    def release(self) -> None:
        """Let every held request go on."""
        with self.state.lock:
            for fault in self._faults:
                fault.released.set()

    def _add_fault(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("times must be at least 1")
        with self.state.lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self.state.lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    # -- inspection --

    def requests(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """The requests seen so far, oldest first; `path` is an fnmatch pattern."""
        with self.state.lock:
            return [
                r
                for r in self._log
                if (method is None or r.method == method)
                and (path is None or fnmatch.fnmatchcase(r.path, path))
            ]

    def objects(self, object_type: str) -> list[Obj]:
        """Every stored object of a type ("customer", "invoice", "invoiceitem", "credit_note"), oldest first,
        as the API would show it."""
        with self.state.lock:
            return [self.state.render(obj) for obj in self.state.stored(object_type)]

    def get(self, object_id: str) -> Obj:
        with self.state.lock:
            obj = self.state._objects.get(object_id)
            if obj is None:
                raise KeyError(object_id)
            return self.state.render(obj)

    def set_default_payment_method(self, customer_id: str, payment_method: str) -> None:
        """What a customer does in Stripe's hosted pages, outside the API under test."""
        if payment_method not in TEST_PAYMENT_METHODS:
            raise ValueError(f"unknown test payment method {payment_method!r}")
        with self.state.lock:
            self.state._find("customer", customer_id)["invoice_settings"]["default_payment_method"] = (
                payment_method
            )

    def revoke_api_key(self, api_key: str | None = None) -> None:
        """Make a key invalid from now on (401), as rolling it in the dashboard would."""
        with self.state.lock:
            self.state.api_keys.discard(api_key or self.api_key)

    # -- events --

    def events(self, event_type: str | None = None) -> list[Obj]:
        """The events Stripe would have sent for the changes so far, oldest first."""
        with self.state.lock:
            return [e for e in self.state.events() if event_type is None or e["type"] == event_type]

    def event(
        self, event_type: str, obj: str | Obj, *, previous_attributes: Obj | None = None, **overrides: Any
    ) -> Obj:
        """An event about a stored object (by id, as it is now) or any object given as a dict; `overrides`
        replace fields of the object, e.g. `attempt_count=2, next_payment_attempt=ts`."""
        rendered = self.get(obj) if isinstance(obj, str) else copy.deepcopy(obj)
        with self.state.lock:
            return self.state.event(event_type, rendered | overrides, previous_attributes)

    def sign(
        self, event: Obj | str, secret: str = DEFAULT_WEBHOOK_SECRET, *, timestamp: int | None = None
    ) -> tuple[bytes, str]:
        """The body and `Stripe-Signature` header of a webhook delivery, signed by the SDK's own code."""
        payload = event if isinstance(event, str) else json.dumps(event)
        when = int(self._clock()) if timestamp is None else timestamp
        header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=when)
        return payload.encode(), header

    # -- serving (on the server's threads) --

    def _record(self, entry: RecordedRequest) -> None:
        with self.state.lock:
            self._log.append(entry)

    def _serve(self, method: str, path: str, params: Obj, headers: dict[str, str]) -> Response | None:
        """Answer one request, faults included; None means close the connection without an answer."""
        response = self._serve_faulty(method, path, params, headers)
        if response is not None:
            key = headers.get("idempotency-key")
            if key is not None:
                response.headers["Idempotency-Key"] = key
            response.headers["Request-Id"] = f"req_{uuid.uuid4().hex[:14]}"
            response.headers["Stripe-Version"] = headers.get("stripe-version", stripe.api_version)
        return response

    def _serve_faulty(self, method: str, path: str, params: Obj, headers: dict[str, str]) -> Response | None:
        key = headers.get("idempotency-key")
        fault = self._take_fault(method, path)
        if fault is not None and not fault.after:
            if fault.kind == "status":
                assert fault.error is not None
                self._record(RecordedRequest(method, path, params, key, fault.error.status, fault="status"))
                return Response(fault.error.status, {"error": fault.error.error}, dict(fault.error.headers))
            if fault.kind == "disconnect":
                self._record(RecordedRequest(method, path, params, key, None, fault="disconnect"))
                return None
            fault.released.wait(fault.hold_seconds)
            if self._closing.is_set():
                return None
        try:
            response, replayed = self.state.handle(method, path, params, headers)
        except StripeApiError as error:
            response, replayed = Response(error.status, {"error": error.error}, dict(error.headers)), False
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        after = fault.kind if fault is not None and fault.after else None
        self._record(
            RecordedRequest(
                method, path, params, key, None if after == "disconnect" else response.status, replayed, after
            )
        )
        if fault is not None and fault.after:
            if fault.kind == "disconnect":
                return None
            fault.released.wait(fault.hold_seconds)
        return response


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeStripe


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one connection per request, so no idle keep-alive threads outlive a test.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_DELETE(self) -> None:
        self._answer("DELETE")

    def _answer(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            params = parse_form(body if method == "POST" else url.query)
        except StripeApiError as error:
            response: Response | None = Response(error.status, {"error": error.error})
        else:
            response = self.server.fake._serve(method, url.path, params, headers)
        if response is None:
            self.close_connection = True
            return
        payload = json.dumps(response.body, indent=2).encode()
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout); Stripe would not notice either

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is fake.requests(); stderr noise would hide test output
