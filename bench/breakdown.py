"""Where a ranker's call spends its time, stage by stage: one user and N candidates in
the shared form, serial calls, through each application (`embedded`: ONNX Runtime in
the replica; `triton`: Triton behind it) and path (`direct`: the replica's own gRPC
server; `proxy`: Serve's gRPC proxy first), beside the same call in process.

Every call asks for the server's stages (`server_timing=True`, client/gem/knowledge/timing.py):

  decode    the handler's start to the call assembled (token, admission, parse, checks)
  model     the data plane: the batch queue and the backend (Triton's hop included)
  encode    the reply's checks and tensors
  outside   the client's latency less those three, call by call: the network, gRPC's
            (de)serialization on both ends, Ray Serve's own steps, the proxy's hop

and, for the Triton application, Triton's own time per call (the ensemble's mean
request time from Triton's statistics over the cell). Stages are per-call medians;
they need not sum to the client's median.

A second table says whose CPU each cell's calls took, in ms per call (from every
thread's /proc stat before and after the cell): this bench's process (the client, or
the model itself in the in-process cell), the application's replica (its event loops,
and the embedded backend's inference threads, niced below them), Triton (its server and
python-backend stubs), and everything else on the machine (Ray's own processes, and
whatever else shares the cores). On a machine whose cores the model fills, what the
front end adds to the model's CPU is what it adds to the latency. Prints both tables, writes
bench/results/breakdown.json (breakdown-user-embedding-once.json with
--user-embedding-once: the reply's user embedding once per user, as the in-process call
returns it, instead of once per candidate).

    .venv/bin/python -m bench.breakdown [--preset small] [--candidates 1,256] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from gem.knowledge import AsyncKnowledgeClient
from rich.console import Console
from rich.table import Table

from bench.common import Timing, int_list, summarize, write_json
from bench.frontend import APPS, IN_PROCESS_OUTPUTS, PATHS, closed_loop, export_preset, ranker_call, served
from loadtests.sampling import display_name, thread_cpu
from model.config import PRESETS, preset
from model.schema import load_schema
from serving.backends.onnx import OnnxBackend
from serving.backends.triton_client import TritonClient
from serving.local.triton import TritonConfig

STAGES = ("decode", "model", "encode")
# Whose CPU a cell took (CpuMeter.per_call).
CPU_GROUPS = ("bench process", "replica loops", "replica inference", "triton", "other")


class CpuMeter:
    """The CPU that the calls of a cell took from the machine, by who took it: every
    thread's CPU time before and after (threads that start and end inside the cell are
    missed)."""

    def __enter__(self) -> CpuMeter:
        self.before = thread_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.after = thread_cpu()

    def per_call(self, calls: int, app: str | None) -> dict[str, float]:
        """CPU ms per call by CPU_GROUPS; `app`: the application whose replica served
        the calls (None: in process, and every replica is `other`)."""
        names = {pid: display_name(pid) for pid, _ in self.after}
        replica = f"ray::ServeReplica:{app}:"
        out = dict.fromkeys(CPU_GROUPS, 0.0)
        for (pid, tid), (nice, seconds) in self.after.items():
            used = seconds - self.before.get((pid, tid), (nice, 0.0))[1]
            name = names[pid]
            if pid == os.getpid():
                group = "bench process"
            elif app is not None and name.startswith(replica):
                # The embedded backend's threads run niced below the replica's loops
                # (serving/backends/priority.py; with inference_nice 0 they count as
                # loops); the main thread keeps the loops' value.
                loop_nice = self.after.get((pid, pid), (nice, 0.0))[0]
                group = "replica inference" if nice > loop_nice else "replica loops"
            elif name.startswith("triton"):
                group = "triton"
            else:
                group = "other"
            out[group] += used
        return {k: 1000 * v / max(calls, 1) for k, v in out.items()}


async def timed_calls(generate: Callable[..., Awaitable[Any]], seconds: float) -> dict[str, list[float]]:
    """Serial calls for `seconds`: per call, the client's ms and each stage's."""
    out: dict[str, list[float]] = {"client": [], **{s: [] for s in STAGES}}
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        reply = await generate(server_timing=True)
        out["client"].append((time.perf_counter() - start) * 1000)
        for stage in STAGES:
            out[stage].append(reply.server_timing.get(stage, float("nan")))
    return out


def row(system: str, candidates: int, ms: dict[str, list[float]], in_process_ms: float, triton_ms: float | None):
    client = np.array(ms["client"])
    outside = client - sum(np.array(ms[s]) for s in STAGES)
    p50 = {k: float(np.nanmedian(v)) for k, v in {**ms, "outside": outside}.items()}
    return {"system": system, "candidates": candidates, "calls": len(client),
            **{f"{k}_p50_ms": v for k, v in p50.items()}, "client_p99_ms": float(np.percentile(client, 99)),
            "triton_mean_ms": triton_ms, "in_process_p50_ms": in_process_ms,
            "x_in_process": p50["client"] / in_process_ms}  # fmt: skip


async def measure(args, schema, repo: Path, triton_cfg: TritonConfig, addresses: dict):
    rows: list[dict] = []
    cpu_rows: list[dict] = []
    timings: list[Timing] = []
    backend = OnnxBackend(repo)
    async with TritonClient(triton_cfg.grpc_url, admin_key=triton_cfg.admin_key) as triton:
        for n in args.candidates:
            ads, shared, indexed = ranker_call(schema, n, args.seq_len)
            in_process_call = functools.partial(backend.infer, indexed, IN_PROCESS_OUTPUTS)
            with CpuMeter() as cpu:
                latencies, _ = await closed_loop(in_process_call, 1, args.seconds)
            in_process = summarize("onnxruntime in-process", n, latencies)
            timings.append(in_process)
            cpu_rows.append({"system": "in process", "candidates": n, **cpu.per_call(len(latencies), None)})
            for app in APPS:
                for path in PATHS:
                    # Triton's own time per call, from its statistics over the cell.
                    before = await triton.served_requests() if app == "triton" else None
                    async with AsyncKnowledgeClient(addresses[app, path], timeout_s=60, application=app) as client:
                        generate = functools.partial(
                            client.generate, ads, shared=shared, user_embedding_once=args.user_embedding_once
                        )
                        for _ in range(3):  # warm-up
                            await generate()
                        with CpuMeter() as cpu:
                            ms = await timed_calls(generate, args.seconds)
                    triton_ms = None
                    if before is not None:
                        after = await triton.served_requests()
                        calls = after[0] - before[0]
                        triton_ms = (after[1] - before[1]) / calls / 1e6 if calls else None
                    system = f"{app} ({path})"
                    rows.append(row(system, n, ms, in_process.p50_ms, triton_ms))
                    cpu_rows.append({"system": system, "candidates": n, **cpu.per_call(len(ms["client"]), app)})
                    timings.append(summarize(system, n, [x / 1000 for x in ms["client"]]))
    return rows, cpu_rows, timings


def report(args, rows: list[dict]) -> None:
    form = "user embedding once" if args.user_embedding_once else "user embedding per candidate"
    table = Table(title=f"GEM {args.preset}: where a call of one user's candidates spends its time "
                        f"(p50 ms, c = 1, {form})")  # fmt: skip
    columns = ("system", "candidates", "calls", "client", "decode", "model", "encode", "outside", "triton (mean)",
               "in-process", "÷ in-process")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        triton = f"{r['triton_mean_ms']:.2f}" if r["triton_mean_ms"] is not None else ""
        stages = [f"{r[f'{k}_p50_ms']:.2f}" for k in ("client", *STAGES, "outside")]
        table.add_row(r["system"], str(r["candidates"]), str(r["calls"]), *stages, triton,
                      f"{r['in_process_p50_ms']:.2f}", f"{r['x_in_process']:.2f}x")  # fmt: skip
    Console(width=max(Console().width, 150)).print(table)


def report_cpu(rows: list[dict]) -> None:
    table = Table(title="whose CPU the calls took (ms per call)")
    for col in ("system", "candidates", *CPU_GROUPS, "all"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        table.add_row(r["system"], str(r["candidates"]), *(f"{r[g]:.2f}" for g in CPU_GROUPS),
                      f"{sum(r[g] for g in CPU_GROUPS):.2f}")  # fmt: skip
    Console(width=max(Console().width, 150)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--candidates", type=int_list, default=[1, 256], help="candidates per call, comma-separated")
    parser.add_argument("--seq-len", type=int, default=128, help="the user's history length")
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell")
    parser.add_argument("--user-embedding-once", action="store_true",
                        help="ask for the user's embedding once per user (the in-process call's form) "
                             "instead of once per candidate (the API's default)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    schema = load_schema()
    with tempfile.TemporaryDirectory(prefix="gem-bench-") as tmp:
        with console.status(f"exporting {args.preset}"):
            repo = export_preset(schema, preset(args.preset), Path(tmp))
        with served(repo, Path(tmp) / "triton") as (addresses, triton), console.status("measuring"):
            rows, cpu_rows, timings = asyncio.run(measure(args, schema, repo, triton.cfg, addresses))
    report(args, rows)
    report_cpu(cpu_rows)
    name = "breakdown-user-embedding-once" if args.user_embedding_once else "breakdown"
    write_json(name, {**vars(args), "stages": rows, "cpu_ms_per_call": cpu_rows}, timings)


if __name__ == "__main__":
    main()
