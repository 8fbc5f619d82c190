"""`tally ingest FILE`: a file of events through the batching ingester, with progress and exact counts.

The file is read in chunks of one batch and handed to the thread-backed Ingester,
which streams them on StreamUsage, resends after a lost connection and counts each
event once. The buffer is bounded, so a large file never sits in memory: reading
waits while the server catches up, at most --wait seconds without room. At the end,
every event has been acknowledged (or the command says how many were not: running
the same file again is safe, the server counts each event id once).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from tally_client.cli import UsageError
from tally_client.cli.output import console, print_json
from tally_client.cli.records import BadRecord, Record, read_csv, read_jsonl
from tally_client.client import TallyClient
from tally_client.errors import IngesterClosedError, IngesterFullError, TallyError
from tally_client.ingester import IngestCounts
from tally_client.models import EventRejection, UsageEvent
from tally_client.threaded import Ingester

MAX_PROBLEMS_SHOWN = 20
PROGRESS_SECONDS = 0.25  # how often the bar moves while the last acknowledgements come in


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What became of the file: `rejected` includes the `unreadable` lines, which were never sent."""

    lines: int
    accepted: int
    duplicate: int
    rejected: int
    unreadable: int
    not_acknowledged: int
    rejections: tuple[EventRejection, ...]
    unreadable_lines: tuple[BadRecord, ...]

    @property
    def complete(self) -> bool:
        """True if every event was accepted or a duplicate: none rejected, none left unacknowledged."""
        return self.rejected == 0 and self.not_acknowledged == 0


def _open(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _size(source: BinaryIO) -> int | None:
    try:
        return source.seek(0, io.SEEK_END) if source.seekable() else None
    finally:
        if source.seekable():
            source.seek(0)


def _position(source: BinaryIO) -> int:
    try:
        return source.tell()
    except OSError:  # a pipe
        return 0


def _counts_text(counts: IngestCounts, unreadable: int) -> str:
    return (
        f"accepted {counts.accepted}, duplicate {counts.duplicate}, rejected {counts.rejected + unreadable}"
    )


def _await_acknowledgements(
    ingester: Ingester, wait: float, show_progress: Callable[[IngestCounts], None]
) -> None:
    """Wait for the last acknowledgements, showing them as they come, while the server makes progress.

    After `wait` seconds without any, return (close() then counts what is left).
    """
    last = ingester.counts
    since = time.monotonic()
    while True:
        try:
            ingester.flush(timeout=PROGRESS_SECONDS)
            return
        except TimeoutError:
            counts = ingester.counts
            show_progress(counts)
            if counts.pending != last.pending:
                last, since = counts, time.monotonic()
            elif time.monotonic() - since >= wait:
                return


def ingest_file(client: TallyClient, args: argparse.Namespace) -> int:
    """Send the events of `args.file` (or stdin) through the batching ingester and print the counts.

    Returns the exit status: 0 if every event was settled, 1 if any was rejected or left
    unacknowledged. A call that failed is raised after the counts are printed.
    """
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    fmt = args.format or ("csv" if args.file.lower().endswith(".csv") else "jsonl")
    source = _open(args.file)
    try:
        report, failure = _ingest(client, args, source, fmt)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    _print(report, args.output)
    if failure is not None:
        raise failure  # printed with its code and reason; exit status 1
    return 0 if report.complete else 1


def _ingest(
    client: TallyClient, args: argparse.Namespace, source: BinaryIO, fmt: str
) -> tuple[IngestReport, TallyError | None]:
    text = io.TextIOWrapper(source, encoding="utf-8-sig", newline="" if fmt == "csv" else None)
    reader = read_csv if fmt == "csv" else read_jsonl
    records: Iterator[Record] = reader(text, args.tenant)
    bad: list[BadRecord] = []
    unreadable = lines = 0
    err = console(stderr=True)
    show = err.is_terminal if args.progress is None else args.progress
    progress = Progress(
        TextColumn("ingesting"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
    )
    ingester = client.ingester(batch_size=args.batch_size)
    closed = False
    failure: TallyError | None = None
    try:
        with progress:
            task = progress.add_task("ingest", total=_size(source), counts="")

            def show_progress(counts: IngestCounts) -> None:
                # The bar follows the acknowledgements: the bytes read so far, scaled by the
                # share of the lines read so far that the server has answered.
                answered = counts.accepted + counts.duplicate + counts.rejected + unreadable
                done = _position(source) * answered // lines if lines else 0
                progress.update(task, completed=done, counts=_counts_text(counts, unreadable))

            while chunk := list(itertools.islice(records, args.batch_size)):
                events: list[UsageEvent] = []
                for record in chunk:
                    lines += 1
                    if isinstance(record, BadRecord):
                        unreadable += 1
                        if len(bad) < MAX_PROBLEMS_SHOWN:
                            bad.append(record)
                    else:
                        events.append(record[1])
                ingester.add_many(events, timeout=args.wait)
                show_progress(ingester.counts)
            _await_acknowledgements(ingester, args.wait, show_progress)
            counts = ingester.close(timeout=args.wait)
            closed = True
            show_progress(counts)
    except IngesterFullError:
        pass  # the server took nothing for --wait seconds: the report says what it acknowledged
    except IngesterClosedError as exc:
        # Either a lasting failure stopped the ingester (its cause: a bad token, a missing scope...)
        # or the last acknowledgements did not come within --wait (the report counts them).
        if isinstance(exc.__cause__, TallyError):
            failure = exc.__cause__
    except TallyError as exc:
        failure = exc
    finally:
        if not closed:
            with contextlib.suppress(TallyError):  # the ingester is stopped; its counts say what is left
                ingester.close(timeout=0)
    counts = ingester.counts
    report = IngestReport(
        lines=lines,
        accepted=counts.accepted,
        duplicate=counts.duplicate,
        rejected=counts.rejected + unreadable,
        unreadable=unreadable,
        not_acknowledged=counts.pending,
        rejections=counts.rejections,
        unreadable_lines=tuple(bad),
    )
    return report, failure


def _print(report: IngestReport, output: str) -> None:
    if output == "json":
        print_json(report)
        return
    problems = [f"line {b.line}: {b.problem}" for b in report.unreadable_lines]
    problems += [
        f"event {r.event_id}: {r.field}: {r.reason}" if r.field else f"event {r.event_id}: {r.reason}"
        for r in report.rejections
    ]
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if shown:
        more = report.rejected - len(shown)
        tail = [f"  ... and {more} more"] if more > 0 else []
        print("\n".join(["rejected:", *(f"  {p}" for p in shown), *tail]), file=sys.stderr)
    line = f"accepted {report.accepted}, duplicate {report.duplicate}, rejected {report.rejected}"
    if report.unreadable:
        line += f" ({report.unreadable} unreadable line{'s' if report.unreadable > 1 else ''})"
    if report.not_acknowledged:
        line += (
            f", not acknowledged {report.not_acknowledged} (the server did not confirm them; "
            "running the same file again is safe)"
        )
    print(line)
