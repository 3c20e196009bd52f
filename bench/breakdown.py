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
they need not sum to the client's median. Prints the table, writes
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
import tempfile
import time
from pathlib import Path

import numpy as np
from gem.knowledge import AsyncKnowledgeClient
from rich.console import Console
from rich.table import Table

from bench.common import Timing, int_list, summarize, write_json
from bench.frontend import APPS, IN_PROCESS_OUTPUTS, PATHS, closed_loop, export_preset, ranker_call, served
from model.config import PRESETS, preset
from model.schema import load_schema
from serving.backends.onnx import OnnxBackend
from serving.backends.triton_client import TritonClient
from serving.local.triton import TritonConfig

STAGES = ("decode", "model", "encode")


async def timed_calls(client: AsyncKnowledgeClient, ads: dict, shared: dict, seconds: float,
                      user_embedding_once: bool) -> dict[str, list[float]]:  # fmt: skip
    """Serial calls for `seconds` (after a warm-up): per call, the client's ms and each stage's."""
    generate = functools.partial(client.generate, ads, shared=shared, user_embedding_once=user_embedding_once)
    for _ in range(3):
        await generate()
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
    timings: list[Timing] = []
    backend = OnnxBackend(repo)
    async with TritonClient(triton_cfg.grpc_url, admin_key=triton_cfg.admin_key) as triton:
        for n in args.candidates:
            ads, shared, indexed = ranker_call(schema, n, args.seq_len)
            in_process_call = functools.partial(backend.infer, indexed, IN_PROCESS_OUTPUTS)
            latencies, _ = await closed_loop(in_process_call, 1, args.seconds)
            in_process = summarize("onnxruntime in-process", n, latencies)
            timings.append(in_process)
            for app in APPS:
                for path in PATHS:
                    # Triton's own time per call, from its statistics over the cell.
                    before = await triton.served_requests() if app == "triton" else None
                    async with AsyncKnowledgeClient(addresses[app, path], timeout_s=60, application=app) as client:
                        ms = await timed_calls(client, ads, shared, args.seconds, args.user_embedding_once)
                    triton_ms = None
                    if before is not None:
                        after = await triton.served_requests()
                        calls = after[0] - before[0]
                        triton_ms = (after[1] - before[1]) / calls / 1e6 if calls else None
                    system = f"{app} ({path})"
                    rows.append(row(system, n, ms, in_process.p50_ms, triton_ms))
                    timings.append(summarize(system, n, [x / 1000 for x in ms["client"]]))
    return rows, timings


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
            rows, timings = asyncio.run(measure(args, schema, repo, triton.cfg, addresses))
    report(args, rows)
    name = "breakdown-user-embedding-once" if args.user_embedding_once else "breakdown"
    write_json(name, {**vars(args), "stages": rows}, timings)


if __name__ == "__main__":
    main()
