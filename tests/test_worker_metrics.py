"""Metrics of `tally serve --workers N`: the files a worker writes read back as the metrics of
one process would, and a dead worker's counts stay in the sum exactly once."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.domain.events import Rejection, RejectionCause
from server.telemetry.metrics import Metrics
from server.telemetry.multiprocess import MetricFiles, MetricsDirectory

Families = dict[str, tuple[str, str, dict[tuple[str, frozenset[tuple[str, str]]], float]]]


def families(registry: CollectorRegistry) -> Families:
    """{family: (type, help, {(sample, labels): value})}, without OpenTelemetry's target_info."""
    return {
        family.name: (
            family.type,
            family.documentation,
            {(s.name, frozenset(s.labels.items())): s.value for s in family.samples},
        )
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.name != "target_info"
    }


def exercise(metrics: Metrics) -> None:
    """A little of everything a server counts."""
    metrics.count_events(3, 1, [Rejection(0, "e1", "quantity", "bad", RejectionCause.INVALID)])
    metrics.count_events(2, 0, [])
    metrics.calls[("ReportUsage", "OK")] += 2
    metrics.calls[("GetInvoice", "NOT_FOUND")] += 1
    metrics.refusals[("tenant",)] += 1
    metrics.streams_open[("StreamUsage",)] += 2
    metrics.streams_open[("StreamUsage",)] -= 1
    metrics.watch_events_in_flight(lambda: 40)
    metrics.publish_events_in_flight()
    for size in (1, 7, 2_000, 20_000):
        metrics.batch_events.record(size)
    metrics.commit_duration.record(0.003)
    metrics.rpc_duration.record(0.2, {"method": "GetInvoice", "code": "NOT_FOUND"})


def test_a_workers_files_read_back_as_the_metrics_of_one_process(tmp_path: Path) -> None:
    single = Metrics(CollectorRegistry(), Resource.create({}))
    directory = MetricsDirectory.create(tmp_path / "metrics")
    files = MetricFiles(directory.path, directory.new_token(0))
    worker = Metrics(CollectorRegistry(), Resource.create({}), files=files)
    exercise(single)
    exercise(worker)
    summed = CollectorRegistry()
    directory.register(summed)
    try:
        # Same names, types, HELP lines, label sets and values: an operator cannot tell them apart.
        assert families(summed) == families(single.registry)
        assert (
            families(summed)["tally_events"][2][("tally_events_total", frozenset({("outcome", "accepted")}))]
            == 5
        )
    finally:
        files.close()
        single.shutdown()
        worker.shutdown()


def test_a_dead_workers_counts_stay_in_the_sum_once_and_its_gauges_leave(tmp_path: Path) -> None:
    directory = MetricsDirectory.create(tmp_path / "metrics")
    summed = CollectorRegistry()
    directory.register(summed)
    workers = []
    for index in range(3):
        files = MetricFiles(directory.path, directory.new_token(index))
        metrics = Metrics(CollectorRegistry(), Resource.create({}), files=files)
        metrics.calls[("ReportUsage", "OK")] += 10 + index
        metrics.streams_open[("StreamUsage",)] += 1
        metrics.commit_duration.record(0.01)
        workers.append((files, metrics))

    def sample(name: str, **labels: str) -> float | None:
        return summed.get_sample_value(name, labels)

    assert sample("tally_rpc_calls_total", method="ReportUsage", code="OK") == 33
    assert sample("tally_streams_open", method="StreamUsage") == 3
    for files, metrics in workers[:2]:  # two die; the first's counts are folded, then the second's too
        files.close()
        metrics.shutdown()
        directory.retire(files.token)
        assert sample("tally_rpc_calls_total", method="ReportUsage", code="OK") == 33
        assert sample("tally_commit_duration_seconds_count") == 3
        assert sample("tally_commit_duration_seconds_bucket", le="0.01") == 3
    assert sample("tally_streams_open", method="StreamUsage") == 1
    assert sorted(path.name for path in directory.path.iterdir()) == [
        "counter_retired.db",
        "counter_w2n3.db",
        "gauge_livesum_w2n3.db",
        "histogram_retired.db",
        "histogram_w2n3.db",
    ]
    workers[2][0].close()
    workers[2][1].shutdown()


def test_a_new_run_removes_the_directories_of_runs_whose_parent_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "metrics"
    (root / "run-999999999").mkdir(parents=True)  # no such process
    current = MetricsDirectory.create(root)
    assert [path.name for path in root.iterdir()] == [current.path.name]
    current.remove()
    assert not current.path.exists()
