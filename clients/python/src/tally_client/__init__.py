"""Tally's Python client: typed calls (sync and async), typed errors, tokens and a batching ingester.

    from decimal import Decimal
    from tally_client import TallyClient, UsageEvent

    with TallyClient("localhost:50051", token=token) as tally:
        tally.report_usage(UsageEvent("acme", "analytics", "query", Decimal("3")))

Quantities and money are Decimal, times timezone-aware datetimes, tenants their
tenant ids. The generated stubs are the `tally.v1` package of this distribution.
"""

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
    EventRejection,
    GeneratedInvoice,
    IngestResult,
    Invoice,
    InvoiceLineItem,
    Rate,
    RejectionCause,
    ReportOutcome,
    ReportResult,
    TimeBucket,
    UsageAggregate,
    UsageEvent,
    UsageSummary,
)
from tally_client.retry import RetryPolicy
from tally_client.threaded import Ingester

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncIngester",
    "AsyncTallyClient",
    "AuditEvent",
    "CallCancelledError",
    "Connection",
    "DataLossError",
    "DeadlineExceededError",
    "EventRejection",
    "FailedPreconditionError",
    "FieldViolation",
    "GeneratedInvoice",
    "IngestCounts",
    "IngestResult",
    "Ingester",
    "IngesterClosedError",
    "IngesterFullError",
    "InternalError",
    "InvalidArgumentError",
    "Invoice",
    "InvoiceLineItem",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
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
    "mint_token",
]
