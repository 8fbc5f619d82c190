"""Overhead of a feature: bulk ingestion and unary calls of two builds, interleaved runs.

    python -m bench.overhead --baseline-tally /path/to/main/.venv/bin/tally \
        --server-args '--http-port 19464 --log-level INFO' --rounds 3

The baseline is another build's `tally` (e.g. a checkout of main with its own venv, or a
script that runs it); the candidate is this checkout's `tally` with --server-args. Each
round runs both, alternating which goes first; the medians and their ratio are printed
(issue 13: telemetry on within 5% of off).
"""

from __future__ import annotations

import argparse
import statistics

from bench import harness
from bench.run import run_client


def main() -> None:
    """Run both builds' ingestion and unary scenarios for --rounds rounds; print medians and ratios."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-tally", required=True, help="the `tally` command of the baseline build")
    parser.add_argument("--server-args", default="", help="extra `tally serve` flags of the candidate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--unary-seconds", type=float, default=10.0)
    args = parser.parse_args()
    candidate = harness.TALLY
    builds = {"baseline": (args.baseline_tally, []), "candidate": (candidate, args.server_args.split())}
    results: dict[str, dict[str, list[float]]] = {name: {"ingest": [], "unary": []} for name in builds}
    for round_ in range(args.rounds):
        order = ["baseline", "candidate"] if round_ % 2 == 0 else ["candidate", "baseline"]
        for scenario in ("ingest", "unary"):
            for name in order:
                harness.TALLY, extra = builds[name]
                with harness.stack(extra) as stack:
                    if scenario == "ingest":
                        result, meter = run_client(
                            "ingest", "--method", "stream", "--batch", "2000", "--streams", "4",
                            "--events", str(args.events), stack=stack,
                        )  # fmt: skip
                        rate = result["sent"] / meter.elapsed
                    else:
                        result, meter = run_client(
                            "unary-max",
                            "--concurrency",
                            "64",
                            "--duration",
                            str(args.unary_seconds),
                            stack=stack,
                        )
                        rate = result["rps"]
                results[name][scenario].append(rate)
                print(f"round {round_ + 1} {name:9} {scenario:6} {rate:10,.0f}/s", flush=True)
    harness.TALLY = candidate
    for scenario in ("ingest", "unary"):
        baseline = statistics.median(results["baseline"][scenario])
        measured = statistics.median(results["candidate"][scenario])
        print(
            f"{scenario}: baseline {baseline:,.0f}/s, candidate {measured:,.0f}/s, "
            f"ratio {measured / baseline:.3f}"
        )


if __name__ == "__main__":
    main()
