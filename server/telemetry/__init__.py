"""Telemetry: traces, metrics, structured logs and the HTTP probe listener.

- `tracing`: OpenTelemetry traces, exported over OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT`
  (or the traces-only variable) is set; otherwise nothing is created and no span code runs.
- `metrics`: the OpenTelemetry SDK instruments, read by a Prometheus reader at scrape time.
- `calls`: what every RPC reports (span, access log line, call counts), used by `@rpc`.
- `ingest`: the spans and measurements of batches and their commits.
- `figures`: gauges read from the database at scrape time (cached, bounded).
- `logs`: text or JSON log lines carrying the trace id and the request id.
- `http`: one aiohttp listener for `GET /metrics`, `/healthz` and `/readyz`.
- `multiprocess`, `workers`: with `tally serve --workers N`, each worker writes its metrics
  to files and the parent's listener serves their sum.

Nothing here runs per event: counts are added per batch or per call, and the cheapest
counts (calls, outcomes) are plain integers read by observable instruments at scrape time.
"""
