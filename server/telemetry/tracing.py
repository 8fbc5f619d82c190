"""Traces: a tracer provider from the standard `OTEL_*` variables, or none at all.

With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans go to
an OTLP collector over gRPC through a batching processor; the SDK itself reads the other
variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and its
argument, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`, `..._CERTIFICATE`, `..._INSECURE`,
`..._TIMEOUT`, `..._COMPRESSION`). Unset, or with `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none`, there is no provider: callers get None and skip span code
altogether, which is cheaper than a non-recording tracer.

Queries are traced by `opentelemetry-instrumentation-asyncpg`, which patches asyncpg's
classes for the whole process; `instrument_queries` does it once and returns how to undo it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

INSTRUMENTATION_NAME = "tally"
DEFAULT_SERVICE_NAME = "tally"


def resource() -> Resource:
    """The process's resource: the `OTEL_*` variables, with service.name `tally` unless they name one."""
    detected = Resource.create()
    name = detected.attributes.get(SERVICE_NAME)
    if not isinstance(name, str) or name.startswith("unknown_service"):
        detected = detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def tracer_provider_from_env(environ: Mapping[str, str]) -> TracerProvider | None:
    """A provider exporting over OTLP/gRPC if the environment asks for traces, else None.

    Raises ValueError for settings Tally cannot honour (another exporter or protocol), so
    that a misconfiguration is refused at start rather than silently dropping traces.
    """
    if not tracing_requested(environ):
        return None
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: only otlp (or none) is supported")
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol.strip().lower() != "grpc":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: Tally exports OTLP over grpc only")
    # Imported here: the exporter loads its generated protos, which an untraced server never needs.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=resource())  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def instrument_queries(provider: TracerProvider) -> Callable[[], None]:
    """Trace every asyncpg query with `provider`; returns the undo.

    The undo is a no-op if another owner instrumented asyncpg first: the instrumentation is
    process-wide.
    """
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]  # a singleton
    if instrumentor.is_instrumented_by_opentelemetry:
        return lambda: None
    # capture_parameters stays off: parameters are event payloads and tenant data.
    instrumentor.instrument(tracer_provider=provider)

    def undo() -> None:
        instrumentor.uninstrument()

    return undo
