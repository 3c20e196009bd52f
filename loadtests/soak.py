"""The soak: the local stack under steady load for a long time, with the side trainer
publishing under it and faults on a schedule; then the bounds of issue 26.

    .venv/bin/python -m loadtests.soak [--minutes 20] [--rate 21 | --fraction 0.7 --capacity 30]
        [--repo model_repo] [--checkpoint artifacts/checkpoint] [--out artifacts/soak]
        [--address HOST:PORT --stack-pid PID --triton-url HOST:PORT --triton-work-dir DIR]

It starts the stack as `gem up` does (serving/local/stack.py: a supervised Triton and
Ray Serve) on a copy of --repo, or attaches to a running one (--address; the faults then
change that stack's repository), starts the side trainer (`gem trainer run`) on a stream
folder of its own, and runs the headless Locust test (loadtests/locustfile.py) for the
run's length. Meanwhile the faults of loadtests/faults.py happen (loadtests/chaos.py)
and every few seconds the stack's processes are sampled (loadtests/sampling.py). At the
end it writes `soak.json` and `soak.png` in --out, prints the verdict of each bound
(loadtests/bounds.py) and exits 1 when one is broken.

The capacity is given, not measured here: the stack's sustained calls/s is what
`python -m loadtests.sweep` finds (loadtests/README.md: ~30 calls/s through Triton on this
machine's 2 cores, 16-512 candidates)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from loadtests import bounds, chaos
from loadtests.faults import Fault, schedule, warm_up_s
from loadtests.sampling import SKIP_ENV, sample
from loadtests.sweep import locust_command, users_for
from model.schema import DEFAULT_SCHEMA_PATH, load_schema
from serving.config import FrontendConfig
from serving.local.ports import free_ports
from serving.local.stack import StackConfig, local_stack
from serving.local.triton import ADMIN_KEY_ENV, TritonConfig, stored_admin_key
from trainer.stream import StreamConfig

log = logging.getLogger("gem.soak")
# The locustfile's call deadline (KnowledgeUser.on_start): what a call may wait for a
# restarting Triton before it fails.
DEADLINE_S = 30.0
# The stream the trainer learns from: the test world of the synthetic data, small shards
# (a cycle of the `tiny` model takes seconds, of `small` a minute on two cores).
STREAM_ROWS = 1_000
# The faults that feed the side trainer a shard.
SHARD_FAULTS = ("adapter_refresh", "publish")


@dataclass
class Run:
    """What a soak records while it runs (threads append; read after they stop)."""

    started: float = 0.0  # wall-clock start of the load
    samples: list[dict] = field(default_factory=list)
    published: dict[str, set[int]] = field(default_factory=lambda: {"fm": set(), "adapter": set()})
    faults: list[dict] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def watch(run: Run, roots: tuple[int, ...], repo: Path, every_s: float) -> None:
    """Samples the stack's processes and notes every version the repository holds."""
    models = {"fm": FM_MODEL, "adapter": ADAPTER_MODEL}
    while True:
        run.samples.append(sample(roots, time.time() - run.started).to_json())
        for key, model in models.items():
            with contextlib.suppress(OSError):
                run.published[key] |= set(ModelRepository(repo).versions(model))
        if run.stop.wait(every_s):
            return


def inject(run: Run, target: chaos.Target, faults: list[Fault]) -> None:
    shards = 0
    for fault in faults:
        if run.stop.wait(max(0.0, run.started + fault.at_s - time.time())):
            return
        log.info("fault at %g s: %s", fault.at_s, fault.kind)
        result = chaos.carry_out(target, fault, shards)
        shards += fault.kind in SHARD_FAULTS
        log.info("  %s: %s", "done" if result["ok"] else "FAILED", result["detail"])
        run.faults.append(result)


def start_trainer(args: argparse.Namespace, repo: Path, triton_url: str, admin_key: str) -> subprocess.Popen:
    command = [str(chaos.GEM), "trainer", "run", "--stream", str(args.out / "stream"), "--repo", str(repo),
               "--state", str(args.out / "trainer"), "--checkpoint", str(args.checkpoint), "--preset", args.preset,
               "--triton-url", triton_url, "--tolerance", "10", "--poll-s", "1", "--batch-size", "128"]  # fmt: skip
    (args.out / "stream").mkdir(parents=True, exist_ok=True)
    with (args.out / "trainer.log").open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, ADMIN_KEY_ENV: admin_key})  # fmt: skip


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to its process group, SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@contextlib.contextmanager
def the_stack(args: argparse.Namespace):
    """(address, Triton's gRPC URL, its admin key, the repository, the sampled roots):
    a stack started here on a copy of --repo, or the one --address names."""
    if args.address:
        key = stored_admin_key(args.triton_work_dir) or os.environ.get(ADMIN_KEY_ENV, "")
        yield args.address, args.triton_url, key, args.repo, (os.getpid(), args.stack_pid)
        return
    repo = args.out / "repo"
    shutil.copytree(args.repo, repo)
    grpc_port, http, metrics, triton_http, triton_grpc, triton_metrics = free_ports(6)
    triton = TritonConfig(repo, args.out / "triton", triton_http, triton_grpc, triton_metrics)
    cfg = StackConfig(FrontendConfig(repository=repo), triton, grpc_port, http, metrics)
    with local_stack(cfg) as address:
        yield address, triton.grpc_url, stored_admin_key(triton.work_dir) or "", repo, (os.getpid(),)


def history(path: Path, started: float) -> list[dict]:
    """Locust's per-second history of all calls: calls/s, failures/s, p99."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    return [{"t": int(r["Timestamp"]) - started, "calls_per_s": float(r["Requests/s"]),
             "failures_per_s": float(r["Failures/s"]), "p99_ms": float(r["99%"]) if r["99%"] != "N/A" else 0.0}
            for r in rows]  # fmt: skip


def verdicts(
    run: Run, summary: dict, rate: float, faults: list[Fault], warm_up_end: float, publishes: list[dict]
) -> list[bounds.Verdict]:
    triton_down = [bounds.Window(**f["down"]) for f in run.faults if f["down"] and f["down"]["what"] == "triton"]
    rolled_back = {
        f["rolled_back"]["model"]: (set(f["rolled_back"]["versions"]), f["done"])
        for f in run.faults
        if f.get("rolled_back")
    }
    steady = bounds.steady_from(warm_up_end, publishes, run.started)
    return [
        *bounds.failed_calls(summary["failed_calls"], triton_down, rate, DEADLINE_S),
        *bounds.versions_served(summary["versions"], run.published, rolled_back),
        *bounds.rss_growth(run.samples, steady),
        *bounds.flat(run.samples, steady),
        *bounds.triton_exits(run.samples, sum(f["kind"] == "kill_triton" for f in run.faults)),
        *bounds.trainer_published(publishes, sum(f.kind in SHARD_FAULTS for f in faults)),
        *bounds.faults_done(run.faults, len(faults)),
    ]


def plot(run: Run, calls: list[dict], path: Path, title: str) -> None:
    """Over time: the load (calls/s, failures/s, p99), each process's RSS, the stack's
    fds and threads, /dev/shm; the faults as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    t = [c["t"] for c in calls]
    axes[0].plot(t, [c["calls_per_s"] for c in calls], label="calls/s")
    axes[0].plot(t, [c["failures_per_s"] for c in calls], label="failures/s", color="red")
    p99 = axes[0].twinx()
    p99.plot(t, [c["p99_ms"] for c in calls], label="p99 ms", color="gray", alpha=0.6)
    p99.set_ylabel("p99 ms")
    axes[0].set_ylabel("calls/s")
    axes[0].legend(loc="upper left")
    by_process: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for s in run.samples:
        for proc in s["processes"]:
            by_process.setdefault((proc["pid"], proc["name"]), []).append((s["t"], proc["rss_bytes"] / 2**20))
    for (pid, name), points in by_process.items():
        if len(points) > 1 and max(mb for _, mb in points) > 50:  # the small helpers would bury the rest
            axes[1].plot(*zip(*points, strict=True), label=f"{name} {pid}", linewidth=1)
    axes[1].set_ylabel("RSS MiB")
    axes[1].legend(fontsize=6, ncol=2)
    st = [s["t"] for s in run.samples]
    totals = [bounds.totals(s) for s in run.samples]
    axes[2].plot(st, [x["fds"] for x in totals], label="open fds")
    axes[2].plot(st, [x["threads"] for x in totals], label="threads")
    axes[2].set_ylabel("whole stack")
    axes[2].legend()
    axes[3].plot(st, [x["shm_bytes"] / 2**20 for x in totals])
    axes[3].set(ylabel="/dev/shm MiB", xlabel="seconds")
    for ax in axes:
        for f in run.faults:
            ax.axvline(f["started"] - run.started, color="black" if f["ok"] else "red", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
    for f in run.faults:
        axes[0].annotate(f["kind"], (f["started"] - run.started, 0), rotation=90, fontsize=7, va="bottom")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def soak(args: argparse.Namespace) -> tuple[list[bounds.Verdict], dict]:
    seconds = args.minutes * 60
    faults = schedule(seconds)  # before anything starts: a too-short run fails here
    rate = args.rate or args.fraction * args.capacity
    run, schema = Run(), load_schema(args.schema)
    with the_stack(args) as (address, triton_url, admin_key, repo, roots):
        trainer = start_trainer(args, repo, triton_url, admin_key)
        shards = sum(f.kind in SHARD_FAULTS for f in faults)
        stream = StreamConfig(out=args.out / "stream", shards=shards, rows_per_shard=STREAM_ROWS, every_s=0.0,
                              drift=0.0, seed=7, users=3_000, ads=1_000)  # fmt: skip
        target = chaos.Target(roots, address, triton_url, admin_key, repo, args.checkpoint, stream,
                              args.out / "trainer", schema)  # fmt: skip
        users = users_for(rate, args.users)
        command = locust_command(address, rate, users, seconds, args.candidates, 1, args.out)
        threads = [threading.Thread(target=watch, args=(run, roots, repo, args.sample_s), daemon=True),
                   threading.Thread(target=inject, args=(run, target, faults), daemon=True)]  # fmt: skip
        run.started = time.time()
        with (args.out / "locust.log").open("w") as out:
            locust = subprocess.Popen([*command, "--csv-full-history"], stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, SKIP_ENV: "1"}, start_new_session=True)  # fmt: skip
        try:
            for thread in threads:
                thread.start()
            locust.wait(timeout=seconds + 300)
            threads[1].join(timeout=chaos.PUBLISH_TIMEOUT_S)  # a fault still running finishes first
            publishes = chaos.wait_for_publishes(target, shards)
        finally:
            run.stop.set()  # an interrupted soak leaves its faults' thread (a daemon) behind
            threads[0].join(timeout=60)
            stop_process(locust)
            stop_process(trainer)
    summary = json.loads((args.out / "summary.json").read_text())
    result = verdicts(run, summary, rate, faults, warm_up_s(seconds), publishes)
    calls = history(args.out / "gem_stats_history.csv", run.started)
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "rate": rate, "summary": summary,
              "faults": run.faults, "publishes": publishes,
              "published": {k: sorted(v) for k, v in run.published.items()},
              "samples": run.samples, "calls": calls, "verdicts": [v.__dict__ for v in result]}  # fmt: skip
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(run, calls, args.out / "soak.png", f"soak: {args.minutes:g} min at {rate:g} calls/s")
    return result, summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from gem.cli.common import DEFAULT_CHECKPOINT, DEFAULT_REPO

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=0.0, help="Calls/s (default: --fraction of --capacity).")
    parser.add_argument("--fraction", type=float, default=0.7)
    parser.add_argument("--capacity", type=float, default=30.0, help="The stack's sustained calls/s (the sweep's).")
    parser.add_argument("--users", type=int, default=64, help="Most Locust users (2 per call/s, each paced).")
    parser.add_argument("--candidates", default="16,512", help="MIN,MAX candidates per call.")
    parser.add_argument("--sample-s", type=float, default=5.0, help="Seconds between resource samples.")
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="Served repository (copied, unless attached).")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="The served model's: the trainer's start, the disk-full export's input.")  # fmt: skip
    parser.add_argument("--preset", default="small", help="The checkpoint's preset (`gem trainer run --preset`).")
    parser.add_argument("--schema", type=Path, default=DEFAULT_SCHEMA_PATH)
    parser.add_argument("--out", type=Path, default=Path("artifacts/soak"))
    parser.add_argument("--address", help="Attach to the front end here instead of starting a stack.")
    parser.add_argument("--stack-pid", type=int, help="With --address: the `gem up` the stack's processes run under.")
    parser.add_argument("--triton-url", default="127.0.0.1:8001", help="With --address: Triton's gRPC address.")
    parser.add_argument("--triton-work-dir", type=Path, default=Path("artifacts/triton"),
                        help="With --address: where `gem up` keeps Triton's state (its admin key).")  # fmt: skip
    args = parser.parse_args(argv)
    if args.address and not args.stack_pid:
        parser.error("--address needs --stack-pid (the processes to sample and to kill)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty (a soak writes its stream, state and results there)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        result, summary = soak(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the stack, the trainer and Locust are stopped", file=sys.stderr)
        return 130
    table = Table(title=f"soak: {summary['calls']} calls, {summary['calls_per_s']:.1f}/s, "
                  f"p99 {summary['p99_ms']:.0f} ms ({args.out / 'soak.json'}, soak.png)")  # fmt: skip
    for col in ("bound", "measured", "verdict"):
        table.add_column(col)
    for v in result:
        table.add_row(v.bound, v.measured, "ok" if v.ok else "[red]BROKEN[/red]")
    Console().print(table)
    return 0 if all(v.ok for v in result) else 1


if __name__ == "__main__":
    sys.exit(main())
