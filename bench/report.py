"""Markdown tables from a benchmark result: `python -m bench.report bench/results/<file>.json`.

docs/performance.md quotes this output, so that its figures are copied by a program.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table of `rows` under `headers`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The Markdown report of a benchmark result (the JSON that bench.run writes)."""
    out = []
    m = report["machine"]
    out.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, Python {m['python']}, "
        f"{m['platform']}; run started {report['started'][:16]} UTC."
    )
    if "ingest" in report:
        out.append("\n**Scenario 1: bulk ingestion through Tally** (events/s counted in the database)\n")
        out.append(
            table(
                ["RPC", "batch", "streams", "events/s", "server CPU", "PostgreSQL CPU", "server peak RSS"],
                [
                    [
                        r["method"],
                        r["batch"],
                        r["streams"],
                        f"{r['events_per_s']:,}",
                        f"{r['server_cpu']}%",
                        f"{r['postgres_cpu']}%",
                        f"{r['server_peak_rss_mb']} MB",
                    ]
                    for r in report["ingest"]
                ],
            )
        )
        bad = [r for r in report["ingest"] if r["committed"] != r["expected"]]
        out.append(
            f"\nEvery run committed exactly the {report['ingest'][0]['expected']:,} distinct events of "
            f"{report['ingest'][0]['sent']:,} sent."
            if not bad
            else f"\nMISMATCH in {len(bad)} runs!"
        )
    if "plain" in report:
        out.append("\n**Scenario 2: the same rows straight into PostgreSQL** (no Tally in between)\n")
        out.append(
            table(
                ["method", "batch", "connections", "events/s", "PostgreSQL CPU"],
                [
                    [
                        r["method"],
                        r["batch"],
                        r["connections"],
                        f"{r['events_per_s']:,}",
                        f"{r['postgres_cpu']}%",
                    ]
                    for r in report["plain"]
                ],
            )
        )
        if "ratio" in report:
            best = max(r["events_per_s"] for r in report["ingest"])
            limit = max(r["events_per_s"] for r in report["plain"])
            out.append(f"\nBest through Tally {best:,} / plain limit {limit:,} = **{report['ratio']}**.")
    if "unary" in report:
        u = report["unary"]
        out.append("\n**Scenario 3: unary ReportUsage**\n")
        out.append(
            table(
                ["max calls/s (64 in flight)", "server CPU", "PostgreSQL CPU", "at 1,000/s: p50", "p99"],
                [
                    [
                        f"{u['max_rps_64_in_flight']:,}",
                        f"{u['server_cpu']}%",
                        f"{u['postgres_cpu']}%",
                        f"{u['p50_ms']} ms",
                        f"{u['p99_ms']} ms",
                    ]
                ],
            )
        )
    if "query" in report:
        out.append("\n**Scenario 4: one tenant's 30 days** (40 sequential calls each, after one warm-up)\n")
        out.append(
            table(
                [
                    "tenant's events",
                    "hourly summary p50 / p99",
                    "daily summary p50 / p99",
                    "invoice p50 / p99",
                ],
                [
                    [
                        f"{r['events']:,}",
                        f"{r['summary-hour_p50_ms']} / {r['summary-hour_p99_ms']} ms",
                        f"{r['summary-day_p50_ms']} / {r['summary-day_p99_ms']} ms",
                        f"{r['invoice_p50_ms']} / {r['invoice_p99_ms']} ms",
                    ]
                    for r in report["query"]
                ],
            )
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))
