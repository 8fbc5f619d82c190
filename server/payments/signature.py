"""Checking a Stripe webhook delivery: its `Stripe-Signature` and the age of its timestamp.

The signature is checked by the SDK (`stripe.Webhook.construct_event`, HMAC-SHA256 of
"{t}.{body}" with the endpoint's secret). The SDK compares the timestamp with `time.time()`
itself, so the age is checked here, by the SDK's rule (a timestamp older than the tolerance
is refused) but against an injected clock: tests step a fake one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import stripe

# Stripe's own default: a delivery signed more than 5 minutes ago is a replay.
TOLERANCE_SECONDS = 300


class BadDelivery(Exception):
    """A delivery to refuse with 400: unsigned, badly signed, too old, or not an event."""


def _timestamp(header: str) -> int:
    for item in header.split(","):
        key, _, value = item.partition("=")
        if key.strip() == "t":
            return int(value)
    raise ValueError("no t= in the header")


def verify(
    payload: bytes,
    header: str | None,
    secret: str,
    now_seconds: Callable[[], float],
    tolerance_seconds: int = TOLERANCE_SECONDS,
) -> Mapping[str, Any]:
    """The event delivered, as plain JSON values; BadDelivery if it must be refused."""
    try:
        # tolerance=0: the SDK's own age check (on time.time()) is off; the one below replaces it.
        stripe.Webhook.construct_event(payload, header, secret, tolerance=0)
    except stripe.SignatureVerificationError as exc:
        raise BadDelivery(f"signature refused: {exc}") from None
    except (ValueError, AttributeError):
        # Signed, but not a JSON object: the SDK parses the body only after checking the
        # signature, and fails with a JSONDecodeError (a ValueError) or on `.get` of a list.
        raise BadDelivery("the body is not a JSON event") from None
    assert header is not None  # construct_event refuses a missing header
    if _timestamp(header) < now_seconds() - tolerance_seconds:
        raise BadDelivery(f"the signature's timestamp is more than {tolerance_seconds} s old")
    values: Any = json.loads(payload)  # plain dicts: the SDK's objects are not (v15 and later)
    if (
        not isinstance(values, dict)
        or not isinstance(values.get("id"), str)
        or values.get("object") != "event"
    ):
        raise BadDelivery("the body is not a Stripe event")
    return values


SECRET_VARIABLE = "TALLY_STRIPE_WEBHOOK_SECRET"


def load_webhook_secret(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """The endpoint's signing secret: from the file if one is given, else the variable; None: neither.

    ValueError for a file that cannot be read or holds no secret, so that `tally serve` stops
    with a message instead of refusing every delivery.
    """
    if path is not None:
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the Stripe webhook secret file {path}: {exc}") from None
        if not secret:
            raise ValueError(f"the Stripe webhook secret file {path} is empty")
        return secret
    return environ.get(SECRET_VARIABLE, "").strip() or None
