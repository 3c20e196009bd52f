"""The side trainer: throughput, freshness and what refreshing buys.

    .venv/bin/python -m bench.trainer [--preset tiny] [--rows 10000] [--cycles 10] [--every-s 45]

Four measurements on one synthetic stream with drift (the planted preferences move
from the first shard to the last):

1. trainer examples/s with 1 process and with 2 gloo DDP processes (same rows, same steps);
2. NE on fresh data, cycle by cycle, of the refreshed FM (the real trainer: train on shard
   n, gate on n + 1, publish) against a frozen FM (the warm start, never updated);
3. log loss on fresh data of adapted labels (the Student Adapter refitted every cycle on
   the freshest shard) against the raw labels of the same stale FM;
4. refresh latency: from a shard's arrival in the stream folder to Triton serving an FM
   version trained on it (`gem trainer run` next to the local Triton, a stream player
   writing a shard every --every-s seconds). Progressive validation waits for the next
   shard, so this includes one inter-arrival time; the time from that next shard's
   arrival to serving is reported too;
5. a cycle's time without and with --knowledge-out (the served versions' knowledge of
   each gated shard written from the gate's own pass): the same cycles, each timed
   between consecutive publish lines of the ledger. `--knowledge-only` runs only this
   (and the warm start it needs), into bench/results/trainer_knowledge.json.

Prints a table, writes bench/results/trainer.json and bench/results/trainer.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.common import RESULTS
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from model.checkpoint import load_checkpoint
from model.config import PRESETS
from model.examples import random_batch
from model.gem import GEM
from model.outputs import sigmoid
from model.schema import SURFACE_INPUT, load_schema
from serving.backends.triton_client import TritonClient
from serving.local.ports import free_ports
from serving.local.triton import TritonConfig, TritonServer
from trainer import distributed as D
from trainer.config import TrainerConfig
from trainer.coordinator import fit_refresh
from trainer.evaluation import log_loss
from trainer.gate import task_metrics
from trainer.loop import Trainer
from trainer.stream import StreamConfig, load_shard, play_stream
from trainer.train import TrainConfig, labels_of, make_optimizers, predict, train, train_steps

console = Console(stderr=True)
GEM_BIN = Path(sys.executable).with_name("gem")


# -- 1. throughput ---------------------------------------------------------------------


def _throughput_worker(shards: list[str], preset_name: str, batch_size: int, out: str) -> None:
    rt = D.init("ddp")
    try:
        schema = load_schema()
        torch.manual_seed(0)
        model = D.wrap(GEM(schema, PRESETS[preset_name]), rt)
        optimizers = make_optimizers(model, 2e-3, 0.05)
        batches = [load_shard(Path(s), schema, PRESETS[preset_name].seq_len) for s in shards]
        mine = [
            {k: v[D.rank_rows(len(b[SURFACE_INPUT]), rt.rank, rt.world_size)] for k, v in b.items()} for b in batches
        ]
        rng = np.random.default_rng(rt.rank)
        train_steps(model, optimizers, {k: v[:batch_size] for k, v in mine[0].items()}, schema, batch_size, rng)
        D.barrier(rt)
        start = time.perf_counter()
        for b in mine:
            train_steps(model, optimizers, b, schema, batch_size, rng)
        D.barrier(rt)
        seconds = time.perf_counter() - start
        if rt.is_main:
            examples = sum(len(b[SURFACE_INPUT]) for b in mine) * rt.world_size
            Path(out).write_text(json.dumps({"examples": examples, "seconds": seconds}))
    finally:
        D.shutdown(rt)


def throughput(shards: list[Path], preset_name: str, batch_size: int, procs: int, tmp: Path) -> dict:
    out = tmp / f"throughput-{procs}.json"
    args = ([str(s) for s in shards], preset_name, batch_size, str(out))
    if procs == 1:
        _throughput_worker(*args)  # the trainer's one-process path: no process group, no DDP
    else:
        D.spawn(_throughput_worker, procs, *args)
    r = json.loads(out.read_text())
    return {
        "procs": procs,
        "examples": r["examples"],
        "seconds": r["seconds"],
        "examples_per_s": r["examples"] / r["seconds"],
    }


# -- 2 and 3. refreshed vs frozen, adapted vs raw ----------------------------------------------


def refresh_vs_frozen(
    stream: Path, warm: Path, repo: Path, state: Path, preset_name: str, batch_size: int
) -> list[dict]:
    cfg = TrainerConfig(
        stream=stream, repository=repo, state_dir=state, checkpoint=warm, preset=preset_name, batch_size=batch_size,
        tolerance=0.01, exit_when_idle=True,
    )  # fmt: skip
    Trainer(cfg, D.Runtime()).run()
    frozen = load_checkpoint(warm)
    schema = frozen.schema
    rows = []
    for line in (json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()):
        if line.get("kind") != "shard":
            continue
        fresh = load_shard(stream / line["eval_shard"], schema, frozen.config.seq_len)
        frozen_m = task_metrics(schema, predict(frozen.model, fresh, schema), fresh)
        # What serves after the cycle: the candidate if it passed the gate, else the version before.
        serving = line["candidate"] if line["state"] == "trained" else line["serving"]
        rows.append({
            "cycle": line["cycle"], "trained_on": line["shard"], "eval_shard": line["eval_shard"],
            "state": line["state"],
            **{f"refreshed_ne_{t}": serving[t]["ne"] for t in serving},
            **{f"frozen_ne_{t}": frozen_m[t]["ne"] for t in frozen_m},
            **{f"refreshed_auc_{t}": serving[t]["auc"] for t in serving},
            **{f"frozen_auc_{t}": frozen_m[t]["auc"] for t in frozen_m},
        })  # fmt: skip
    return rows


def adapted_vs_raw(shards: list[Path], warm: Path, epochs: int) -> list[dict]:
    """The FM held stale (the warm start); the adapter refitted on shard n, scored on n + 1."""
    frozen = load_checkpoint(warm)
    schema = frozen.schema
    adapter = frozen.adapter
    rows = []
    batches = [load_shard(p, schema, frozen.config.seq_len) for p in shards]
    logits = [predict(frozen.model, b, schema) for b in batches]
    for n in range(len(shards) - 1):
        adapter = fit_refresh(adapter, logits[n], batches[n], schema, epochs, seed=n)
        nxt, raw = batches[n + 1], logits[n + 1]
        with torch.no_grad():
            adapted = adapter(torch.from_numpy(raw), torch.from_numpy(nxt[SURFACE_INPUT])).numpy()
        y = labels_of(nxt, schema)
        row: dict[str, str | float] = {"fit_on": shards[n].name, "eval_shard": shards[n + 1].name}
        for t, task in enumerate(schema.tasks):
            row[f"raw_log_loss_{task.name}"] = log_loss(y[:, t], sigmoid(raw[:, t].astype(np.float64)))
            row[f"adapted_log_loss_{task.name}"] = log_loss(y[:, t], sigmoid(adapted[:, t].astype(np.float64)))
        rows.append(row)
    return rows


# -- 4. refresh latency --------------------------------------------------------------------


def refresh_latency(
    work: Path, warm: Path, preset_name: str, rows: int, shards: int, every_s: float, drift: float, seed: int
) -> dict:
    schema = load_schema()
    repo, stream, state = work / "lat-repo", work / "lat-stream", work / "lat-state"
    publish(load_checkpoint(warm), ModelRepository(repo), PublishPolicy())
    http, grpc, metrics = free_ports(3)
    tcfg = TritonConfig(repository=repo, work_dir=work / "triton", http_port=http, grpc_port=grpc, metrics_port=metrics)
    arrivals: dict[str, float] = {}
    served_at: dict[int, float] = {}
    stop = threading.Event()
    batch = random_batch(schema, 4, 4)

    def watch(url: str) -> None:
        async def loop() -> None:
            async with TritonClient(url) as client:
                while not stop.is_set():
                    try:
                        out = await client.infer(batch, outputs=("fm_version",))
                        served_at.setdefault(int(out["fm_version"][0, 0]), time.time())
                    except Exception:  # a failed call is counted by the tests, not here
                        pass
                    await asyncio.sleep(0.1)

        asyncio.run(loop())

    with TritonServer(tcfg) as server:
        watcher = threading.Thread(target=watch, args=(server.cfg.grpc_url,), daemon=True)
        watcher.start()
        log = (work / "lat-trainer.log").open("w")
        proc = subprocess.Popen(
            [str(GEM_BIN), "trainer", "run", "--stream", str(stream), "--repo", str(repo), "--state", str(state),
             "--checkpoint", str(warm), "--preset", preset_name, "--triton-url", server.cfg.grpc_url,
             "--poll-s", "0.2", "--max-cycles", str(shards - 1), "--tolerance", "0.05"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            time.sleep(8)  # the trainer's start-up (imports, model) is not part of a refresh
            cfg = StreamConfig(out=stream, shards=shards, rows_per_shard=rows, every_s=every_s, drift=drift, seed=seed)
            play_stream(cfg, schema, on_shard=lambda p: arrivals.setdefault(p.name, time.time()))
            proc.wait(timeout=shards * every_s + 600)
            time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.kill()
            stop.set()
            watcher.join(timeout=10)
    ledger = [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]
    published = {e["cycle"]: e.get("gem_fm") for e in ledger if e.get("kind") == "publish"}
    out = []
    for e in (x for x in ledger if x.get("kind") == "shard"):
        version = published.get(e["cycle"])
        if version is None or version not in served_at:
            continue
        out.append({
            "shard": e["shard"], "version": version,
            "arrival_to_served_s": served_at[version] - arrivals[e["shard"]],
            "next_arrival_to_served_s": served_at[version] - arrivals[e["eval_shard"]],
        })  # fmt: skip
    return {"every_s": every_s, "rows_per_shard": rows, "refreshes": out}


# -- 5. knowledge stamping ------------------------------------------------------------------


def cycle_seconds(ledger_path: Path) -> list[float]:
    """Each FM cycle's wall time after the first, from one publish line to the next (a cycle
    plans, trains, gates, commits and publishes; the first one also includes the start)."""
    lines = [json.loads(x) for x in ledger_path.read_text().splitlines()]
    fm_cycles = {e["cycle"] for e in lines if e.get("kind") == "shard"}
    ts = [e["ts"] for e in lines if e.get("kind") == "publish" and e.get("cycle") in fm_cycles]
    return [float(x) for x in np.diff(ts)]


def knowledge_cost(stream: Path, warm: Path, work: Path, preset_name: str, batch_size: int, runs: int) -> dict:
    """The same trainer run (served: the warm start) without, with, with and without
    --knowledge-out, the first `runs` of those (4, ABBA: the shared machine's drift falls
    on both arms alike)."""
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    for i, arm in enumerate(("without", "with", "with", "without")[:runs]):
        repo, state, out = work / f"k-repo-{i}", work / f"k-state-{i}", work / f"k-knowledge-{i}"
        publish(load_checkpoint(warm), ModelRepository(repo), PublishPolicy())
        cfg = TrainerConfig(
            stream=stream, repository=repo, state_dir=state, checkpoint=warm, preset=preset_name,
            batch_size=batch_size, tolerance=0.01, exit_when_idle=True, knowledge_out=out if arm == "with" else None,
        )  # fmt: skip
        Trainer(cfg, D.Runtime()).run()
        seconds[arm] += cycle_seconds(state / "ledger.jsonl")
    without, with_ = float(np.mean(seconds["without"])), float(np.mean(seconds["with"]))
    return {
        "cycle_s": seconds, "mean_without_s": without, "mean_with_s": with_,
        "added_pct": 100.0 * (with_ - without) / without,
    }  # fmt: skip


# -- main -------------------------------------------------------------------------------------


def plot(rows: list[dict], tasks: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    cycles = [r["cycle"] for r in rows]
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        ax.plot(cycles, [r[f"frozen_ne_{task}"] for r in rows], "o--", label="frozen FM")
        ax.plot(cycles, [r[f"refreshed_ne_{task}"] for r in rows], "o-", label="refreshed FM (side trainer)")
        ax.set_title(f"{task}: NE on the next shard (lower is better)")
        ax.set_xlabel("cycle")
        ax.set_ylabel("NE")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--rows", type=int, default=10_000, help="rows per shard")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--drift", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--every-s", type=float, default=45.0, help="stream interval of the latency run")
    parser.add_argument("--latency-shards", type=int, default=3)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--knowledge-only", action="store_true", help="only 5.: a cycle without/with --knowledge-out")
    parser.add_argument("--knowledge-runs", type=int, default=4, choices=(2, 4), help="5.: AB or ABBA")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    schema = load_schema()
    tasks = schema.task_names
    # The warm start's train, validation and test slices (`gem train` holds out the last two).
    warm_shards = 3
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp_name:
        tmp = Path(tmp_name)
        everything = tmp / "all"
        console.print(f"writing {warm_shards + args.cycles + 1} shards of {args.rows:,} rows (drift {args.drift})")
        cfg = StreamConfig(out=everything, shards=warm_shards + args.cycles + 1, rows_per_shard=args.rows,
                           every_s=0.0, drift=args.drift, seed=args.seed)  # fmt: skip
        paths = play_stream(cfg, schema)
        warm_dir, stream = tmp / "warm", tmp / "stream"
        warm_dir.mkdir()
        stream.mkdir()
        for p in paths[:warm_shards]:
            shutil.copy(p, warm_dir / p.name)
        for p in paths[warm_shards:]:
            shutil.copy(p, stream / p.name)
        # The warm start: trained on the first shard, validated on the second, tested on the third.
        console.print("training the warm start (the frozen FM)")
        warm = train(TrainConfig(data=warm_dir, out=tmp / "warm-ckpt", preset=args.preset, epochs=2,
                                 batch_size=args.batch_size)).checkpoint  # fmt: skip

        console.print(f"a cycle without and with --knowledge-out ({args.knowledge_runs} runs of {args.cycles} cycles)")
        knowledge = knowledge_cost(stream, warm, tmp, args.preset, args.batch_size, args.knowledge_runs)
        if args.knowledge_only:
            RESULTS.mkdir(exist_ok=True)
            config = {**vars(args), "cpu_count": os.cpu_count(), "torch": torch.__version__}
            (RESULTS / "trainer_knowledge.json").write_text(
                json.dumps({"config": config, "knowledge": knowledge}, indent=2)
            )
            report_knowledge(knowledge)
            return

        console.print("throughput: 1 and 2 processes")
        speed = [throughput(paths[warm_shards : warm_shards + 2], args.preset, args.batch_size, n, tmp) for n in (1, 2)]

        console.print(f"refreshed vs frozen over {args.cycles} cycles")
        drift_rows = refresh_vs_frozen(stream, warm, tmp / "repo", tmp / "state", args.preset, args.batch_size)

        console.print("adapted vs raw labels of the stale FM")
        adapter_rows = adapted_vs_raw(paths[warm_shards - 1 :], warm, epochs=3)

        latency = None
        if not args.skip_latency:
            console.print(f"refresh latency: a shard every {args.every_s:.0f}s next to the local Triton")
            latency = refresh_latency(
                tmp, warm, args.preset, args.rows, args.latency_shards, args.every_s, args.drift, args.seed + 100
            )

    result = {
        "config": {**vars(args), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "throughput": speed,
        "refresh_vs_frozen": drift_rows,
        "adapted_vs_raw": adapter_rows,
        "latency": latency,
        "knowledge": knowledge,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trainer.json").write_text(json.dumps(result, indent=2))
    plot(drift_rows, tasks, RESULTS / "trainer.png")
    report(result, tasks)
    console.print(f"wrote {RESULTS / 'trainer.json'} and {RESULTS / 'trainer.png'}")


def report_knowledge(k: dict) -> None:
    t = Table(title="a cycle's seconds without and with --knowledge-out")
    for col in ("arm", "cycles", "mean s", "each s"):
        t.add_column(col, justify="right")
    for arm in ("without", "with"):
        each = k["cycle_s"][arm]
        t.add_row(arm, str(len(each)), f"{np.mean(each):.2f}", " ".join(f"{x:.2f}" for x in each))
    Console().print(t)
    Console().print(f"added by --knowledge-out: {k['added_pct']:+.1f} % of a cycle")


def report(result: dict, tasks: Sequence[str]) -> None:
    out = Console()
    t = Table(title="trainer throughput (gloo DDP on CPU)")
    for col in ("processes", "examples", "seconds", "examples/s"):
        t.add_column(col, justify="right")
    for s in result["throughput"]:
        t.add_row(str(s["procs"]), f"{s['examples']:,}", f"{s['seconds']:.1f}", f"{s['examples_per_s']:,.0f}")
    out.print(t)
    t = Table(title="NE on the next (fresh) shard: refreshed vs frozen FM")
    t.add_column("cycle", justify="right")
    t.add_column("gate")
    for task in tasks:
        t.add_column(f"{task} refreshed", justify="right")
        t.add_column(f"{task} frozen", justify="right")
    for r in result["refresh_vs_frozen"]:
        cells = [str(r["cycle"]), r["state"]]
        for task in tasks:
            cells += [f"{r[f'refreshed_ne_{task}']:.4f}", f"{r[f'frozen_ne_{task}']:.4f}"]
        t.add_row(*cells)
    rows = result["refresh_vs_frozen"]
    cells = ["mean", ""]
    for task in tasks:
        cells += [f"{np.mean([r[f'refreshed_ne_{task}'] for r in rows]):.4f}",
                  f"{np.mean([r[f'frozen_ne_{task}'] for r in rows]):.4f}"]  # fmt: skip
    t.add_row(*cells)
    out.print(t)
    t = Table(title="log loss on the next shard, FM held stale: adapted vs raw labels")
    t.add_column("eval shard")
    for task in tasks:
        t.add_column(f"{task} adapted", justify="right")
        t.add_column(f"{task} raw", justify="right")
    for r in result["adapted_vs_raw"]:
        cells = [r["eval_shard"]]
        for task in tasks:
            cells += [f"{r[f'adapted_log_loss_{task}']:.4f}", f"{r[f'raw_log_loss_{task}']:.4f}"]
        t.add_row(*cells)
    out.print(t)
    if result["latency"]:
        t = Table(title=f"refresh latency (a shard every {result['latency']['every_s']:.0f}s)")
        for col in ("shard", "FM version", "arrival -> served s", "next shard's arrival -> served s"):
            t.add_column(col, justify="right")
        for r in result["latency"]["refreshes"]:
            t.add_row(r["shard"], str(r["version"]), f"{r['arrival_to_served_s']:.1f}",
                      f"{r['next_arrival_to_served_s']:.1f}")  # fmt: skip
        out.print(t)
    report_knowledge(result["knowledge"])


if __name__ == "__main__":
    main()
