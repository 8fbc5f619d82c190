"""Stripe's objects and endpoints, free of HTTP: customers, invoice items, invoices, credit notes.

Objects are plain dicts shaped as the API shows them (`id` with Stripe's prefix, `object`, `created`,
`livemode: false`, amounts as integers in minor units); fields starting with "_" are the fake's own and never
leave it. Computed fields (an invoice's totals and embedded `lines`) are derived on every read, so they cannot
drift from the items.
"""

from __future__ import annotations

import copy
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import stripe

from tests.fake_stripe.forms import (
    Obj,
    StripeApiError,
    check_known,
    matches_search,
    merge_metadata,
    missing,
    read_bool,
    read_currency,
    read_decimal,
    read_dict,
    read_int,
    read_str,
    search_clauses,
)

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


@dataclass(slots=True)
class Response:
    status: int
    body: Obj
    headers: dict[str, str] = field(default_factory=dict)


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
            # A refused request leaves nothing half-written, as at Stripe: writes roll back to this snapshot.
            snapshot = None if method == "GET" else (copy.deepcopy(self._objects), len(self._events))
            numbers = self._invoice_numbers
            try:
                response = Response(200, handler(params, *ids))
            except StripeApiError as error:
                if not error.ran:
                    if snapshot is not None:
                        self._objects, self._invoice_numbers = snapshot[0], numbers
                        del self._events[snapshot[1] :]
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
            "see tests/fake_stripe/api.py.",
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
            raise missing(object_type, object_id or "", param)
        return obj

    def stored(self, object_type: str) -> list[Obj]:
        return [obj for obj in self._objects.values() if obj["object"] == object_type]

    def stored_object(self, object_id: str) -> Obj | None:
        return self._objects.get(object_id)

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
        limit = read_int(params, "limit", minimum=1) or LIST_LIMIT_DEFAULT
        if limit > LIST_LIMIT_MAX:
            raise StripeApiError(
                400, f"This value must be less than or equal to {LIST_LIMIT_MAX}.", param="limit"
            )
        ordered = list(reversed(objs)) if newest_first else list(objs)
        start = 0
        after = read_str(params, "starting_after")
        if after is not None:
            ids = [obj["id"] for obj in ordered]
            if after not in ids:
                raise missing("object", after, "starting_after")
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
        check_known(
            params, ("email", "name", "description", "metadata", "payment_method", "invoice_settings")
        )
        payment_method = self._payment_method(read_str(params, "payment_method"), "payment_method")
        settings = read_dict(params, "invoice_settings")
        check_known(settings, ("default_payment_method",))
        default = self._payment_method(
            read_str(settings, "default_payment_method"), "invoice_settings[default_payment_method]"
        )
        customer = self._base("cus", "customer") | {
            "email": read_str(params, "email"),
            "name": read_str(params, "name"),
            "description": read_str(params, "description"),
            "metadata": merge_metadata({}, params),
            "currency": None,
            "invoice_settings": {"default_payment_method": default},
            # Attached only: as at Stripe, invoices charge a default payment method, not any attached one.
            "_attached_payment_method": payment_method,
        }
        self._objects[customer["id"]] = customer
        self.emit("customer.created", customer)
        return self.render(customer)

    def retrieve_customer(self, params: Obj, customer_id: str) -> Obj:
        check_known(params, ())
        return self.render(self._find("customer", customer_id))

    def update_customer(self, params: Obj, customer_id: str) -> Obj:
        check_known(params, ("email", "name", "description", "metadata", "invoice_settings"))
        customer = self._find("customer", customer_id)
        for name in ("email", "name", "description"):
            if name in params:
                customer[name] = read_str(params, name)
        customer["metadata"] = merge_metadata(customer["metadata"], params)
        settings = read_dict(params, "invoice_settings")
        check_known(settings, ("default_payment_method",))
        if "default_payment_method" in settings:
            customer["invoice_settings"]["default_payment_method"] = self._payment_method(
                read_str(settings, "default_payment_method"), "invoice_settings[default_payment_method]"
            )
        self.emit("customer.updated", customer)
        return self.render(customer)

    def set_default_payment_method(self, customer_id: str, payment_method: str) -> None:
        """What a customer does in Stripe's hosted pages, outside the API."""
        customer = self._find("customer", customer_id)
        customer["invoice_settings"]["default_payment_method"] = self._payment_method(
            payment_method, "payment_method"
        )
        self.emit("customer.updated", customer)

    def list_customers(self, params: Obj) -> Obj:
        check_known(params, ("limit", "starting_after", "email"))
        email = read_str(params, "email")
        found = [c for c in self.stored("customer") if email is None or c["email"] == email]
        return self._page(found, params, "/v1/customers")

    def search_customers(self, params: Obj) -> Obj:
        return self._search("customer", params, "/v1/customers/search")

    def _search(self, object_type: str, params: Obj, url: str) -> Obj:
        check_known(params, ("query", "limit", "page"))
        clauses = search_clauses(read_str(params, "query", required=True) or "")
        found = [self.render(o) for o in reversed(self.stored(object_type)) if matches_search(o, clauses)]
        limit = read_int(params, "limit", minimum=1) or LIST_LIMIT_DEFAULT
        start = read_int(params, "page", minimum=0) or 0  # the fake's page token is simply an offset
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
            raise missing("PaymentMethod", payment_method, param)
        return payment_method

    # -- invoice items --

    def create_invoice_item(self, params: Obj) -> Obj:
        check_known(
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
        customer = self._find("customer", read_str(params, "customer", required=True), param="customer")
        invoice_id = read_str(params, "invoice")
        invoice = self._find("invoice", invoice_id, param="invoice") if invoice_id else None
        currency = read_currency(params)
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
        amount = read_int(params, "amount")
        quantity = read_int(params, "quantity", minimum=0)
        unit = read_decimal(params, "unit_amount_decimal")
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
        period = read_dict(params, "period")
        check_known(period, ("start", "end"))
        now = self.now()
        item = self._base("ii", "invoiceitem") | {
            "amount": amount,
            "currency": currency,
            "customer": customer["id"],
            "date": now,
            "description": read_str(params, "description"),
            "invoice": invoice["id"] if invoice else None,
            "metadata": merge_metadata({}, params),
            "period": {
                "start": read_int(period, "start") if "start" in period else now,
                "end": read_int(period, "end") if "end" in period else now,
            },
            "quantity": quantity,
            "unit_amount_decimal": str(unit),
            "_line_id": self.new_id("il"),
        }
        self._objects[item["id"]] = item
        return self.render(item)

    def retrieve_invoice_item(self, params: Obj, item_id: str) -> Obj:
        check_known(params, ())
        return self.render(self._find("invoiceitem", item_id))

    def list_invoice_items(self, params: Obj) -> Obj:
        check_known(params, ("limit", "starting_after", "invoice", "customer", "pending"))
        invoice = read_str(params, "invoice")
        customer = read_str(params, "customer")
        pending = read_bool(params, "pending", False) if "pending" in params else None
        found = [
            item
            for item in self.stored("invoiceitem")
            if (invoice is None or item["invoice"] == invoice)
            and (customer is None or item["customer"] == customer)
            and (pending is None or (item["invoice"] is None) == pending)
        ]
        return self._page(found, params, "/v1/invoiceitems")

    def delete_invoice_item(self, params: Obj, item_id: str) -> Obj:
        check_known(params, ())
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
        check_known(
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
        customer = self._find("customer", read_str(params, "customer", required=True), param="customer")
        collection = read_str(params, "collection_method", choices=("charge_automatically", "send_invoice"))
        collection = collection or "charge_automatically"
        days_until_due = read_int(params, "days_until_due", minimum=0)
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
        pending = (
            read_str(params, "pending_invoice_items_behavior", choices=("exclude", "include")) or "exclude"
        )
        invoice = self._base("in", "invoice") | {
            "customer": customer["id"],
            "currency": read_currency(params) or "usd",
            "status": "draft",
            "auto_advance": read_bool(params, "auto_advance", False),
            "collection_method": collection,
            "days_until_due": days_until_due,
            "due_date": None,
            "description": read_str(params, "description"),
            "metadata": merge_metadata({}, params),
            "number": None,
            "default_payment_method": self._payment_method(
                read_str(params, "default_payment_method"), "default_payment_method"
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
        if pending == "include":  # Stripe's default is "exclude": pending items wait for a later invoice
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
        check_known(params, ())
        return self.render(self._find("invoice", invoice_id))

    def update_invoice(self, params: Obj, invoice_id: str) -> Obj:
        check_known(params, ("auto_advance", "description", "metadata", "default_payment_method"))
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] in ("paid", "void"):
            raise StripeApiError(
                400,
                f"This invoice is {invoice['status']} and can no longer be updated.",
                code="invoice_not_editable",
            )
        if "auto_advance" in params:
            invoice["auto_advance"] = read_bool(params, "auto_advance", False)
        if "description" in params:
            invoice["description"] = read_str(params, "description")
        if "default_payment_method" in params:
            invoice["default_payment_method"] = self._payment_method(
                read_str(params, "default_payment_method"), "default_payment_method"
            )
        invoice["metadata"] = merge_metadata(invoice["metadata"], params)
        self.emit("invoice.updated", invoice)
        return self.render(invoice)

    def delete_invoice(self, params: Obj, invoice_id: str) -> Obj:
        check_known(params, ())
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] != "draft":
            raise StripeApiError(400, "You can only delete draft invoices.", code="invoice_not_editable")
        for item in self._items_of(invoice_id):
            del self._objects[item["id"]]
        del self._objects[invoice_id]
        self.emit("invoice.deleted", invoice)
        return {"id": invoice_id, "object": "invoice", "deleted": True}

    def list_invoices(self, params: Obj) -> Obj:
        check_known(params, ("limit", "starting_after", "customer", "status", "collection_method"))
        wanted = {name: read_str(params, name) for name in ("customer", "status", "collection_method")}
        found = [
            invoice
            for invoice in self.stored("invoice")
            if all(value is None or invoice[name] == value for name, value in wanted.items())
        ]
        return self._page(found, params, "/v1/invoices")

    def search_invoices(self, params: Obj) -> Obj:
        return self._search("invoice", params, "/v1/invoices/search")

    def list_invoice_lines(self, params: Obj, invoice_id: str) -> Obj:
        check_known(params, ("limit", "starting_after"))
        invoice = self._find("invoice", invoice_id)
        lines = [self._line(item) for item in self._items_of(invoice["id"])]
        # Lines page in the order they were added, unlike most lists.
        limit = read_int(params, "limit", minimum=1) or LIST_LIMIT_DEFAULT
        if limit > LIST_LIMIT_MAX:
            raise StripeApiError(
                400, f"This value must be less than or equal to {LIST_LIMIT_MAX}.", param="limit"
            )
        start = 0
        after = read_str(params, "starting_after")
        if after is not None:
            ids = [line["id"] for line in lines]
            if after not in ids:
                raise missing("line_item", after, "starting_after")
            start = ids.index(after) + 1
        return self._list(lines, f"/v1/invoices/{invoice_id}/lines", limit=limit, start=start)

    def finalize_invoice(self, params: Obj, invoice_id: str) -> Obj:
        check_known(params, ("auto_advance",))
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] != "draft":
            raise StripeApiError(
                400,
                "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
                code="invoice_not_editable",
            )
        if "auto_advance" in params:
            invoice["auto_advance"] = read_bool(params, "auto_advance", False)
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
        check_known(params, ("paid_out_of_band", "payment_method", "off_session", "forgive"))
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] == "paid":
            raise StripeApiError(400, "Invoice is already paid", code="invoice_already_paid")
        if invoice["status"] not in ("open", "uncollectible"):
            raise StripeApiError(
                400, f"You can only pay open or uncollectible invoices; this one is {invoice['status']}."
            )
        if read_bool(params, "paid_out_of_band", False):
            invoice["paid_out_of_band"] = True
            self._mark_paid(invoice)
            return self.render(invoice)
        customer = self._objects[invoice["customer"]]
        payment_method = (
            self._payment_method(read_str(params, "payment_method"), "payment_method")
            or invoice["default_payment_method"]
            or customer["invoice_settings"]["default_payment_method"]
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
        check_known(params, ())
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
        check_known(params, ())
        invoice = self._find("invoice", invoice_id)
        if invoice["status"] not in ("open", "uncollectible"):
            raise StripeApiError(400, "You can only pass in open invoices. This invoice isn't open.")
        invoice["status"] = "void"
        invoice["next_payment_attempt"] = None
        invoice["status_transitions"]["voided_at"] = self.now()
        self.emit("invoice.voided", invoice)
        return self.render(invoice)

    def mark_uncollectible(self, params: Obj, invoice_id: str) -> Obj:
        check_known(params, ())
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
        check_known(
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
        invoice = self._find("invoice", read_str(params, "invoice", required=True), param="invoice")
        if invoice["status"] not in ("open", "paid", "uncollectible"):
            raise StripeApiError(
                400,
                f"Credit notes can only be issued on finalized invoices; this one is {invoice['status']}.",
            )
        reason = read_str(
            params,
            "reason",
            choices=("duplicate", "fraudulent", "order_change", "product_unsatisfactory"),
        )
        lines = self._credit_note_lines(invoice, params.get("lines", []))
        amount = read_int(params, "amount", minimum=1)
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
            name: read_int(params, name, minimum=0)
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
            "memo": read_str(params, "memo"),
            "metadata": merge_metadata({}, params),
            "reason": reason,
            "status": "issued",
            "type": "pre_payment" if pre_payment else "post_payment",
            "subtotal": total,
            "total": total,
            "pre_payment_amount": total if pre_payment else 0,
            "post_payment_amount": 0 if pre_payment else total,
            # The create parameters' split shows as Stripe shows it: a balance transaction and refunds.
            "customer_balance_transaction": self.new_id("cbtxn") if split["credit_amount"] else None,
            "refunds": [{"amount_refunded": split["refund_amount"], "refund": self.new_id("re")}]
            if split["refund_amount"]
            else [],
            "out_of_band_amount": split["out_of_band_amount"],
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
            check_known(
                raw,
                ("type", "invoice_line_item", "amount", "quantity", "unit_amount", "description", "metadata"),
            )
            kind = (
                read_str(raw, "type", required=True, choices=("invoice_line_item", "custom_line_item")) or ""
            )
            quantity = read_int(raw, "quantity", minimum=1)
            amount = read_int(raw, "amount", minimum=1)
            if kind == "invoice_line_item":
                line_id = read_str(raw, "invoice_line_item", required=True) or ""
                line = invoice_lines.get(line_id)
                if line is None:
                    raise missing("line_item", line_id, f"{where}[invoice_line_item]")
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
                unit = read_int(raw, "unit_amount", minimum=1)
                quantity = quantity or 1
                if unit is None:
                    raise StripeApiError(
                        400,
                        "Missing required param: unit_amount.",
                        code="parameter_missing",
                        param=f"{where}[unit_amount]",
                    )
                description = read_str(raw, "description", required=True)
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
            "metadata": merge_metadata({}, raw or {}),
            "livemode": False,
        }

    def retrieve_credit_note(self, params: Obj, note_id: str) -> Obj:
        check_known(params, ())
        return self.render(self._find("credit_note", note_id))

    def list_credit_notes(self, params: Obj) -> Obj:
        check_known(params, ("limit", "starting_after", "invoice", "customer"))
        invoice = read_str(params, "invoice")
        customer = read_str(params, "customer")
        found = [
            cn
            for cn in self.stored("credit_note")
            if (invoice is None or cn["invoice"] == invoice)
            and (customer is None or cn["customer"] == customer)
        ]
        return self._page(found, params, "/v1/credit_notes")

    def void_credit_note(self, params: Obj, note_id: str) -> Obj:
        check_known(params, ())
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
