"""`POST /webhooks/stripe` on Tally's HTTP listener: Stripe's deliveries in, 2xx out fast.

400 for a delivery that is unsigned, badly signed, signed more than 5 minutes ago (by the
injected clock) or not an event: nothing is stored, and Stripe shows the failure on the
endpoint's page. A verified event is stored once and applied in the same short transaction
(a handful of rows), then answered 200 with what it did; a redelivery is answered 200 too.
503 when the database cannot take it in time: nothing was stored, and Stripe delivers it
again later (it retries for up to 3 days), which is what makes "stored once" safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from server.domain.errors import Aborted, InvalidArgument, Unavailable
from server.payments.events import read_event
from server.payments.ledger import PaymentLedger
from server.payments.signature import BadDelivery, verify

log = logging.getLogger(__name__)

PATH = "/webhooks/stripe"
# Stripe gives up on a delivery that is not answered within about 10 s (and retries it).
ANSWER_SECONDS = 8.0
# A Stripe event is a few kB; an invoice with many lines tens of kB.
MAX_BODY_BYTES = 1024 * 1024


class StripeWebhookEndpoint:
    """POST /webhooks/stripe: verify, store once and apply each delivery; answer within a bound."""

    def __init__(
        self,
        secret: str,
        ledger: PaymentLedger,
        now_seconds: Callable[[], float],
        answer_seconds: float = ANSWER_SECONDS,
        count: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._secret = secret
        self._ledger = ledger
        self._now_seconds = now_seconds
        self._answer_seconds = answer_seconds
        self._count = count

    def mount(self, app: web.Application) -> None:
        """Add the route to `app` (before the listener starts)."""
        app.router.add_post(PATH, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one delivery; its outcome (or refused / unavailable) is counted."""
        response, outcome = await self._handle(request)
        self._count(outcome)
        return response

    async def _handle(self, request: web.Request) -> tuple[web.Response, str]:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _answer(413, "the body is larger than a Stripe event"), "refused"
        body = await request.read()
        try:
            values = verify(body, request.headers.get("Stripe-Signature"), self._secret, self._now_seconds)
            event = read_event(values)
        except (BadDelivery, ValueError) as exc:
            log.warning("Stripe webhook refused: %s", exc)
            return _answer(400, str(exc)), "refused"
        try:
            async with asyncio.timeout(self._answer_seconds):
                received = await self._ledger.receive(event, body.decode())
        except InvalidArgument as exc:  # signed, yet a value PostgreSQL refuses (e.g. a NUL character)
            log.warning("Stripe event %s refused: %s", event.id, exc)
            return _answer(400, "the event holds a value that cannot be stored"), "refused"
        except (Unavailable, Aborted, TimeoutError) as exc:
            log.warning("Stripe event %s not stored, Stripe will deliver it again: %s", event.id, exc)
            return _answer(503, "try again later"), "unavailable"
        log.info("Stripe event %s (%s): %s", event.id, event.type, received.outcome)
        return web.json_response({"received": True, "outcome": received.outcome}), received.outcome


def _answer(status: int, error: str) -> web.Response:
    return web.json_response({"received": False, "error": error}, status=status)
