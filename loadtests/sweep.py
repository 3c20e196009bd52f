"""The load test at rising call rates against the local stack, per backend: where does
p99 cross the SLO, and what examples/s is sustained below it?

    .venv/bin/python -m loadtests.sweep [--backends triton,onnxruntime] [--rates 1,2,4,8,16]
        [--duration 30] [--candidates 16,512] [--slo-p99-ms 50] [--repo model_repo] [--ingress direct]

Starts the stack (Triton + Ray Serve, or the embedded backend) once per backend, runs
the headless Locust test (loadtests/locust.conf, two users per call/s, each paced to its
share of the rate) at each rate, prints a table and writes
`loadtests/results/sweep-<candidates>.json` and `.png` (latency percentiles against
the rate asked, each point labelled with the examples/s served). A rate the stack cannot
keep up with ends that backend's sweep.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtests.report import slo_violations
from serving.backends.base import BACKENDS, BackendKind
from serving.config import INGRESSES, FrontendConfig, Ingress, default_ingress
from serving.local.ports import free_ports
from serving.local.stack import StackConfig, local_stack
from serving.local.triton import TritonConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOCUST = Path(sys.executable).with_name("locust")
# Below this share of the asked rate, the stack is saturated: higher rates say nothing new.
KEEPS_UP = 0.9


def users_for(rate: float, most: int) -> int:
    """Enough users that each calls every 2 s at most (so a run sees every user several
    times, and a slow call does not stall the rate), up to `most`."""
    return max(2, min(most, math.ceil(rate * 2)))


def locust_command(address: str, rate: float, users: int, seconds: float, candidates: str, processes: int,
                   out: Path) -> list[str]:  # fmt: skip
    """The headless run (loadtests/locust.conf) at `rate`, its CSV, HTML and summary in `out`
    (also the soak's load: loadtests/soak.py)."""
    return [str(LOCUST), "-f", str(HERE / "locustfile.py"), "--config", str(HERE / "locust.conf"),
            "--host", address, "--run-time", f"{seconds:g}s", "--users", str(users),
            "--spawn-rate", str(users), "--rate", str(rate), "--candidates", candidates,
            "--processes", str(processes), "--csv", str(out / "gem"), "--html", str(out / "report.html"),
            "--summary-file", str(out / "summary.json")]  # fmt: skip


def run_locust(address: str, rate: float, args: argparse.Namespace, out: Path, extra: tuple[str, ...] = ()) -> dict:
    users = users_for(rate, args.users)
    command = [*locust_command(address, rate, users, args.duration, args.candidates, args.processes, out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"locust exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def backend_list(text: str) -> list[BackendKind]:
    """`--backends`: comma-separated names, each one of the front end's backends."""
    known: dict[str, BackendKind] = {b: b for b in BACKENDS}
    names = text.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    return [known[name] for name in names]


def stack_config(backend: BackendKind, repo: Path, ingress: Ingress, **frontend: Any) -> StackConfig:
    """The local stack of a load run on free ports: Triton + the front end, or the front
    end alone with the embedded backend; `frontend`: FrontendConfig settings."""
    grpc_port, http, metrics, triton_http, triton_grpc, triton_metrics = free_ports(6)
    triton = None
    if backend == "triton":
        triton = TritonConfig(repo, Path("artifacts/triton-sweep"), triton_http, triton_grpc, triton_metrics)
    front_end = FrontendConfig(backend=backend, repository=repo, **frontend)
    return StackConfig(front_end, triton, grpc_port, http, metrics, ingress=ingress)


def sweep_backend(backend: BackendKind, args: argparse.Namespace, console: Console) -> list[dict]:
    rows = []
    cfg = stack_config(backend, args.repo, args.ingress)
    with local_stack(cfg) as address, tempfile.TemporaryDirectory(prefix="gem-sweep-") as tmp:
        for rate in args.rates:
            with console.status(f"{backend}: {rate:g} calls/s for {args.duration}s"):
                out = Path(tmp) / f"{backend}-{rate:g}"
                out.mkdir()
                result = run_locust(address, rate, args, out)
            result |= {"backend": backend, "target_rate": rate,
                       "within_slo": not slo_violations(result, args.slo_p99_ms, 0.0)}  # fmt: skip
            rows.append(result)
            console.log(f"{backend} @ {rate:g}/s: {result['calls_per_s']:.1f} calls/s, "
                        f"{result['examples_per_s']:,.0f} ex/s, p99 {result['p99_ms']:.0f} ms")  # fmt: skip
            if result["calls_per_s"] < KEEPS_UP * rate:
                break
    return rows


def plot(rows: list[dict], backends: list[str], slo_ms: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False, sharey=True)
    for ax, backend in zip(axes[0], backends, strict=True):
        mine = [r for r in rows if r["backend"] == backend]
        x = [r["target_rate"] for r in mine]
        for q in ("p50", "p95", "p99"):
            ax.plot(x, [r[f"{q}_ms"] for r in mine], marker="o", label=q)
        for r in mine:
            ax.annotate(f"{r['examples_per_s']:,.0f} ex/s", (r["target_rate"], r["p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(0, -12), ha="center")  # fmt: skip
        ax.axhline(slo_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p99 {slo_ms:g} ms")
        ax.set(title=backend, xlabel="calls/s asked (log2)", yscale="log")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("latency (ms)")
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=backend_list, default=",".join(BACKENDS),
                        help="Comma-separated backends, each on its own stack (default: %(default)s).")  # fmt: skip
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32],
                        help="Comma-separated calls/s, in rising order; the first the stack cannot keep up "
                             "with ends that backend's sweep (default: 1,2,4,8,16,32).")  # fmt: skip
    parser.add_argument("--duration", type=int, default=30, help="Seconds per rate.")
    parser.add_argument("--users", type=int, default=64, help="Most Locust users (2 per call/s, each paced).")
    parser.add_argument("--processes", type=int, default=1, help="Locust worker processes.")
    parser.add_argument("--candidates", default="16,512", help="MIN,MAX candidates per call.")
    parser.add_argument("--slo-p99-ms", type=float, default=50.0, help="p99 bound (default: %(default)s).")
    parser.add_argument("--repo", type=Path, default=Path("model_repo"),
                        help="Repository to serve, as `gem export` wrote it (default: %(default)s).")  # fmt: skip
    parser.add_argument("--ingress", choices=INGRESSES, default=default_ingress(),
                        help="who answers the gRPC port: the replica (direct) or Serve's proxy")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console, backends = Console(stderr=True), args.backends
    rows = [row for backend in backends for row in sweep_backend(backend, args, console)]

    title = f"candidates {args.candidates} per call, {args.duration}s per rate, 2 cores"
    table = Table(title=title)
    for col in ("backend", "target calls/s", "calls/s", "examples/s", "p50 ms", "p95 ms", "p99 ms", "failures",
                f"p99 < {args.slo_p99_ms:g} ms"):  # fmt: skip
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        table.add_row(r["backend"], f"{r['target_rate']:g}", f"{r['calls_per_s']:.1f}", f"{r['examples_per_s']:,.0f}",
                      f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["failures"]),
                      "yes" if r["within_slo"] else "no")  # fmt: skip
    Console().print(table)
    for backend in backends:
        ok = [r for r in rows if r["backend"] == backend and r["within_slo"]]
        best = max(ok, key=lambda r: r["examples_per_s"], default=None)
        Console().print(
            f"{backend}: highest sustained with p99 < {args.slo_p99_ms:g} ms: "
            + (f"{best['examples_per_s']:,.0f} examples/s ({best['calls_per_s']:.1f} calls/s)" if best else "none")
        )
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"sweep-{args.candidates.replace(',', '-')}"
    stem.with_suffix(".json").write_text(json.dumps({"config": {**vars(args), "repo": str(args.repo)},
                                                     "results": rows}, indent=2))  # fmt: skip
    plot(rows, backends, args.slo_p99_ms, title, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
