"""What every RPC reports: a span, an access log line and its count, from the `@rpc` guard.

The maintained `opentelemetry-instrumentation-grpc` server interceptor would do the span
part, but an interceptor costs every call an extra coroutine and a proxy around its
context (the project measured several percent of a unary call for a bare interceptor,
see server.api.decoding), and it runs even when nothing is exported. The guard already
wraps every Tally method, so one span per call is started there, and only when tracing
is on: method, status code, request id and principal, as a SERVER span that continues
the caller's trace (W3C `traceparent` metadata).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import Token

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from server.domain.errors import ResourceExhausted
from server.telemetry.logs import AccessLog, current_request_id
from server.telemetry.metrics import TIMED_METHODS, Metrics

_OK = grpc.StatusCode.OK


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions keep the number
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if error is None:
        return _OK
    # Not aborted, yet failed: the call was cancelled (client gone, server stopping).
    return grpc.StatusCode.CANCELLED


class Call:
    """One call being served; `finish` it exactly once."""

    __slots__ = (
        "_admitted",
        "_error",
        "_id_token",
        "_otel_token",
        "_request_id",
        "_start",
        "_streaming",
        "method",
        "principal",
        "span",
        "telemetry",
    )

    def __init__(self, telemetry: CallTelemetry, method: str, request_id: str, streaming: bool) -> None:
        self.telemetry = telemetry
        self.method = method
        self.principal = "-"
        self._admitted = False
        self._error: BaseException | None = None
        self._streaming = streaming
        self._start = time.perf_counter()
        self._request_id = request_id
        self._id_token: Token[str | None] = current_request_id.set(request_id)
        self.span: trace.Span | None = None
        self._otel_token: Token[Context] | None = None

    def trace(
        self, tracer: Tracer, service: str, request_id: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> None:
        """Start the call's span, as the current span, continuing the caller's trace if it sent one."""
        parent = extract({key: value for key, value in metadata if isinstance(value, str)})
        self.span = tracer.start_span(
            f"{service}/{self.method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": self.method,
                "tally.request_id": request_id,
            },
        )
        self._otel_token = otel_context.attach(trace.set_span_in_context(self.span, parent))

    def admitted(self, principal: str) -> None:
        """The caller passed the guard: `principal` is who it is."""
        self.principal = principal
        self._admitted = True
        if self._streaming:
            self.telemetry.metrics.streams_open[(self.method,)] += 1
        if self.span is not None:
            self.span.set_attribute("enduser.id", principal)

    def failed(self, error: BaseException) -> None:
        """The call is ending with `error` (before it is answered with a status)."""
        self._error = error

    def finish(self, context: grpc.aio.ServicerContext) -> None:
        """Count the call by method and status code (timing the timed methods), end its span, log its line."""
        telemetry = self.telemetry
        seconds = time.perf_counter() - self._start
        error = self._error
        code = _code(context, error)
        metrics = telemetry.metrics
        metrics.calls[(self.method, code.name)] += 1
        if self._streaming and self._admitted:
            metrics.streams_open[(self.method,)] -= 1
        if isinstance(error, ResourceExhausted):
            metrics.refusals[(error.limit,)] += 1
        if self.method in TIMED_METHODS:
            metrics.rpc_duration.record(seconds, {"method": self.method, "code": code.name})
        span = self.span
        if telemetry.access_log is not None:
            ids = None
            if span is not None:
                span_context = span.get_span_context()
                ids = (format(span_context.trace_id, "032x"), format(span_context.span_id, "016x"))
            telemetry.access_log.write(
                self.method, code.name, seconds * 1000, self.principal, self._request_id, ids
            )
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not _OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()
            if self._otel_token is not None:
                otel_context.detach(self._otel_token)
        try:
            current_request_id.reset(self._id_token)
        except ValueError:
            pass


class CallTelemetry:
    """Starts a `Call` per RPC.

    `tracer` None: tracing is off and no span code runs; `access_log` None: no access lines.
    """

    def __init__(
        self, metrics: Metrics, *, tracer: Tracer | None = None, access_log: AccessLog | None = None
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.access_log = access_log

    def start(
        self, service: str, method: str, request_id: str, streaming: bool, context: grpc.aio.ServicerContext
    ) -> Call:
        """The telemetry of a call starting now; its span is a child of the client's trace, if sent."""
        call = Call(self, method, request_id, streaming)
        if self.tracer is not None:
            call.trace(self.tracer, service, request_id, context.invocation_metadata() or ())
        return call
