"""The stack past its capacity: does it shed load, and do the calls it admits stay fast?

    .venv/bin/python -m loadtests.overload [--backend triton] [--duration 30]
        [--candidates 16,512] [--capacity CALLS_PER_S] [--max-queue-wait-ms 0]
        [--repo model_repo] [--ingress direct] [--probe-candidates 16]

Starts the local stack once and, with the headless Locust test (loadtests/locust.conf)
and a client that does not retry (`--retries 0`, so every refusal is seen and timed):

1. measures the capacity, unless `--capacity` gives it: rates doubling from
   `--start-rate` until the stack serves less than 90 % of the rate asked; the capacity
   is the calls/s it admitted at that rate (what it serves when saturated);
2. runs at 80 % of it, the reference;
3. runs at 2x it, and judges issue 26's targets: the admitted calls' p99 at most 2x the
   reference's, every refusal a retryable UNAVAILABLE within 10 ms, no other failure.

Beside every step a probe (loadtests/probe.py) calls once per 50 ms from a thread of
this process, apart from Locust's busy loop: the refusal target is judged on the probe's
refusals. Locust's own refusal times are shown beside them; they include its loop's
delay. On one machine the probe still shares the stack's cores, so its times are an
upper bound on what a ranker with CPU of its own would see.

Prints a table and the verdicts, writes `loadtests/results/overload-<candidates>.json`.
Exit status 1 when a target is missed (the figures are still written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadtests.probe import Probe, ProbeConfig
from loadtests.sweep import KEEPS_UP, RESULTS, run_locust, stack_config
from serving.config import INGRESSES, default_ingress
from serving.local.stack import local_stack

# Issue 26's targets, fixed before measuring.
REFERENCE_LOAD, OVERLOAD = 0.8, 2.0
P99_GROWTH = 2.0  # admitted p99 at OVERLOAD over its p99 at REFERENCE_LOAD
REFUSED_WITHIN_MS = 10.0
# The client sees each refusal (no retries: a refused call is timed as refused), and
# Locust exits 0 although refusals are failures to it.
NO_RETRIES = ("--retries", "0", "--exit-code-on-error", "0")


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    ok: bool


def saturated(step: dict) -> bool:
    """The stack admitted less than it was asked: what it admitted is its capacity."""
    return step["calls_per_s"] < KEEPS_UP * step["target_rate"]


def verdicts(reference: dict, overload: dict) -> list[Verdict]:
    """Issue 26's targets on the run at REFERENCE_LOAD and the run at OVERLOAD. `calls`
    and the percentiles are the admitted calls' (Locust's); `refused*` the refusals'
    (the probe's, in `probe`)."""
    growth = overload["p99_ms"] / reference["p99_ms"] if reference["p99_ms"] else float("inf")
    probe = overload["probe"]
    refused, slowest = probe["refused"], probe["refused_max_ms"]
    codes = sorted({f["code"] for f in overload["failed_calls"] if not f["refused"]} | set(probe["failed_by_code"]))
    failed_admitted = overload["failures"] - overload["refused"] + sum(probe["failed_by_code"].values())
    return [
        Verdict(
            f"admitted p99 at {OVERLOAD:g}x <= {P99_GROWTH:g}x p99 at {REFERENCE_LOAD:.0%}",
            f"{overload['p99_ms']:.0f} ms vs {reference['p99_ms']:.0f} ms ({growth:.2f}x)",
            growth <= P99_GROWTH,
        ),
        Verdict(
            f"every refusal within {REFUSED_WITHIN_MS:g} ms (the probe's)",
            f"{refused} refused, p50 {_ms(probe['refused_p50_ms'], 1)} ms, p99 {_ms(probe['refused_p99_ms'], 1)} ms, "
            f"max {_ms(slowest, 1)} ms (Locust's {overload['refused']}: p50 {_ms(overload['refused_p50_ms'])} ms, "
            f"max {_ms(overload['refused_max_ms'])} ms)"
            if refused
            else "none refused",
            refused > 0 and slowest is not None and slowest <= REFUSED_WITHIN_MS,
        ),
        Verdict(
            "no failure but retryable refusals",
            f"{failed_admitted} admitted calls failed" + (f", codes {codes}" if codes else ""),
            failed_admitted == 0,
        ),
    ]


def tallied(step: dict) -> dict:
    """A step as the results file keeps it: its failed calls counted by status (refusals
    apart), not listed one by one (thousands at 2x), and no per-version tally."""
    failed = Counter(f"{f['code']} (refused)" if f["refused"] else f["code"] for f in step["failed_calls"])
    kept = {k: v for k, v in step.items() if k not in ("failed_calls", "versions")}
    return kept | {"failed_by_code": dict(failed)}


def _ms(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run(args: argparse.Namespace, console: Console) -> dict:
    steps: list[dict] = []
    cfg = stack_config(args.backend, args.repo, args.ingress, max_queue_wait_s=args.max_queue_wait_ms / 1000)
    probe_cfg = ProbeConfig(candidates=args.probe_candidates)
    with local_stack(cfg) as address, tempfile.TemporaryDirectory(prefix="gem-overload-") as tmp:

        def at(rate: float, label: str) -> dict:
            out = Path(tmp) / f"{label}-{rate:g}"
            out.mkdir()
            status = console.status(f"{label}: {rate:.1f} calls/s for {args.duration}s")
            with status, Probe(address, probe_cfg) as probe:
                result = run_locust(address, rate, args, out, NO_RETRIES)
            result |= {"target_rate": rate, "step": label, "probe": probe.summary()}
            console.log(f"{label} @ {rate:.1f}/s: {result['calls_per_s']:.1f} admitted/s, {result['refused']} refused, "
                        f"p99 {result['p99_ms']:.0f} ms")  # fmt: skip
            steps.append(result)
            return result

        capacity, rate = args.capacity, args.start_rate
        while capacity is None:
            if rate > args.max_rate:
                raise SystemExit(f"the stack kept up with {rate / 2:g} calls/s: raise --max-rate or give --capacity")
            step = at(rate, "capacity")
            if saturated(step):
                capacity = step["calls_per_s"]
            rate *= 2
        reference = at(REFERENCE_LOAD * capacity, "reference")
        overload = at(OVERLOAD * capacity, "overload")
    judged = [asdict(v) for v in verdicts(reference, overload)]
    return {"capacity_calls_per_s": capacity, "steps": [tallied(s) for s in steps], "verdicts": judged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("triton", "onnxruntime"), default="triton")
    parser.add_argument("--capacity", type=float, default=None, help="Calls/s the stack sustains (default: measured).")
    parser.add_argument("--start-rate", type=float, default=8.0, help="First rate of the capacity search (calls/s).")
    parser.add_argument("--max-rate", type=float, default=512.0, help="Last rate of the capacity search (calls/s).")
    parser.add_argument("--duration", type=int, default=30, help="Seconds per rate.")
    parser.add_argument("--users", type=int, default=128, help="Most Locust users (2 per call/s, each paced).")
    parser.add_argument("--processes", type=int, default=1, help="Locust worker processes.")
    parser.add_argument("--candidates", default="16,512", help="MIN,MAX candidates per call.")
    parser.add_argument("--probe-candidates", type=int, default=ProbeConfig.candidates,
                        help="Candidates per probe call (bigger ones are refused more often).")  # fmt: skip
    parser.add_argument("--max-queue-wait-ms", type=float, default=0.0,
                        help="The front end's wait bound (`gem serve --max-queue-wait-ms`; 0: off).")  # fmt: skip
    parser.add_argument("--repo", type=Path, default=Path("model_repo"))
    parser.add_argument("--ingress", choices=INGRESSES, default=default_ingress(),
                        help="who answers the gRPC port: the replica (direct) or Serve's proxy")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    result = run(args, console)

    table = Table(title=f"overload: capacity {result['capacity_calls_per_s']:.1f} calls/s, "
                        f"candidates {args.candidates}, {args.duration}s per rate, no client retries")  # fmt: skip
    for col in ("step", "asked calls/s", "admitted/s", "examples/s", "p50 ms", "p99 ms", "refused",
                "refused p50 / max ms", "probe: refused", "probe: refused p50 / max ms", "other failures"):  # fmt: skip
        table.add_column(col, justify="left" if col == "step" else "right")
    for r in result["steps"]:
        probe = r["probe"]
        table.add_row(r["step"], f"{r['target_rate']:.1f}", f"{r['calls_per_s']:.1f}", f"{r['examples_per_s']:,.0f}",
                      f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["refused"]),
                      f"{_ms(r['refused_p50_ms'])} / {_ms(r['refused_max_ms'])}",
                      f"{probe['refused']}/{probe['calls']}",
                      f"{_ms(probe['refused_p50_ms'], 1)} / {_ms(probe['refused_max_ms'], 1)}",
                      str(r["failures"] - r["refused"] + sum(probe["failed_by_code"].values())))  # fmt: skip
    Console().print(table)
    for v in result["verdicts"]:
        Console().print(f"{'met   ' if v['ok'] else 'MISSED'} {v['target']}: {v['measured']}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"overload-{args.candidates.replace(',', '-')}.json"
    path.write_text(json.dumps({"config": {**vars(args), "repo": str(args.repo)}, **result}, indent=2))
    sys.exit(0 if all(v["ok"] for v in result["verdicts"]) else 1)


if __name__ == "__main__":
    main()
