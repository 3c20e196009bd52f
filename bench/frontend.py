"""End to end through the gRPC front end, side by side with what it stands on:

  onnxruntime (in-process)   the FM + adapter in this process, serial: the machine's limit
  triton direct              the ensemble over tritonclient (no front end)
  front end -> triton        Ray Serve gRPC proxy, @serve.batch, Triton behind
  front end -> embedded      Ray Serve gRPC proxy, @serve.batch, ONNX Runtime in the replica

at request sizes 1, 32 and 256 examples and rising concurrency (closed loop: each of C
workers sends its next call when the last returns), plus the shared-user form against
repeated rows at 256 candidates. Prints a table with the ratio front end / in-process,
writes bench/results/frontend.json and frontend.png (examples/s against p99).

    .venv/bin/python -m bench.frontend [--preset small] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from gem.knowledge import AsyncKnowledgeClient
from rich.console import Console
from rich.table import Table

from bench.common import RESULTS, Timing, summarize, write_json
from export.publish import ExportConfig, export_checkpoint
from model.adapter import StudentAdapter
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import PRESETS, preset
from model.features import input_specs, random_batch
from model.gem import GEM
from model.schema import load_schema
from serving import launcher
from serving.backends import OnnxBackend
from serving.config import FrontendConfig
from serving.net import free_ports
from serving.triton.client import TritonClient
from serving.triton.server import TritonConfig, TritonServer

APPS = ("triton", "embedded")


async def closed_loop(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """Latencies of every call, and the wall time until the last call returned."""
    latencies: list[float] = []
    begin = time.perf_counter()
    stop = begin + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - begin


def rate(name: str, rows: int, measured: tuple[list[float], float], concurrency: int) -> Timing:
    latencies, wall_s = measured
    t = summarize(f"{name} c={concurrency}", rows, latencies)
    # Closed loop: throughput is the rows of all calls over the wall time, not 1/latency.
    return Timing(t.name, t.batch, t.calls, t.p50_ms, t.p99_ms, rows * len(latencies) / wall_s)


async def run(args, schema, repo: Path, triton_url: str, address: str) -> list[Timing]:
    user = {s.name for s in input_specs(schema) if s.side == "user"}
    out: list[Timing] = []
    ort_backend = OnnxBackend(repo)
    outputs = ("logits", "adapted_logits", "embedding", "user_embedding")
    async with TritonClient(triton_url, timeout_s=60) as triton:
        # Both applications share the proxy; the `application` metadata picks one.
        clients = {name: AsyncKnowledgeClient(address, timeout_s=60, application=name) for name in APPS}
        for rows in args.sizes:
            batch = random_batch(schema, rows, args.seq_len, seed=rows)
            measured = await closed_loop(lambda b=batch: ort_backend.infer(b, outputs), 1, args.seconds)
            out.append(rate("onnxruntime in-process", rows, measured, 1))
            for c in args.concurrency:
                measured = await closed_loop(lambda b=batch: triton.infer(b), c, args.seconds)
                out.append(rate("triton direct", rows, measured, c))
                for name, client in clients.items():
                    measured = await closed_loop(lambda b=batch, cl=client: cl.generate(b), c, args.seconds)
                    out.append(rate(f"front end -> {name}", rows, measured, c))
        # One user, 256 candidates: the user's columns once vs repeated per candidate.
        sample = random_batch(schema, 256, args.seq_len, seed=7)
        repeated = {**sample, **{k: np.repeat(sample[k][:1], 256, axis=0) for k in user}}
        ads = {k: v for k, v in sample.items() if k not in user}
        shared = {k: v[:1] for k, v in sample.items() if k in user}
        client = clients["triton"]
        for form, call in (
            ("repeated rows", lambda: client.generate(repeated)),
            ("shared user", lambda: client.generate(ads, shared=shared)),
        ):
            out.append(rate(f"front end -> triton, {form}", 256, await closed_loop(call, 4, args.seconds), 4))
        for client in clients.values():
            await client.close()
    return out


def plot(timings: list[Timing], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, rows in zip(axes, sorted({t.batch for t in timings}), strict=False):
        for system in ("triton direct", "front end -> triton", "front end -> embedded"):
            points = [t for t in timings if t.batch == rows and t.name.startswith(system + " c=")]
            ax.plot([t.p99_ms for t in points], [t.examples_per_s for t in points], marker="o", label=system)
        ort_points = [t for t in timings if t.batch == rows and t.name.startswith("onnxruntime")]
        for t in ort_points:
            ax.axhline(t.examples_per_s, linestyle="--", color="grey", label="onnxruntime in-process")
        ax.set(title=f"{rows} examples per call", xlabel="p99 latency (ms)", ylabel="examples/s", xscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 256])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    schema = load_schema()
    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="gem-bench-") as tmp:
        tmp = Path(tmp)
        model, adapter = GEM(schema, cfg).eval(), StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
        ckpt = load_checkpoint(save_checkpoint(tmp / "ckpt", schema, cfg, model, adapter, {}))
        with console.status(f"exporting {args.preset}"):
            export_checkpoint(ckpt, ExportConfig(repository=tmp / "repo"))
        http, grpc_port, metrics, fe_grpc, fe_http = free_ports(5)
        triton = TritonServer(TritonConfig(tmp / "repo", tmp / "triton", http, grpc_port, metrics)).start()
        try:
            address = launcher.start(FrontendConfig(triton_url=triton.cfg.grpc_url), fe_grpc, fe_http, name="triton")
            from ray import serve

            from serving.ingress import KnowledgeIngress

            embedded = KnowledgeIngress.options(ray_actor_options={"num_cpus": 0})
            serve.run(embedded.bind(FrontendConfig(backend="onnxruntime", repository=tmp / "repo")), name="embedded",
                      route_prefix="/embedded", blocking=False)  # fmt: skip
            for app in APPS:
                launcher.wait_healthy(address, application=app)
            with console.status("measuring"):
                timings = asyncio.run(run(args, schema, tmp / "repo", triton.cfg.grpc_url, address))
        finally:
            launcher.stop()
            triton.stop()
    _report(args, timings)


def _report(args, timings: list[Timing]) -> None:
    limit = {t.batch: t.examples_per_s for t in timings if t.name.startswith("onnxruntime")}
    table = Table(title=f"GEM {args.preset} through the front end (seq len {args.seq_len}, {args.seconds:.0f}s each)")
    for col in ("system", "examples/call", "calls", "p50 ms", "p99 ms", "examples/s", "/ in-process"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for t in timings:
        ratio = t.examples_per_s / limit[t.batch] if t.batch in limit else float("nan")
        table.add_row(t.name, str(t.batch), str(t.calls), f"{t.p50_ms:.1f}", f"{t.p99_ms:.1f}",
                      f"{t.examples_per_s:,.0f}", f"{ratio:.2f}")  # fmt: skip
    Console().print(table)
    write_json("frontend", vars(args), timings)
    RESULTS.mkdir(exist_ok=True)
    plot([t for t in timings if "," not in t.name], RESULTS / "frontend.png")


if __name__ == "__main__":
    main()
