"""The blocking client: every Tally RPC as a typed method, plus a thread-backed batching ingester.

The same calls as tally_client.aio.AsyncTallyClient, for code without an event loop
(scripts, web handlers, the CLI). Each call carries the bearer token and a fresh
x-request-id, has a deadline, is retried with backoff on passing failures, and fails
with a typed TallyError.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from tally.v1 import (
    billing_service_pb2,
    billing_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from tally_client import convert
from tally_client.auth import TokenSource
from tally_client.connection import DEFAULT_TIMEOUT_SECONDS, Connection, Metadata, new_request_id
from tally_client.errors import UnauthenticatedError, from_rpc_error
from tally_client.ingester import STREAM_RETRY
from tally_client.models import (
    AuditEvent,
    GeneratedInvoice,
    IngestResult,
    Invoice,
    Quantity,
    Rate,
    ReportResult,
    TimeBucket,
    UsageEvent,
    UsageSummary,
)
from tally_client.names import invoice_name, tenant_name
from tally_client.retry import DEFAULT_RETRY, RetryPolicy, is_transient
from tally_client.threaded import Ingester

Response = TypeVar("Response")


class TallyClient:
    """A connection to one Tally server; close it (or use `with`).

    `target` is "host:port" or a Connection; it and `token` default to TALLY_ADDR and
    TALLY_TOKEN (see Connection.create). `timeout` is each unary call's deadline in
    seconds; `retry` how often passing failures are retried.

        with TallyClient("localhost:50051", token=token) as tally:
            tally.report_usage(UsageEvent("acme", "analytics", "query", Decimal("3")))
    """

    def __init__(
        self,
        target: str | Connection | None = None,
        *,
        token: str | TokenSource | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy = DEFAULT_RETRY,
        options: Sequence[tuple[str, Any]] = (),
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.connection = (
            target
            if isinstance(target, Connection)
            else Connection.create(
                target, token=token, credentials=credentials, timeout=timeout, retry=retry, options=options
            )
        )
        self._channel = self.connection.sync_channel()
        self._usage = usage_service_pb2_grpc.UsageServiceStub(self._channel)
        self._billing = billing_service_pb2_grpc.BillingServiceStub(self._channel)
        self._sleep = sleep
        self._random = random

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _metadata(self, request_id: str) -> Metadata:
        source = self.connection.token
        return self.connection.metadata(None if source is None else source.token(), request_id)

    def _call(self, method: Callable[..., Response], request: Any) -> Response:
        policy = self.connection.retry
        attempt = 0
        while True:
            request_id = new_request_id()
            try:
                return method(request, timeout=self.connection.timeout, metadata=self._metadata(request_id))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, request_id=request_id)
                attempt += 1
                if not is_transient(error) or attempt >= policy.max_attempts:
                    raise error from exc
            if isinstance(error, UnauthenticatedError) and self.connection.token is not None:
                self.connection.token.invalidate()
            self._sleep(policy.delay(attempt - 1, error, self._random))

    def _stream(self, call: Any) -> Iterator[Any]:
        """The responses of a server stream, its failure as a TallyError (not retried: output may repeat)."""
        try:
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # -- UsageService -------------------------------------------------------------------

    def report_usage(self, event: UsageEvent) -> ReportResult:
        """Record one event (or learn it was recorded before: outcome DUPLICATE)."""
        request = usage_service_pb2.ReportUsageRequest(event=convert.event_message(event))
        return convert.report_result(self._call(self._usage.ReportUsage, request))

    def ingest_usage(self, batches: Iterable[Sequence[UsageEvent]]) -> IngestResult:
        """Send batches on one IngestUsage stream; counts over the stream. For bulk, prefer `ingester()`."""
        requests = [
            usage_service_pb2.IngestUsageRequest(events=[convert.event_message(e) for e in batch])
            for batch in batches
        ]
        request_id = new_request_id()
        try:
            response = self._usage.IngestUsage(
                iter(requests), timeout=self.connection.timeout, metadata=self._metadata(request_id)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id=request_id) from exc
        return convert.ingest_result(response)

    def get_usage_summary(
        self,
        tenant_id: str,
        start_time: datetime,
        end_time: datetime,
        *,
        bucket: TimeBucket | None = None,
        group_by_dimension: str = "",
        meters: Sequence[str] = (),
    ) -> UsageSummary:
        """A tenant's usage over [start_time, end_time) (whole UTC hours), per usage type, and the
        value of each meter named in `meters` (ids or "meters/{meter}", at most 20)."""
        request = convert.summary_request(tenant_id, start_time, end_time, bucket, group_by_dimension, meters)
        return convert.usage_summary(self._call(self._usage.GetUsageSummary, request).summary)

    def stream_usage_summaries(
        self,
        start_time: datetime,
        end_time: datetime,
        *,
        tenant_ids: Sequence[str] = (),
        bucket: TimeBucket | None = None,
        group_by_dimension: str = "",
    ) -> Iterator[UsageSummary]:
        """One summary per tenant (the listed ones, or every tenant with usage), in tenant_id order."""
        request = convert.summaries_request(tenant_ids, start_time, end_time, bucket, group_by_dimension)
        call = self._usage.StreamUsageSummaries(request, metadata=self._metadata(new_request_id()))
        for response in self._stream(call):
            yield convert.usage_summary(response.summary)

    def ingester(
        self,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_buffered_events: int = 50_000,
        max_batches_in_flight: int = 8,
        retry: RetryPolicy = STREAM_RETRY,
    ) -> Ingester:
        """A batching ingester over StreamUsage, run by a background thread (see tally_client.threaded)."""
        return Ingester(
            self.connection,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_buffered_events=max_buffered_events,
            max_batches_in_flight=max_batches_in_flight,
            retry=retry,
        )

    # -- BillingService -----------------------------------------------------------------

    def list_rates(
        self, *, as_of_time: datetime | None = None, show_history: bool = False, page_size: int = 0
    ) -> Iterator[Rate]:
        """The rate card in effect (now or at as_of_time), or every rate ever set; fetches pages as needed."""
        request = convert.list_rates_request(as_of_time, show_history, page_size)
        while True:
            response = self._call(self._billing.ListRates, request)
            yield from (convert.rate(rate) for rate in response.rates)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def set_rate(
        self,
        service: str,
        usage_type: str,
        unit_price: Quantity,
        *,
        effective_time: datetime | None = None,
        currency_code: str = "",
        request_id: str | None = None,
    ) -> Rate:
        """Set a price from effective_time on (default: the next whole hour). Retries reuse one request_id."""
        request = convert.set_rate_request(
            service,
            usage_type,
            unit_price,
            effective_time=effective_time,
            currency_code=currency_code,
            request_id=request_id or new_request_id(),
        )
        return convert.rate(self._call(self._billing.SetRate, request).rate)

    def generate_invoice(
        self,
        tenant_id: str,
        period_start_time: datetime,
        period_end_time: datetime,
        *,
        request_id: str | None = None,
    ) -> GeneratedInvoice:
        """The tenant's invoice for the period, created or recomputed. Retries reuse one request_id."""
        request = convert.generate_invoice_request(
            tenant_id, period_start_time, period_end_time, request_id or new_request_id()
        )
        response = self._call(self._billing.GenerateInvoice, request)
        return GeneratedInvoice(convert.invoice(response.invoice), response.created)

    def get_invoice(self, tenant_id: str, invoice_id: str) -> Invoice:
        request = billing_service_pb2.GetInvoiceRequest(name=invoice_name(tenant_id, invoice_id))
        return convert.invoice(self._call(self._billing.GetInvoice, request).invoice)

    def list_invoices(self, tenant_id: str, *, page_size: int = 0) -> Iterator[Invoice]:
        """The tenant's invoices, newest period first."""
        request = billing_service_pb2.ListInvoicesRequest(parent=tenant_name(tenant_id), page_size=page_size)
        while True:
            response = self._call(self._billing.ListInvoices, request)
            yield from (convert.invoice(invoice) for invoice in response.invoices)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def list_audit_events(
        self,
        *,
        tenant_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> Iterator[AuditEvent]:
        """The audit trail, oldest first."""
        request = convert.list_audit_events_request(tenant_id, start_time, end_time, page_size)
        while True:
            response = self._call(self._billing.ListAuditEvents, request)
            yield from (convert.audit_event(entry) for entry in response.audit_events)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token
