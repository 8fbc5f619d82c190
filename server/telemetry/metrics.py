"""Tally's metrics: OpenTelemetry SDK instruments, read by a Prometheus reader at scrape time.

Each server owns its MeterProvider and its Prometheus registry (no global state), so that
several servers in one process (the tests) never mix their series.

Cost: a synchronous OpenTelemetry counter add takes microseconds (attribute hashing and a
lock), a visible share of a 300 µs unary call. The counts added on every call or batch
(calls by method and status, events by outcome, rejections, refusals, open streams) are
therefore plain integers in dictionaries, which observable instruments read when
Prometheus scrapes. Histograms (batch sizes, commit latency, summary and invoice latency)
are recorded per batch, per commit or per summary/invoice call, never per event nor per
unary ingestion call.

With `tally serve --workers N` each worker passes `files` (server.telemetry.multiprocess):
the same counts and histograms are then written through to files that the parent sums
on a scrape; the worker serves no /metrics of its own.

Labels are bounded: methods, status codes, outcomes, the field a rejected event broke
(`dimensions[key]` counts as `dimensions`), the rejection cause, the limit. The tenant id
is a label only when `tenant_labels` is set (one series per tenant: mind the cardinality).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from server.domain.events import Rejection
from server.telemetry.multiprocess import MetricFiles

# Seconds: a commit of one event takes about a millisecond, one of 5,000 events tens of ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Floats, so that `le` reads the same (`50.0`) in one process and summed over workers.
BATCH_BUCKETS = (1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0)
# Calls whose latency is a histogram: the reads users wait for. Ingestion calls are
# measured by their commits instead, and every call's duration is on its access line.
TIMED_METHODS = frozenset(
    {
        "GetUsageSummary",
        "StreamUsageSummaries",
        "GenerateInvoice",
        "GetInvoice",
        "ListInvoices",
    }
)
MIXED_TENANTS = "(several)"  # the tenant label of a batch carrying several tenants' events

Key = tuple[str, ...]

# What each instrument means, once for both ways of exporting it (its OpenTelemetry
# description, and its HELP line when the workers' files are summed).
EVENTS = "Usage events received, by outcome: accepted (new), duplicate or rejected"
REJECTIONS = (
    "Rejected usage events, by the field that broke a rule (reason) and the cause "
    "(invalid or permission_denied)"
)
CALLS = "Finished calls, by method and gRPC status code"
REFUSALS = "Calls refused with RESOURCE_EXHAUSTED, by the limit reached"
STREAMS_OPEN = "Streaming calls being served, by method"
EVENTS_IN_FLIGHT = "Streamed events read and not yet committed (bounded by --max-events-in-flight)"
BATCH_EVENTS = "Events per ingested batch (one IngestUsage/StreamUsage message)"
COMMIT_DURATION = "Duration of one write-lane transaction (one or more batches)"
RPC_DURATION = "Duration of summary and invoice calls, by method and status code"
OUTBOX_STEPS = (
    "Steps of outbox jobs run (Stripe pushes and retries, webhook deliveries), by job kind and "
    "outcome: done, advanced, retried, stopped or halted"
)
STRIPE_WEBHOOKS = (
    "Stripe webhook deliveries answered, by outcome: applied, unchanged, duplicate, unmatched, "
    "ignored, refused (400/413) or unavailable (503)"
)


def _observe(
    counts: dict[Key, int], names: Sequence[str]
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_: CallbackOptions) -> Iterable[Observation]:
        # A copy: a scrape runs on the event loop, but the copy keeps it safe from any thread.
        return [Observation(value, dict(zip(names, key, strict=True))) for key, value in list(counts.items())]

    return callback


class Recorder(Protocol):
    """A histogram: OpenTelemetry's, or a worker's written to its file."""

    def record(self, amount: float, attributes: Mapping[str, str] | None = None, /) -> None:
        """Add `amount` to the histogram, under the label values in `attributes`."""
        ...


def _counts(
    files: MetricFiles | None, metric: str, help: str, labels: Key, *, gauge: bool = False
) -> dict[Key, int]:
    """Plain counts in one process; with a worker's files, counts written through to them."""
    if files is None:
        return defaultdict(int)
    return files.gauge(metric, help, labels) if gauge else files.counter(metric, help, labels)


def _reason(rejection: Rejection) -> str:
    return rejection.field.partition("[")[0]  # bounded: no dimension keys


class Metrics:
    """The instruments of one server; see the module docstring."""

    def __init__(
        self,
        registry: CollectorRegistry,
        resource: Resource,
        *,
        tenant_labels: bool = False,
        files: MetricFiles | None = None,
    ) -> None:
        self.registry = registry
        self.tenant_labels = tenant_labels
        self.provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)],
            resource=resource,
        )
        self.meter = meter = self.provider.get_meter("tally")
        tenant = ("tenant",) if tenant_labels else ()

        self.events = _counts(files, "tally_events", EVENTS, ("outcome", *tenant))
        self.rejections = _counts(files, "tally_event_rejections", REJECTIONS, ("reason", "cause", *tenant))
        self.calls = _counts(files, "tally_rpc_calls", CALLS, ("method", "code"))
        self.refusals = _counts(files, "tally_rate_limit_refusals", REFUSALS, ("limit",))
        self.streams_open = _counts(files, "tally_streams_open", STREAMS_OPEN, ("method",), gauge=True)
        self.outbox_steps = _counts(files, "tally_outbox_steps", OUTBOX_STEPS, ("kind", "outcome"))
        self.stripe_webhooks = _counts(files, "tally_stripe_webhooks", STRIPE_WEBHOOKS, ("outcome",))
        # Read when scraped in one process; a worker writes it to its file now and then.
        self._in_flight_file = (
            None if files is None else files.gauge("tally_events_in_flight", EVENTS_IN_FLIGHT, ())
        )
        self._events_in_flight: Callable[[], int] = lambda: 0

        meter.create_observable_counter(
            "tally.events", [_observe(self.events, ("outcome", *tenant))], unit="{event}", description=EVENTS
        )
        meter.create_observable_counter(
            "tally.event.rejections",
            [_observe(self.rejections, ("reason", "cause", *tenant))],
            unit="{event}",
            description=REJECTIONS,
        )
        meter.create_observable_counter(
            "tally.rpc.calls", [_observe(self.calls, ("method", "code"))], unit="{call}", description=CALLS
        )
        meter.create_observable_counter(
            "tally.rate_limit.refusals",
            [_observe(self.refusals, ("limit",))],
            unit="{call}",
            description=REFUSALS,
        )
        meter.create_observable_counter(
            "tally.outbox.steps",
            [_observe(self.outbox_steps, ("kind", "outcome"))],
            unit="{step}",
            description=OUTBOX_STEPS,
        )
        meter.create_observable_counter(
            "tally.stripe.webhooks",
            [_observe(self.stripe_webhooks, ("outcome",))],
            unit="{delivery}",
            description=STRIPE_WEBHOOKS,
        )
        meter.create_observable_up_down_counter(
            "tally.streams.open",
            [_observe(self.streams_open, ("method",))],
            unit="{stream}",
            description=STREAMS_OPEN,
        )
        meter.create_observable_up_down_counter(
            "tally.events.in_flight",
            [lambda _: [Observation(self._events_in_flight())]],
            unit="{event}",
            description=EVENTS_IN_FLIGHT,
        )
        self.batch_events: Recorder
        self.commit_duration: Recorder
        self.rpc_duration: Recorder
        if files is None:
            self.batch_events = meter.create_histogram(
                "tally.batch.events",
                unit="{event}",
                description=BATCH_EVENTS,
                explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
            )
            self.commit_duration = meter.create_histogram(
                "tally.commit.duration",
                unit="s",
                description=COMMIT_DURATION,
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            )
            self.rpc_duration = meter.create_histogram(
                "tally.rpc.duration",
                unit="s",
                description=RPC_DURATION,
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            )
        else:  # the names the Prometheus exporter gives the ones above
            self.batch_events = files.histogram("tally_batch_events", BATCH_EVENTS, (), BATCH_BUCKETS)
            self.commit_duration = files.histogram(
                "tally_commit_duration_seconds", COMMIT_DURATION, (), LATENCY_BUCKETS
            )
            self.rpc_duration = files.histogram(
                "tally_rpc_duration_seconds", RPC_DURATION, ("method", "code"), LATENCY_BUCKETS
            )

    def publish_events_in_flight(self) -> None:
        """Write the events-in-flight gauge to the worker's file.

        It is read, not counted: a worker calls this periodically (see TallyServer).
        """
        if self._in_flight_file is not None:
            self._in_flight_file[()] = self._events_in_flight()

    def watch_events_in_flight(self, read: Callable[[], int]) -> None:
        """Read the events-in-flight gauge from `read` (the shared EventBudget's use)."""
        self._events_in_flight = read

    def count_events(
        self, accepted: int, duplicates: int, rejections: Sequence[Rejection], tenant: str = ""
    ) -> None:
        """Count one batch's (or one report's) outcome: a few additions, whatever its size."""
        suffix: Key = (tenant,) if self.tenant_labels else ()
        events = self.events
        if accepted:
            events[("accepted", *suffix)] += accepted
        if duplicates:
            events[("duplicate", *suffix)] += duplicates
        if rejections:
            events[("rejected", *suffix)] += len(rejections)
            for rejection in rejections:
                self.rejections[(_reason(rejection), rejection.cause.value, *suffix)] += 1

    def count_outbox_step(self, kind: str, outcome: str) -> None:
        """Count one committed outbox step (server.payments.outbox's `observe`)."""
        self.outbox_steps[(kind, outcome)] += 1

    def count_stripe_webhook(self, outcome: str) -> None:
        """Count one answered Stripe delivery (server.payments.endpoint's `count`)."""
        self.stripe_webhooks[(outcome,)] += 1

    def shutdown(self) -> None:
        """Stop the provider and take its collector off the registry."""
        self.provider.shutdown()
