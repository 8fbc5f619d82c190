"""Telemetry: /metrics counts what happened, probes follow the database, traces show a stream's
batches and commits, and log lines carry ids but never tokens or payloads."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from server.app import TallyServer
from server.config import Config
from server.domain.events import EventColumns, EventKey, EventRow
from server.lanes import Lane
from server.storage.embedded import EmbeddedPostgres
from server.telemetry.ingest import IngestTelemetry
from server.telemetry.logs import ACCESS_LOGGER, JsonFormatter
from server.telemetry.tracing import resource, tracer_provider_from_env
from tally.v1 import usage_service_pb2, usage_service_pb2_grpc
from tests.conftest import make_token
from tests.helpers import channel_with_token, event

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """GET /metrics, as {(sample name, labels): value}."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def status_of(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as answer:
        return answer.status


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest_asyncio.fixture(loop_scope="session")
async def labelled(server_config: Config) -> AsyncIterator[TallyServer]:
    """A server of its own, with the HTTP listener, tenant labels and one stream per principal."""
    config = replace(
        server_config,
        http_port=0,
        metrics_tenant_labels=True,
        limits=replace(server_config.limits, max_streams_per_principal=1),
    )
    server = TallyServer(config)
    await server.start()
    yield server
    await server.stop()


async def test_metrics_count_a_tenants_accepted_duplicate_and_rejected_events(
    labelled: TallyServer, tenant: str
) -> None:
    other = f"{tenant}-other"
    token = make_token([tenant], subject="ingester")
    async with channel_with_token(f"127.0.0.1:{labelled.port}", token) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        first = [event(tenant, f"e{i}") for i in range(5)]
        call = usage.StreamUsage()
        # 5 new, 2 repeated within the batch, 1 invalid, 1 for a tenant the token may not act for.
        await call.write(
            usage_service_pb2.StreamUsageRequest(
                sequence=1,
                events=[*first, first[0], first[1], event(tenant, "bad", quantity="lots"), event(other, "x")],
            )
        )
        ack = await call.read()
        assert (ack.accepted_count, ack.duplicate_count, ack.rejected_count) == (5, 2, 2)
        await call.write(usage_service_pb2.StreamUsageRequest(sequence=2, events=first[:3]))  # resent
        assert (await call.read()).duplicate_count == 3
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        reported = await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant, "r1")))
        assert reported.outcome == usage_service_pb2.REPORT_OUTCOME_RECORDED

    samples = await scrape(labelled.http_port)
    assert value(samples, "tally_events_total", outcome="accepted", tenant=tenant) == 6
    assert value(samples, "tally_events_total", outcome="duplicate", tenant=tenant) == 5
    assert value(samples, "tally_events_total", outcome="rejected", tenant=tenant) == 2
    rejections = "tally_event_rejections_total"
    assert value(samples, rejections, reason="quantity", cause="invalid", tenant=tenant) == 1
    assert value(samples, rejections, reason="tenant_id", cause="permission_denied", tenant=tenant) == 1
    assert value(samples, "tally_rpc_calls_total", method="StreamUsage", code="OK") >= 1
    assert value(samples, "tally_batch_events_count") >= 2
    assert value(samples, "tally_commit_duration_seconds_count") >= 2


async def test_streams_open_and_rate_limit_refusals_are_counted(labelled: TallyServer, tenant: str) -> None:
    async with channel_with_token(f"127.0.0.1:{labelled.port}", make_token([tenant])) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        before = value(await scrape(labelled.http_port), "tally_rate_limit_refusals_total", limit="streams")
        held = usage.StreamUsage()
        await held.write(usage_service_pb2.StreamUsageRequest(sequence=1, events=[event(tenant)]))
        await held.read()  # admitted: it holds the principal's only stream slot
        assert value(await scrape(labelled.http_port), "tally_streams_open", method="StreamUsage") == 1

        refused = usage.StreamUsage()
        await refused.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await refused.read()
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await held.done_writing()
        assert await held.read() == grpc.aio.EOF

    samples = await scrape(labelled.http_port)
    assert value(samples, "tally_rate_limit_refusals_total", limit="streams") == before + 1
    assert value(samples, "tally_streams_open", method="StreamUsage") == 0


async def test_metrics_carry_no_tenant_label_by_default_and_read_figures_from_the_database(
    server_config: Config, db: asyncpg.Pool, tenant: str
) -> None:
    server = TallyServer(replace(server_config, http_port=0))
    await server.start()
    try:
        async with channel_with_token(f"127.0.0.1:{server.port}", make_token()) as channel:
            usage = usage_service_pb2_grpc.UsageServiceStub(channel)
            await usage.ReportUsage(usage_service_pb2.ReportUsageRequest(event=event(tenant)))
        samples = await scrape(server.http_port)
        recorded = await db.fetchval("SELECT sum(event_count)::bigint FROM usage_rollups")
    finally:
        await server.stop()
    events = {labels for name, labels in samples if name == "tally_events_total"}
    assert events == {frozenset({("outcome", "accepted")})}
    assert value(samples, "tally_events_total", outcome="accepted") == 1
    assert value(samples, "tally_usage_events") == recorded
    assert value(samples, "tally_tenants_active") >= 1


async def test_healthz_and_readyz_follow_the_process_and_the_database(
    tmp_path: Path, server_config: Config
) -> None:
    embedded = EmbeddedPostgres(tmp_path)
    dsn = await asyncio.to_thread(embedded.start)
    server = TallyServer(replace(server_config, database_url=dsn, http_port=0))
    await server.start()
    try:
        port = server.http_port
        assert await status_of(port, "/healthz") == 200
        assert await status_of(port, "/readyz") == 200

        await asyncio.to_thread(embedded.stop)
        await wait_for_status(port, "/readyz", 503)
        assert await status_of(port, "/healthz") == 200  # the process is alive: do not restart it
        assert await scrape(port)  # metrics still answer, with the last database figures

        await asyncio.to_thread(embedded.start)
        await wait_for_status(port, "/readyz", 200)
    finally:
        await server.stop()
        await asyncio.to_thread(embedded.stop)


async def wait_for_status(port: int, path: str, status: int) -> None:
    for _ in range(200):  # the probe runs every 0.5 s (server_config); generous for a loaded machine
        if await status_of(port, path) == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never answered {status}")


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The finished span called `name` (the server ends a call's span just after answering it)."""
    for _ in range(100):
        found = [span for span in exporter.get_finished_spans() if span.name == name]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no span {name}")


def children(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in all_spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_stream_usage_trace_shows_each_batch_and_its_commit_with_the_queries_under_it(
    server_config: Config, tenant: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    server = TallyServer(server_config, tracer_provider=provider)
    await server.start()
    try:
        async with channel_with_token(f"127.0.0.1:{server.port}", make_token(subject="tracer")) as channel:
            call = usage_service_pb2_grpc.UsageServiceStub(channel).StreamUsage(
                metadata=(("x-request-id", "trace-me-1"),)
            )
            for sequence in (1, 2):  # one at a time, so that the lane writes them apart
                await call.write(
                    usage_service_pb2.StreamUsageRequest(
                        sequence=sequence, events=[event(tenant) for _ in range(10)]
                    )
                )
                assert (await call.read()).accepted_count == 10
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        rpc = await finished(exporter, "tally.v1.UsageService/StreamUsage")
    finally:
        await server.stop()

    assert rpc.kind == SpanKind.SERVER
    assert rpc.attributes is not None and rpc.context is not None
    assert rpc.attributes["tally.request_id"] == "trace-me-1"
    assert rpc.attributes["enduser.id"] == "tracer"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    traced = [
        s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == rpc.context.trace_id
    ]
    under_rpc = children(traced, rpc)
    assert sorted(s.name for s in under_rpc) == ["tally.batch"] * 2 + ["tally.batch.prepare"] * 2
    for batch in (s for s in under_rpc if s.name == "tally.batch"):
        assert batch.attributes is not None and batch.attributes["tally.batch.accepted"] == 10
        (commit,) = children(traced, batch)
        assert commit.name == "tally.commit"
        assert commit.attributes is not None and commit.attributes["tally.commit.events"] == 10
        queries = children(traced, commit)
        assert queries and all(q.kind == SpanKind.CLIENT for q in queries)
        statements = [str((q.attributes or {}).get("db.statement", "")) for q in queries]
        assert any("INSERT INTO usage_event_keys" in s for s in statements), statements


async def test_access_log_line_names_the_call_but_never_the_token_or_the_events(
    server_config: Config, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = make_token([tenant], subject="access-log-test")
    secret_payload = "payload-that-must-not-be-logged"
    caplog.set_level(logging.DEBUG)
    lines = io.StringIO()
    server = TallyServer(replace(server_config, access_log=True), log_stream=lines)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await usage_service_pb2_grpc.UsageServiceStub(channel).ReportUsage(
                usage_service_pb2.ReportUsageRequest(
                    event=event(tenant, secret_payload, dimensions={"region": secret_payload})
                ),
                metadata=(("authorization", f"Bearer {token}"), ("x-request-id", "access-1")),
            )
    finally:
        await server.stop()  # writes the access lines still queued
    (line,) = [line for line in lines.getvalue().splitlines() if "request_id=access-1" in line]
    assert " INFO tally.access: ReportUsage OK " in line
    assert "principal=access-log-test" in line
    everything = lines.getvalue() + "\n".join(r.getMessage() for r in caplog.records)
    assert token not in everything and token.split(".")[2] not in everything
    assert secret_payload not in everything
    assert tenant not in everything


async def test_json_log_lines_parse_and_carry_the_trace_id_and_the_request_id(
    server_config: Config, tenant: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    access = io.StringIO()
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    config = replace(server_config, access_log=True, log_format="json")
    server = TallyServer(config, tracer_provider=provider, log_stream=access)
    await server.start()
    try:
        # A token for another tenant: the call is refused, and the refusal is logged too.
        async with channel_with_token(f"127.0.0.1:{server.port}", make_token(["someone-else"])) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await usage_service_pb2_grpc.UsageServiceStub(channel).ReportUsage(
                    usage_service_pb2.ReportUsageRequest(event=event(tenant)),
                    metadata=(("x-request-id", "json-1"),),
                )
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        rpc = await finished(exporter, "tally.v1.UsageService/ReportUsage")
    finally:
        await server.stop()
        root.removeHandler(handler)
        root.setLevel(old_level)

    lines = [json.loads(line) for line in (access.getvalue() + logged.getvalue()).splitlines()]
    ours = [line for line in lines if line.get("request_id") == "json-1"]
    assert rpc.context is not None
    trace_id = format(rpc.context.trace_id, "032x")
    assert {line["trace_id"] for line in ours} == {trace_id}
    (call,) = [line for line in ours if line["logger"] == ACCESS_LOGGER]
    assert (call["method"], call["code"], call["principal"]) == (
        "ReportUsage",
        "PERMISSION_DENIED",
        "test-service",
    )
    assert isinstance(call["duration_ms"], float)
    assert any(line["logger"] == "server.api.errors" for line in ours)  # the refusal line


async def test_a_commit_that_merges_batches_is_the_child_of_the_first_and_links_the_others(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    release = asyncio.Event()

    class Store:
        async def record_new_keys(self, columns: EventColumns, audit: object = None) -> set[EventKey]:
            await release.wait()
            return set(zip(columns.tenant_ids, columns.event_ids, strict=True))

    def rows(*ids: str) -> dict[EventKey, EventRow]:
        return {("t", i): EventRow("t", i, "s", "u", "1", 0, "{}") for i in ids}

    lane = Lane(Store(), max_events=100, telemetry=IngestTelemetry(None, tracer))  # type: ignore[arg-type]
    batches = {name: tracer.start_span(name) for name in ("a", "b", "c")}
    written = []
    for name, span in batches.items():
        with trace.use_span(span):
            written.append(lane.submit(rows(name)))
        await asyncio.sleep(0)  # "a" is being written when "b" and "c" arrive: they share the next commit
    release.set()
    assert [await f for f in written] == [1, 1, 1]

    commits = [s for s in exporter.get_finished_spans() if s.name == "tally.commit"]
    ids = {name: span.get_span_context().span_id for name, span in batches.items()}
    assert [(c.parent.span_id if c.parent else None) for c in commits] == [ids["a"], ids["b"]]
    assert [link.context.span_id for link in commits[1].links] == [ids["c"]]
    assert [c.attributes and c.attributes["tally.commit.batches"] for c in commits] == [1, 2]


def test_traces_are_exported_only_when_an_otlp_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracer_provider_from_env({}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert tracer_provider_from_env({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracer_provider_from_env({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ValueError, match="grpc only"):
        tracer_provider_from_env({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-meter")
    provider = tracer_provider_from_env(endpoint)
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "billing-meter"
    finally:
        provider.shutdown()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    assert resource().attributes["service.name"] == "tally"
