"""The `tally.v1.Payments` health service: whether this process can collect invoices through Stripe.

It is a service of its own in grpc.health.v1, so a revoked Stripe key shows where an operator looks
(`grpcurl ... grpc.health.v1.Health/Check -d '{"service":"tally.v1.Payments"}'`) without turning the
server's overall status ("") NOT_SERVING: load balancers probe that one, and usage, billing and
every other call still work without Stripe.
"""

from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger(__name__)

PAYMENTS_SERVICE = "tally.v1.Payments"


class PaymentsHealth:
    """Health service `tally.v1.Payments`: NOT_SERVING once Stripe refused the key (never the overall one)."""

    def __init__(self, servicer: health_aio.HealthServicer) -> None:
        self._servicer = servicer
        self.refusal: str | None = None  # why Stripe refused this process's key, once it has

    async def serving(self) -> None:
        """SERVING (at start, with a key Stripe has not refused)."""
        self.refusal = None
        await self._servicer.set(PAYMENTS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def refused(self, reason: str) -> None:
        """Stripe refused the key: NOT_SERVING until a restart with a working key."""
        if self.refusal is None:
            log.error("payments: %s; no more Stripe requests until restarted with a working key", reason)
        self.refusal = reason
        await self._servicer.set(PAYMENTS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stopping(self) -> None:
        """NOT_SERVING while the server stops."""
        await self._servicer.set(PAYMENTS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
