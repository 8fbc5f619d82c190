"""Tally's Python client: typed calls (sync and async), typed errors, tokens and a batching ingester.

    from decimal import Decimal
    from tally_client import TallyClient, UsageEvent

    with TallyClient("localhost:50051", token=token) as tally:
        tally.report_usage(UsageEvent("acme", "analytics", "query", Decimal("3")))

Quantities and money are Decimal, times timezone-aware datetimes, tenants their
tenant ids. The generated stubs are the `tally.v1` package of this distribution.

The names are imported on first use (PEP 562), so that `tally --help` (tally_client.cli)
starts without loading gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tally_client.aio import AsyncTallyClient
    from tally_client.auth import RefreshingToken, SecretFileTokens, StaticToken, TokenSource, mint_token
    from tally_client.client import TallyClient
    from tally_client.connection import Connection
    from tally_client.errors import (
        AbortedError,
        AlreadyExistsError,
        CallCancelledError,
        DataLossError,
        DeadlineExceededError,
        FailedPreconditionError,
        FieldViolation,
        IngesterClosedError,
        IngesterFullError,
        InternalError,
        InvalidArgumentError,
        NotFoundError,
        OutOfRangeError,
        PermissionDeniedError,
        QuotaViolation,
        RateLimitedError,
        ResourceExhaustedError,
        TallyError,
        UnauthenticatedError,
        UnavailableError,
        UnimplementedError,
        UnknownError,
    )
    from tally_client.ingester import AsyncIngester, IngestCounts
    from tally_client.models import (
        AuditEvent,
        CancelledEvent,
        CollectionStatus,
        CreditNote,
        EventRejection,
        GeneratedInvoice,
        IngestResult,
        Invoice,
        InvoiceLineItem,
        InvoiceParty,
        InvoicePayment,
        Meter,
        MeterAggregate,
        MeterBackfill,
        Rate,
        RejectionCause,
        ReportOutcome,
        ReportResult,
        TimeBucket,
        UsageAggregate,
        UsageEvent,
        UsageSummary,
        WebhookDelivery,
        WebhookDeliveryAttempt,
        WebhookSubscription,
    )
    from tally_client.pricing import (
        BillingProfile,
        Charge,
        FeeTiming,
        FlatFee,
        Graduated,
        Package,
        PerUnit,
        Plan,
        PlanVersion,
        PriceOverride,
        PriceTier,
        Volume,
    )
    from tally_client.retry import RetryPolicy
    from tally_client.threaded import Ingester

# Each public name and the module that defines it.
_EXPORTS = {
    "AbortedError": "tally_client.errors",
    "AlreadyExistsError": "tally_client.errors",
    "AsyncIngester": "tally_client.ingester",
    "AsyncTallyClient": "tally_client.aio",
    "AuditEvent": "tally_client.models",
    "BillingProfile": "tally_client.pricing",
    "CallCancelledError": "tally_client.errors",
    "CancelledEvent": "tally_client.models",
    "Charge": "tally_client.pricing",
    "Connection": "tally_client.connection",
    "CreditNote": "tally_client.models",
    "DataLossError": "tally_client.errors",
    "DeadlineExceededError": "tally_client.errors",
    "EventRejection": "tally_client.models",
    "FailedPreconditionError": "tally_client.errors",
    "FeeTiming": "tally_client.pricing",
    "FieldViolation": "tally_client.errors",
    "FlatFee": "tally_client.pricing",
    "GeneratedInvoice": "tally_client.models",
    "Graduated": "tally_client.pricing",
    "IngestCounts": "tally_client.ingester",
    "IngestResult": "tally_client.models",
    "Ingester": "tally_client.threaded",
    "IngesterClosedError": "tally_client.errors",
    "IngesterFullError": "tally_client.errors",
    "InternalError": "tally_client.errors",
    "InvalidArgumentError": "tally_client.errors",
    "Invoice": "tally_client.models",
    "InvoiceLineItem": "tally_client.models",
    "CollectionStatus": "tally_client.models",
    "InvoiceParty": "tally_client.models",
    "InvoicePayment": "tally_client.models",
    "WebhookDelivery": "tally_client.models",
    "WebhookDeliveryAttempt": "tally_client.models",
    "WebhookSubscription": "tally_client.models",
    "Meter": "tally_client.models",
    "MeterAggregate": "tally_client.models",
    "MeterBackfill": "tally_client.models",
    "NotFoundError": "tally_client.errors",
    "OutOfRangeError": "tally_client.errors",
    "Package": "tally_client.pricing",
    "PerUnit": "tally_client.pricing",
    "PermissionDeniedError": "tally_client.errors",
    "Plan": "tally_client.pricing",
    "PlanVersion": "tally_client.pricing",
    "PriceOverride": "tally_client.pricing",
    "PriceTier": "tally_client.pricing",
    "QuotaViolation": "tally_client.errors",
    "Rate": "tally_client.models",
    "RateLimitedError": "tally_client.errors",
    "RefreshingToken": "tally_client.auth",
    "RejectionCause": "tally_client.models",
    "ReportOutcome": "tally_client.models",
    "ReportResult": "tally_client.models",
    "ResourceExhaustedError": "tally_client.errors",
    "RetryPolicy": "tally_client.retry",
    "SecretFileTokens": "tally_client.auth",
    "StaticToken": "tally_client.auth",
    "TallyClient": "tally_client.client",
    "TallyError": "tally_client.errors",
    "TimeBucket": "tally_client.models",
    "TokenSource": "tally_client.auth",
    "UnauthenticatedError": "tally_client.errors",
    "UnavailableError": "tally_client.errors",
    "UnimplementedError": "tally_client.errors",
    "UnknownError": "tally_client.errors",
    "UsageAggregate": "tally_client.models",
    "UsageEvent": "tally_client.models",
    "UsageSummary": "tally_client.models",
    "Volume": "tally_client.pricing",
    "mint_token": "tally_client.auth",
}

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncIngester",
    "AsyncTallyClient",
    "AuditEvent",
    "BillingProfile",
    "CallCancelledError",
    "CancelledEvent",
    "Charge",
    "CollectionStatus",
    "Connection",
    "CreditNote",
    "DataLossError",
    "DeadlineExceededError",
    "EventRejection",
    "FailedPreconditionError",
    "FeeTiming",
    "FieldViolation",
    "FlatFee",
    "GeneratedInvoice",
    "Graduated",
    "IngestCounts",
    "IngestResult",
    "Ingester",
    "IngesterClosedError",
    "IngesterFullError",
    "InternalError",
    "InvalidArgumentError",
    "Invoice",
    "InvoiceLineItem",
    "InvoiceParty",
    "InvoicePayment",
    "Meter",
    "MeterAggregate",
    "MeterBackfill",
    "NotFoundError",
    "OutOfRangeError",
    "Package",
    "PerUnit",
    "PermissionDeniedError",
    "Plan",
    "PlanVersion",
    "PriceOverride",
    "PriceTier",
    "QuotaViolation",
    "Rate",
    "RateLimitedError",
    "RefreshingToken",
    "RejectionCause",
    "ReportOutcome",
    "ReportResult",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SecretFileTokens",
    "StaticToken",
    "TallyClient",
    "TallyError",
    "TimeBucket",
    "TokenSource",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UsageAggregate",
    "UsageEvent",
    "UsageSummary",
    "Volume",
    "WebhookDelivery",
    "WebhookDeliveryAttempt",
    "WebhookSubscription",
    "mint_token",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tally_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
