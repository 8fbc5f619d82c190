"""Tally's benchmark: `python -m bench.run` (see --help). Prints a table and writes JSON.

Scenarios, each against a freshly started embedded PostgreSQL (and `tally serve`):
  ingest   bulk ingestion through StreamUsage and IngestUsage, batches of 100/500/2000, 1 and 4 streams
  plain    the same rows written straight into PostgreSQL (the physical limit), and the ratio
  unary    ReportUsage: max requests/s with 64 in flight; p50/p99 at a fixed 1,000 requests/s
  query    GetUsageSummary (hourly, daily) and GenerateInvoice for one tenant with 1M and 10M events
  scale    `tally serve --workers 1, 2, 4` on one PostgreSQL, several streams each on its own
           connection, runs interleaved and repeated (median of --repeats), exact counts checked,
           lock wait per batch sampled; plain PostgreSQL over 1, 2, 4 connections with and without
           the rollup upsert; unary ReportUsage with 1 and 2 workers
  close    the server closes a month for 10,000 tenants (all seven usage types); every invoice checked
  preview  PreviewInvoice of one tenant's open period with 1M and 10M events
  meters-ingest  ingestion with the 7 default SUM meters vs. with MAX, UNIQUE_COUNT and TIME_WEIGHTED
           meters too (the UNIQUE_COUNT of new values, and of seen values), interleaved
           (--repeats), lock wait per batch sampled (bench.meters)
  meters-query   GetUsageSummary per aggregation (SUM, MAX, UNIQUE_COUNT, TIME_WEIGHTED), daily and
           monthly, for one tenant with 1M and 10M events (not in the default set: run it by name)
  meters-statement  the batch statement alone, on two PostgreSQL instances (the default meters; and
           the three extra ones), the same batches paired one by one (--statement-batches, of
           --statement-events): the median per-batch ratio, steady where whole runs swing
           (bench.statement; by name too)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench import closing, harness, meters, plain, queries, statement
from bench.locks import LockSampler

RESULTS = Path(__file__).resolve().parent / "results"


def run_client(*args: str, stack: harness.Stack) -> tuple[dict[str, Any], harness.Meter]:
    """Run bench.client in its own process; meter the server and PostgreSQL while it works."""
    client = subprocess.Popen(
        [sys.executable, "-m", "bench.client", *args, "--address", stack.address, "--token", stack.token],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    line = client.stdout.readline()
    if line.strip() != "ready":
        client.kill()
        raise RuntimeError(f"client failed: {line!r}")
    with harness.Meter(stack) as meter:
        client.stdin.write("go\n")
        client.stdin.flush()
        result = json.loads(client.stdout.readline())
    client.wait(60)
    return result, meter


async def count_events(dsn: str) -> int:
    """The number of events committed in the database at `dsn`."""
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM usage_events")
        return count
    finally:
        await conn.close()


def scenario_ingest(
    events: int, batches: list[int], streams: list[int], server_args: list[str]
) -> list[dict[str, Any]]:
    """Scenario 1: bulk ingestion through the server for each RPC, batch size and stream count.

    Each row compares the events committed with the distinct events sent, and has the rate,
    the CPU of the server and of PostgreSQL, and the server's peak memory.
    """
    rows = []
    for method in ("stream", "ingest"):
        for batch in batches:
            for n in streams:
                with harness.stack(server_args) as stack:
                    result, meter = run_client(
                        "ingest",
                        "--method",
                        method,
                        "--batch",
                        str(batch),
                        "--streams",
                        str(n),
                        "--events",
                        str(events),
                        stack=stack,
                    )
                    committed = asyncio.run(count_events(stack.dsn))
                    row = {
                        "method": "StreamUsage" if method == "stream" else "IngestUsage",
                        "batch": batch,
                        "streams": n,
                        "sent": result["sent"],
                        "committed": committed,
                        "expected": result["distinct"],
                        "seconds": round(meter.elapsed, 2),
                        "events_per_s": round(committed / meter.elapsed),
                        "server_cpu": round(meter.server_cpu * 100),
                        "postgres_cpu": round(meter.postgres_cpu * 100),
                        "server_peak_rss_mb": round(harness.peak_rss_mb(stack.server)),
                    }
                print(_line(row), flush=True)
                rows.append(row)
    return rows


def scenario_unary(duration: float) -> dict[str, Any]:
    """Scenario 3: ReportUsage at most with 64 in flight, and latency at a fixed 1,000 requests/s."""
    with harness.stack() as stack:
        maximum, meter = run_client(
            "unary-max", "--concurrency", "64", "--duration", str(duration), stack=stack
        )
        fixed, _ = run_client("unary-rate", "--rate", "1000", "--duration", str(duration), stack=stack)
    row = {
        "max_rps_64_in_flight": round(maximum["rps"]),
        "server_cpu": round(meter.server_cpu * 100),
        "postgres_cpu": round(meter.postgres_cpu * 100),
        "at_1000_rps_achieved": round(fixed["achieved_rps"]),
        "p50_ms": round(fixed["p50_ms"], 2),
        "p99_ms": round(fixed["p99_ms"], 2),
    }
    print(_line(row), flush=True)
    return row


def scenario_scale(
    events: int, batch: int, streams: int, workers: list[int], repeats: int, unary_seconds: float
) -> dict[str, Any]:
    """Ingestion with 1, 2, 4 worker processes, interleaved runs; the plain PostgreSQL baselines."""
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for n in workers:  # interleaved, so that a slower moment of a shared machine hits every setup
            with harness.stack(["--workers", str(n)]) as stack:
                with LockSampler(stack.dsn) as locks:
                    result, meter = run_client(
                        "ingest",
                        "--method",
                        "stream",
                        "--batch",
                        str(batch),
                        "--streams",
                        str(streams),
                        "--connections",
                        str(streams),
                        "--events",
                        str(events),
                        stack=stack,
                    )
                committed = asyncio.run(count_events(stack.dsn))
            if committed != result["distinct"] or result["accepted"] != committed:
                raise RuntimeError(f"counts not exact: {committed} stored, {result} reported")
            row = {
                "workers": n,
                "repeat": repeat,
                "streams": streams,
                "batch": batch,
                "committed": committed,
                "events_per_s": round(committed / meter.elapsed),
                "server_cpu": round(meter.server_cpu * 100),
                "postgres_cpu": round(meter.postgres_cpu * 100),
                **locks.per_batch(result["batches"]),
            }
            print(_line(row), flush=True)
            runs.append(row)
    medians = []
    for n in workers:
        mine = [r for r in runs if r["workers"] == n]
        medians.append(
            {
                "workers": n,
                "events_per_s_median": round(statistics.median(r["events_per_s"] for r in mine)),
                "lock_wait_p50_ms_median": statistics.median(r["lock_wait_p50_ms"] for r in mine),
                "lock_wait_mean_ms_median": statistics.median(r["lock_wait_mean_ms"] for r in mine),
                "server_cpu_median": statistics.median(r["server_cpu"] for r in mine),
                "postgres_cpu_median": statistics.median(r["postgres_cpu"] for r in mine),
            }
        )
        print("  median " + _line(medians[-1]).strip(), flush=True)
    print("  plain PostgreSQL, COPY + INSERT SELECT, several connections:", flush=True)
    baselines = plain.scenario_connections(events, batch, sorted(set([1, *workers])))
    unary = []
    for n in sorted(set(workers) & {1, 2}) or workers[:1]:
        with harness.stack(["--workers", str(n)]) as stack:
            result, meter = run_client(
                "unary-max",
                "--concurrency",
                "64",
                "--connections",
                str(4 * n),
                "--duration",
                str(unary_seconds),
                stack=stack,
            )
        row = {
            "unary_workers": n,
            "rps": round(result["rps"]),
            "server_cpu": round(meter.server_cpu * 100),
            "postgres_cpu": round(meter.postgres_cpu * 100),
        }
        print(_line(row), flush=True)
        unary.append(row)
    return {"runs": runs, "medians": medians, "plain": baselines, "unary": unary}


def _line(row: dict[str, Any]) -> str:
    return "  " + "  ".join(f"{k}={v}" for k, v in row.items())


def machine() -> dict[str, Any]:
    """What the benchmark ran on: CPU model, cores, memory, Python and platform."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main() -> None:
    """Run the chosen scenarios, print their rows and write the JSON report to bench/results/."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios", default="ingest,plain,unary,query,close,preview", help="comma-separated subset"
    )
    parser.add_argument(
        "--close-tenants", type=int, default=closing.TENANTS, help="tenants whose period closes"
    )
    parser.add_argument("--events", type=int, default=2_000_000, help="events per ingestion run")
    parser.add_argument("--batches", default="100,500,2000", help="batch sizes")
    parser.add_argument("--streams", default="1,4", help="concurrent stream counts")
    parser.add_argument("--unary-seconds", type=float, default=10.0)
    parser.add_argument("--query-events", default="1000000,10000000", help="events of the queried tenant")
    parser.add_argument("--server-args", default="", help="extra `tally serve` flags, e.g. '--workers 2'")
    parser.add_argument("--scale-workers", default="1,2,4", help="scale: worker counts")
    parser.add_argument("--scale-streams", type=int, default=8, help="scale: streams, one connection each")
    parser.add_argument("--scale-batch", type=int, default=1000, help="scale: events per batch")
    parser.add_argument(
        "--repeats", type=int, default=3, help="scale and meters-ingest: interleaved runs per variant"
    )
    parser.add_argument(
        "--statement-batches", type=int, default=300, help="meters-statement: timed batch pairs per variant"
    )
    parser.add_argument(
        "--statement-events",
        type=int,
        default=statement.DEFAULT_EVENTS,
        help="meters-statement: events per batch",
    )
    args = parser.parse_args()
    chosen = set(args.scenarios.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    server_args = args.server_args.split()
    report: dict[str, Any] = {
        "machine": machine(),
        "started": datetime.now(UTC).isoformat(),
        "args": vars(args),
    }
    print(f"machine: {report['machine']}", flush=True)
    if "ingest" in chosen:
        print("scenario 1: bulk ingestion through the server", flush=True)
        report["ingest"] = scenario_ingest(args.events, batches, streams, server_args)
    if "plain" in chosen:
        print("scenario 2: the same rows straight into PostgreSQL", flush=True)
        report["plain"] = plain.scenario(args.events, batches, streams)
        if "ingest" in report:
            limit = max(r["events_per_s"] for r in report["plain"])
            best = max(r["events_per_s"] for r in report["ingest"])
            report["ratio"] = round(best / limit, 2)
            print(
                f"  best server {best} ev/s / plain PostgreSQL limit {limit} ev/s = {report['ratio']}",
                flush=True,
            )
    if "unary" in chosen:
        print("scenario 3: unary ReportUsage", flush=True)
        report["unary"] = scenario_unary(args.unary_seconds)
    if "query" in chosen:
        print("scenario 4: summaries and invoices over one tenant's month", flush=True)
        report["query"] = queries.scenario([int(n) for n in args.query_events.split(",")], run_client)
    if "scale" in chosen:
        print("scenario 5: worker processes on one PostgreSQL, and plain PostgreSQL baselines", flush=True)
        report["scale"] = scenario_scale(
            args.events,
            args.scale_batch,
            args.scale_streams,
            [int(n) for n in args.scale_workers.split(",")],
            args.repeats,
            args.unary_seconds,
        )
    if "close" in chosen:
        print("scenario 6: period close for many tenants", flush=True)
        report["close"] = closing.scenario_close(args.close_tenants)
    if "preview" in chosen:
        print("scenario 7: PreviewInvoice of one tenant's open period", flush=True)
        report["preview"] = closing.scenario_preview(
            [int(n) for n in args.query_events.split(",")], run_client
        )
    if "meters-ingest" in chosen:
        print(
            "scenario 8: ingestion with the default SUM meters, and with MAX, UNIQUE_COUNT, TIME_WEIGHTED",
            flush=True,
        )
        report["meters_ingest"] = meters.scenario_ingest(args.events, args.repeats, run_client)
    if "meters-query" in chosen:
        print("scenario 9: one summary per aggregation over one tenant's month", flush=True)
        report["meters_query"] = meters.scenario_query(
            [int(n) for n in args.query_events.split(",")], run_client
        )
    if "meters-statement" in chosen:
        print("scenario 10: the batch statement alone, with and without the three extra meters", flush=True)
        report["meters_statement"] = statement.scenario_statement(
            args.statement_batches, args.statement_events
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
