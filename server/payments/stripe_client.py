"""The Stripe API key (from a file or the environment, never a flag) and the SDK client built from it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import stripe

API_KEY_VARIABLE = "TALLY_STRIPE_API_KEY"
# The SDK retries connection errors, 409 and 5xx this many times (0.5 s doubling, at most 5 s apart),
# with the same idempotency key; what still fails is retried by the outbox with its own backoff.
MAX_NETWORK_RETRIES = 2
# One request, connecting included; far above Stripe's usual answer (well under a second).
REQUEST_TIMEOUT_SECONDS = 30.0


def stripe_api_key(key_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The configured secret key: the file's content, else TALLY_STRIPE_API_KEY; None: simulation mode.

    ValueError for a file that cannot be read or is empty (a typo must not silently mean "simulate").
    """
    if key_file is not None:
        try:
            key = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the Stripe API key file {key_file}: {exc.strerror}") from None
        if not key:
            raise ValueError(f"the Stripe API key file {key_file} is empty")
        return key
    return environ.get(API_KEY_VARIABLE, "").strip() or None


def stripe_client(
    api_key: str, api_base: str | None = None
) -> tuple[stripe.StripeClient, stripe.HTTPXClient]:
    """A client for the `_async` calls, and its HTTP client (to close at shutdown)."""
    http_client = stripe.HTTPXClient(timeout=REQUEST_TIMEOUT_SECONDS)
    client = stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base} if api_base else None,
        max_network_retries=MAX_NETWORK_RETRIES,
        http_client=http_client,
    )
    return client, http_client
