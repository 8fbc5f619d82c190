"""The fake Stripe API's HTTP side: a threaded stdlib server, injected faults and the request log.

The server runs on threads of its own, not on the event loop: a synchronous SDK call made from an async test
blocks the loop, and an in-loop server could then never answer it.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import stripe

from tests.fake_stripe.api import TEST_PAYMENT_METHODS, Response, StripeState
from tests.fake_stripe.forms import Obj, StripeApiError, parse_form

DEFAULT_API_KEY = "sk_test_tally_fake_stripe_key"
DEFAULT_WEBHOOK_SECRET = "whsec_tally_fake_stripe_secret"


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
class _Fault:
    kind: str  # "status", "delay" or "disconnect"
    pattern: str
    method: str | None
    remaining: int
    after: bool = False  # delay/disconnect after the request ran (its result stored) instead of before
    error: StripeApiError | None = None
    hold_seconds: float = 0.0
    released: threading.Event = field(default_factory=threading.Event)
    skip: int = 0  # matching requests let through untouched before the fault applies

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
        self.internal_errors: list[Exception] = []  # bugs of the fake itself; the fixture fails on any
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
        if self._thread.is_alive():  # shutdown() would wait forever for a server that never served
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

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
        skip: int = 0,
    ) -> None:
        """Hold the next `times` matching requests until `release()` (or `seconds`, a backstop), before
        they run or, with `after=True`, after they ran and were stored. Give the client a short timeout:
        it times out because the hold outlasts it, never because of how fast the machine is. `skip`: let
        that many matching requests through first (e.g. hold the third invoice item)."""
        self._add_fault(_Fault("delay", pattern, method, times, after=after, hold_seconds=seconds, skip=skip))

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
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
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
        """One stored object by id, as the API would show it."""
        with self.state.lock:
            obj = self.state.stored_object(object_id)
            if obj is None:
                raise KeyError(object_id)
            return self.state.render(obj)

    def set_default_payment_method(self, customer_id: str, payment_method: str) -> None:
        """Give a customer a test payment method (`TEST_PAYMENT_METHODS`), as Stripe's hosted pages would."""
        if payment_method not in TEST_PAYMENT_METHODS:
            raise ValueError(f"unknown test payment method {payment_method!r}")
        with self.state.lock:
            self.state.set_default_payment_method(customer_id, payment_method)

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

    def _serve(self, method: str, target: str, body: str, headers: dict[str, str]) -> Response | None:
        """Answer one request, faults included; None means close the connection without an answer."""
        url = urlsplit(target)
        try:
            params = parse_form(body if method == "POST" else url.query)
            response = self._serve_faulty(method, url.path, params, headers)
        except StripeApiError as error:  # a body Stripe could not parse
            self._record(RecordedRequest(method, url.path, {}, headers.get("idempotency-key"), error.status))
            response = Response(error.status, {"error": error.error})
        except Exception as error:
            # A bug in the fake, not Stripe behaviour: answer 500, kept for the fixture to fail the test.
            with self.state.lock:
                self.internal_errors.append(error)
            response = Response(
                500, {"error": {"type": "api_error", "message": f"fake Stripe bug: {error!r}"}}
            )
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
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self.server.fake._serve(method, self.path, body, headers)
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
