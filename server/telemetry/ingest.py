"""Spans and measurements of ingestion: each batch, and each write-lane commit.

A trace of one StreamUsage call shows, under the call's span, per batch a
`tally.batch.prepare` span (decoding, rate card, validation) and a `tally.batch` span (from
its submission to a write lane until its transaction committed), and under that the lane's
`tally.commit` span (one transaction) with the query spans under it. A lane merges the
batches that wait into one transaction: the commit span is the child of the first batch it
carries and links to the others.

With tracing off (tracer None) none of this runs; the measurements (batch sizes, commit
latency, event outcomes) are taken per batch or per commit, whatever the number of events.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, Status, StatusCode, Tracer

from server.domain.events import EventKey, Rejection
from server.telemetry.metrics import MIXED_TENANTS, Metrics


class IngestTelemetry:
    """What ingestion reports; with neither metrics nor tracer it reports nothing."""

    def __init__(self, metrics: Metrics | None = None, tracer: Tracer | None = None) -> None:
        self.metrics = metrics
        self.tracer = tracer

    def trace_context(self) -> Context | None:
        """The current trace context, to parent a later commit; None when tracing is off."""
        return otel_context.get_current() if self.tracer is not None else None

    @contextmanager
    def preparing(self, events: int) -> Iterator[Span | None]:
        """Around the preparation of one batch of `events` events."""
        if self.metrics is not None:
            self.metrics.batch_events.record(events)
        if self.tracer is None:
            yield None
            return
        with self.tracer.start_as_current_span(
            "tally.batch.prepare", attributes={"tally.batch.events": events}
        ) as span:
            yield span

    def start_batch(self, events: int) -> Span | None:
        """A batch span from submission to commit, or None; end it with `batch_done`."""
        if self.tracer is None:
            return None
        return self.tracer.start_span("tally.batch", attributes={"tally.batch.events": events})

    def batch_done(
        self,
        span: Span | None,
        keys: Collection[EventKey],
        accepted: int,
        duplicates: int,
        rejections: Sequence[Rejection],
        error: BaseException | None = None,
    ) -> None:
        """Count a batch's outcome (and end its span).

        `keys` are its valid events' keys, read only for the tenant label, which is off by default.
        """
        if self.metrics is not None and error is None:
            tenant = ""
            if self.metrics.tenant_labels:
                tenants = {key[0] for key in keys}
                tenant = next(iter(tenants)) if len(tenants) == 1 else MIXED_TENANTS if tenants else ""
            self.metrics.count_events(accepted, duplicates, rejections, tenant)
        if span is not None:
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            else:
                span.set_attributes(
                    {
                        "tally.batch.accepted": accepted,
                        "tally.batch.duplicates": duplicates,
                        "tally.batch.rejected": len(rejections),
                    }
                )
            span.end()

    @contextmanager
    def committing(self, parents: Sequence[Context | None], events: int) -> Iterator[None]:
        """Around one lane transaction writing `events` events of len(parents) submissions."""
        start = time.perf_counter()
        try:
            if self.tracer is None:
                yield
                return
            links = [
                Link(trace.get_current_span(parent).get_span_context())
                for parent in parents[1:]
                if parent is not None
            ]
            with self.tracer.start_as_current_span(
                "tally.commit",
                context=parents[0] if parents else None,
                links=links,
                attributes={"tally.commit.events": events, "tally.commit.batches": len(parents)},
            ):
                yield
        finally:
            if self.metrics is not None:
                self.metrics.commit_duration.record(time.perf_counter() - start)


OFF = IngestTelemetry()
