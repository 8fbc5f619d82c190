"""Overhead of a feature: bulk ingestion and unary calls of two builds, interleaved runs.

    python -m bench.overhead --baseline-tally /path/to/main/.venv/bin/tally \
        --server-args '--http-port 19464 --log-level INFO' --rounds 3

The baseline is another build's `tally` (e.g. a checkout of main with its own venv, or a
script that runs it) with --baseline-args; the candidate is this checkout's `tally` (or
--candidate-tally) with --server-args. Each round runs both, alternating which goes
first; the medians and their ratio are printed (issue 13: telemetry on within 5% of off).

Beside each rate, the server's CPU time per event (ingestion) or per call (unary), in µs:
the cost itself, which moves less than a rate when other jobs share the machine's cores
(a rate falls with any contention; CPU time per unit only with cache and frequency effects).
And the median of the rounds' own ratios: the two runs of a round are next to each other
in time, so their ratio is free of the machine's drift from one round to the next.
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
    parser.add_argument(
        "--candidate-tally", default=harness.TALLY, help="the candidate's `tally` (default: this one)"
    )
    parser.add_argument("--server-args", default="", help="extra `tally serve` flags of the candidate")
    parser.add_argument("--baseline-args", default="", help="extra `tally serve` flags of the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--unary-seconds", type=float, default=10.0)
    args = parser.parse_args()
    candidate = args.candidate_tally
    builds = {
        "baseline": (args.baseline_tally, args.baseline_args.split()),
        "candidate": (candidate, args.server_args.split()),
    }
    results: dict[str, dict[str, list[float]]] = {name: {"ingest": [], "unary": []} for name in builds}
    # Server CPU µs per event or call, same keys.
    costs: dict[str, dict[str, list[float]]] = {name: {"ingest": [], "unary": []} for name in builds}
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
                cost = meter.server_cpu / rate * 1_000_000
                results[name][scenario].append(rate)
                costs[name][scenario].append(cost)
                print(
                    f"round {round_ + 1} {name:9} {scenario:6} {rate:10,.0f}/s  server cpu {cost:7.1f} µs",
                    flush=True,
                )
    harness.TALLY = candidate
    for scenario in ("ingest", "unary"):
        baseline = statistics.median(results["baseline"][scenario])
        measured = statistics.median(results["candidate"][scenario])
        print(
            f"{scenario}: baseline {baseline:,.0f}/s, candidate {measured:,.0f}/s, "
            f"ratio {measured / baseline:.3f}"
        )
        base_cost = statistics.median(costs["baseline"][scenario])
        cost = statistics.median(costs["candidate"][scenario])
        print(
            f"{scenario} server cpu per unit: baseline {base_cost:.1f} µs, candidate {cost:.1f} µs, "
            f"ratio {cost / base_cost:.3f}"
        )
        # Paired: each round's two runs are next to each other in time, so their ratio is
        # free of the machine's drift between rounds (its speed moves by 30% within minutes).
        paired = [
            c / b for c, b in zip(results["candidate"][scenario], results["baseline"][scenario], strict=True)
        ]
        print(
            f"{scenario} per-round ratios {', '.join(f'{r:.3f}' for r in paired)}; "
            f"median {statistics.median(paired):.3f}"
        )


if __name__ == "__main__":
    main()
