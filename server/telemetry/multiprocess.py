"""Metrics of `tally serve --workers N`: one series per metric, summed over the worker processes.

Each worker writes every count, open-stream gauge and histogram bucket, as it changes, into
memory-mapped files of its own in the run's metrics directory (prometheus-client's
multiprocess file format). The parent, which owns the HTTP listener, sums all the files
when Prometheus scrapes (`prometheus_client.multiprocess.MultiProcessCollector`).

Why files rather than asking each worker for a snapshot at scrape time (the first plan):
a file outlives its process, so a worker that is killed, even by SIGKILL, leaves every
count it had finished behind; its replacement writes files of its own, so nothing is
counted twice. A snapshot would lose what the dead worker counted since the last scrape.
The instruments stay the ones of server.telemetry.metrics (plain counts and histograms
written through to the file; a write is a few hundred nanoseconds, once per call or
batch, never per event).

When a worker exits, the parent drops its gauges (the streams it served are gone) and folds
its counters and histograms into one `retired` file, so the directory does not grow with
restarts. A worker writes from its event loop only (the files are not thread safe).
"""

from __future__ import annotations

import math
import os
import shutil
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

Key = tuple[str, ...]

# prometheus-client's file kinds: the collector reads the kind from the file name.
_COUNTER, _HISTOGRAM, _GAUGE = "counter", "histogram", "gauge_livesum"
RETIRED = "retired"


class WrittenCounts(defaultdict[Key, int]):
    """Counts by label values (used like a dict of ints) whose every change is written to the file."""

    def __init__(
        self, file: MmapedDict, metric: str, sample: str, labelnames: Sequence[str], help: str
    ) -> None:
        super().__init__(int)
        self._file = file
        self._metric = metric
        self._sample = sample
        self._labelnames = list(labelnames)
        self._help = help
        self._keys: dict[Key, str] = {}

    def __setitem__(self, key: Key, value: int) -> None:
        super().__setitem__(key, value)
        file_key = self._keys.get(key)
        if file_key is None:
            file_key = self._keys[key] = mmap_key(
                self._metric, self._sample, self._labelnames, list(key), self._help
            )
        self._file.write_value(file_key, float(value), 0.0)


class _Cell:
    """One label set's histogram: a count per bucket (not cumulative: the collector sums) and the sum."""

    __slots__ = ("bucket_keys", "counts", "sum", "sum_key")

    def __init__(self, bucket_keys: list[str], sum_key: str) -> None:
        self.bucket_keys = bucket_keys
        self.sum_key = sum_key
        self.counts = [0] * len(bucket_keys)
        self.sum = 0.0


class WrittenHistogram:
    """A histogram with fixed bucket bounds, `record`ed like an OpenTelemetry one, written to the file."""

    def __init__(
        self, file: MmapedDict, metric: str, help: str, labelnames: Sequence[str], bounds: Sequence[float]
    ) -> None:
        self._file = file
        self._metric = metric
        self._help = help
        self._labelnames = list(labelnames)
        self._bounds = [float(bound) for bound in bounds] + [math.inf]
        self._cells: dict[Key, _Cell] = {}

    def _cell(self, labels: Key) -> _Cell:
        names, values = [*self._labelnames, "le"], list(labels)
        bucket_keys = [
            mmap_key(
                self._metric, f"{self._metric}_bucket", names, [*values, floatToGoString(bound)], self._help
            )
            for bound in self._bounds
        ]
        cell = _Cell(
            bucket_keys, mmap_key(self._metric, f"{self._metric}_sum", self._labelnames, values, self._help)
        )
        for key in bucket_keys:  # every bucket present from the start, as Prometheus expects
            self._file.write_value(key, 0.0, 0.0)
        self._file.write_value(cell.sum_key, 0.0, 0.0)
        self._cells[labels] = cell
        return cell

    def record(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        labels: Key = tuple(attributes[name] for name in self._labelnames) if attributes else ()
        cell = self._cells.get(labels) or self._cell(labels)
        bucket = bisect_left(self._bounds, amount)  # the first bound >= amount: Prometheus' `le`
        cell.counts[bucket] += 1
        cell.sum += amount
        self._file.write_value(cell.bucket_keys[bucket], float(cell.counts[bucket]), 0.0)
        self._file.write_value(cell.sum_key, cell.sum, 0.0)


class MetricFiles:
    """A worker's files in the run directory; `token` names them and is never reused in a run."""

    def __init__(self, directory: Path, token: str) -> None:
        self.token = token
        self._files = [
            MmapedDict(str(directory / f"{kind}_{token}.db")) for kind in (_COUNTER, _HISTOGRAM, _GAUGE)
        ]

    def counter(self, metric: str, help: str, labelnames: Sequence[str]) -> WrittenCounts:
        return WrittenCounts(self._files[0], metric, f"{metric}_total", labelnames, help)

    def histogram(
        self, metric: str, help: str, labelnames: Sequence[str], bounds: Sequence[float]
    ) -> WrittenHistogram:
        return WrittenHistogram(self._files[1], metric, help, labelnames, bounds)

    def gauge(self, metric: str, help: str, labelnames: Sequence[str]) -> WrittenCounts:
        """A gauge summed over the workers alive (dropped when its worker exits)."""
        return WrittenCounts(self._files[2], metric, metric, labelnames, help)

    def close(self) -> None:
        for file in self._files:
            file.close()


class MetricsDirectory:
    """The parent's side: a directory per run, the collector that sums it, retiring dead workers' files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens = 0

    @classmethod
    def create(cls, root: Path) -> MetricsDirectory:
        """A fresh `run-<pid>` directory under root; directories of runs whose parent is gone are removed."""
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("run-*"):
            pid = old.name.removeprefix("run-")
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        path = root / f"run-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)  # a run of an earlier process with this pid
        path.mkdir()
        return cls(path)

    def register(self, registry: CollectorRegistry) -> None:
        MultiProcessCollector(registry, path=str(self.path))

    def new_token(self, worker: int) -> str:
        """A name for the files of a worker being started (no underscore: the collector splits on them)."""
        self._tokens += 1
        return f"w{worker}n{self._tokens}"

    def retire(self, token: str) -> None:
        """The worker that wrote `token`'s files has exited: drop its gauges, fold its counts into `retired`.

        Synchronous, like the collector's scrape in the same event loop: a scrape never sees the
        counts both in the retired file and in the dead worker's.
        """
        mark_process_dead(token, str(self.path))
        for kind in (_COUNTER, _HISTOGRAM):
            dead = self.path / f"{kind}_{token}.db"
            if not dead.exists():
                continue  # it never started
            retired = self.path / f"{kind}_{RETIRED}.db"
            sources = [str(path) for path in (retired, dead) if path.exists()]
            merged = MultiProcessCollector.merge(sources, accumulate=False)
            staging = self.path / f"{kind}_{RETIRED}.next"
            staging.unlink(missing_ok=True)
            out = MmapedDict(str(staging))
            try:
                for metric in merged:
                    for sample in metric.samples:
                        names = list(sample.labels)
                        key = mmap_key(
                            metric.name,
                            sample.name,
                            names,
                            [sample.labels[n] for n in names],
                            metric.documentation,
                        )
                        out.write_value(key, sample.value, 0.0)
            finally:
                out.close()
            os.replace(staging, retired)
            dead.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
