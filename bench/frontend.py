"""End to end through the gRPC front end, side by side with what it stands on:

  onnxruntime (in-process)   the FM + adapter in this process: the machine's limit
  triton direct              the ensemble over tritonclient (no front end)
  front end (P) -> triton    @serve.batch, Triton behind
  front end (P) -> embedded  @serve.batch, ONNX Runtime in the replica

where P, the path to the replica, is `direct` (Ray Serve's direct ingress: the
replica's own gRPC server) or `proxy` (Serve's gRPC proxy, then the replica). One Serve
instance in direct mode serves both: its head-node proxy routes to the same replicas
(serving/local/launcher.py), so the two paths differ only by the proxy hop.

At request sizes 1, 32 and 256 examples and rising concurrency (closed loop: each of C
workers sends its next call when the last returns). Then a ranker's call, one user and
each of `--candidates` candidate counts, through both applications and both paths in both
forms: the shared form (the user's columns once, in `shared`) and repeated rows (the
user's columns on every candidate), beside the same call in process (user-indexed).
With `--archs interformer,shared_user` the whole run is repeated per sequence arch (each
exported from the same preset and served by its own Triton and front end). A second
table gives the ratios: shared form ÷ in-process and ÷ repeated rows per application
and path, and (two archs) shared-user ÷ per-example model. Prints the tables,
writes bench/results/frontend.json and frontend.png (examples/s against p99).

    .venv/bin/python -m bench.frontend [--preset small] [--seconds 5] [--archs shared_user]
    .venv/bin/python -m bench.frontend --archs interformer,shared_user --sizes "" --concurrency 1,4
    .venv/bin/python -m bench.frontend --sizes "" --candidates 1,32,256,512 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from gem.knowledge import AsyncKnowledgeClient
from rich.console import Console
from rich.table import Table

from bench.common import RESULTS, Timing, int_list, summarize, write_json
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from model.adapter import StudentAdapter
from model.checkpoint import ModelBundle, load_checkpoint, save_checkpoint
from model.config import PRESETS, GEMConfig, preset
from model.examples import random_batch, random_call
from model.features import USER_INDEX, user_input_names
from model.gem import GEM
from model.schema import load_schema
from model.user_index import expand_users
from serving.backends.onnx import OnnxBackend
from serving.backends.triton_client import TritonClient
from serving.config import FrontendConfig
from serving.local import launcher
from serving.local.ports import free_port_run, free_ports
from serving.local.triton import TritonConfig, TritonServer

APPS = ("triton", "embedded")
PATHS = ("direct", "proxy")
# What a front-end call without `outputs` answers, asked of the in-process backend.
IN_PROCESS_OUTPUTS = ("logits", "adapted_logits", "embedding", "user_embedding")


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


def ranker_call(schema, candidates: int, seq_len: int) -> tuple[dict, dict, dict]:
    """A ranker's call: one user with a full history (the user side at its most costly)
    and `candidates` ads, as (ads, the user's shared columns, the user-indexed batch the
    same call is in process)."""
    ads, shared = random_call(schema, candidates, seq_len, seed=7)
    for seq in schema.sequences:
        shared[seq.length_name] = np.full(1, seq_len, np.int64)
    return ads, shared, {**ads, **shared, USER_INDEX: np.zeros(candidates, np.int64)}


async def run(args, schema, repo: Path, triton_url: str, addresses: dict, arch: str) -> list[Timing]:
    """`addresses`: (application, path) -> gRPC address."""
    out: list[Timing] = []
    ort_backend = OnnxBackend(repo)
    label = f"[{arch}] " if len(args.archs) > 1 else ""
    async with TritonClient(triton_url, timeout_s=60) as triton:
        clients = {
            (name, path): AsyncKnowledgeClient(address, timeout_s=60, application=name)
            for (name, path), address in addresses.items()
        }
        for rows in args.sizes:
            batch = random_batch(schema, rows, args.seq_len, seed=rows)
            in_process = functools.partial(ort_backend.infer, batch, IN_PROCESS_OUTPUTS)
            measured = await closed_loop(in_process, 1, args.seconds)
            out.append(rate(f"{label}onnxruntime in-process", rows, measured, 1))
            for c in args.concurrency:
                measured = await closed_loop(functools.partial(triton.infer, batch), c, args.seconds)
                out.append(rate(f"{label}triton direct", rows, measured, c))
                for (name, path), client in clients.items():
                    measured = await closed_loop(functools.partial(client.generate, batch), c, args.seconds)
                    out.append(rate(f"{label}front end ({path}) -> {name}", rows, measured, c))
        # One user, many candidates: the user's columns once vs repeated per candidate.
        for n in args.candidates:
            ads, shared, indexed = ranker_call(schema, n, args.seq_len)
            repeated = expand_users(indexed, user_input_names(schema))
            in_process = functools.partial(ort_backend.infer, indexed, IN_PROCESS_OUTPUTS)
            for c in args.concurrency:
                measured = await closed_loop(in_process, c, args.seconds)
                out.append(rate(f"{label}onnxruntime in-process, shared form", n, measured, c))
            for (name, path), client in clients.items():
                for form, call in (
                    ("repeated rows", functools.partial(client.generate, repeated)),
                    ("shared form", functools.partial(client.generate, ads, shared=shared)),
                ):
                    for c in args.concurrency:
                        measured = await closed_loop(call, c, args.seconds)
                        out.append(rate(f"{label}{name} ({path}), {form}", n, measured, c))
        for client in clients.values():
            await client.close()
    return out


def plot(timings: list[Timing], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, rows in zip(axes, sorted({t.batch for t in timings}), strict=False):
        systems = [f"front end ({path}) -> {app}" for path in PATHS for app in APPS]
        for system in ("triton direct", *systems):
            points = [t for t in timings if t.batch == rows and t.name.startswith(system + " c=")]
            ax.plot([t.p99_ms for t in points], [t.examples_per_s for t in points], marker="o", label=system)
        ort_points = [t for t in timings if t.batch == rows and t.name.startswith("onnxruntime")]
        for t in ort_points:
            ax.axhline(t.examples_per_s, linestyle="--", color="grey", label="onnxruntime in-process")
        ax.set(title=f"{rows} examples per call", xlabel="p99 latency (ms)", ylabel="examples/s", xscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def export_preset(schema, cfg: GEMConfig, work: Path) -> Path:
    """A randomly initialized GEM of `cfg` and its adapter (speed does not depend on the
    weights), published to a repository under `work`; returns the repository."""
    torch.manual_seed(0)
    model = GEM(schema, cfg).eval()
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
    ckpt = load_checkpoint(save_checkpoint(work / "ckpt", ModelBundle(schema, model.cfg, model, adapter), {}))
    publish(ckpt, ModelRepository(work / "repo"), PublishPolicy())
    return work / "repo"


@contextlib.contextmanager
def served(repo: Path, work: Path) -> Iterator[tuple[dict, TritonServer]]:
    """Triton on `repo` and the front end's two applications (`triton` before it, and
    `embedded` ONNX Runtime in its replica) under direct ingress; yields ({(application,
    path): gRPC address}, Triton)."""
    http, grpc_port, metrics, fe_http = free_ports(4)
    fe_grpc = free_port_run(len(APPS))
    triton = TritonServer(TritonConfig(repo, work, http, grpc_port, metrics)).start()
    try:
        launcher.start(FrontendConfig(triton_url=triton.cfg.grpc_url), fe_grpc, fe_http, name="triton", apps=len(APPS))
        from ray import serve

        from serving.servicer import KnowledgeIngress

        embedded = KnowledgeIngress.options(ray_actor_options={"num_cpus": 0})  # type: ignore[attr-defined]  # a Deployment at run time
        serve.run(embedded.bind(FrontendConfig(backend="onnxruntime", repository=repo)), name="embedded",
                  route_prefix="/embedded", blocking=False)  # fmt: skip
        proxy = launcher.proxy_address()
        addresses = {}
        for app in APPS:
            addresses[app, "direct"] = launcher.address_of(app)
            addresses[app, "proxy"] = proxy
            launcher.wait_healthy(addresses[app, "direct"], application=app)
        yield addresses, triton
    finally:
        launcher.stop()
        triton.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--archs", type=lambda s: s.split(","), default=None,
                        help="sequence archs to compare, comma-separated (default: the preset's)")  # fmt: skip
    parser.add_argument("--sizes", type=int_list, default=[1, 32, 256], help='examples per call ("" skips)')
    parser.add_argument("--concurrency", type=int_list, default=[1, 8, 32])
    parser.add_argument("--candidates", type=int_list, default=[256], help="of one user, in the shared-form cells")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    schema = load_schema()
    cfg = preset(args.preset)
    args.archs = args.archs or [cfg.sequence_arch]
    timings: list[Timing] = []
    for arch in args.archs:
        with tempfile.TemporaryDirectory(prefix="gem-bench-") as tmp_name:
            tmp = Path(tmp_name)
            with console.status(f"exporting {args.preset} ({arch})"):
                repo = export_preset(schema, cfg.with_(sequence_arch=arch), tmp)
            with served(repo, tmp / "triton") as (addresses, triton), console.status(f"measuring {arch}"):
                timings += asyncio.run(run(args, schema, repo, triton.cfg.grpc_url, addresses, arch))
    _report(args, timings)


def _label(name: str) -> tuple[str, str]:
    """'[arch] system c=4' -> ('arch', 'system c=4'); no label: ('', name)."""
    if name.startswith("["):
        arch, _, rest = name[1:].partition("] ")
        return arch, rest
    return "", name


def ratios(args, timings: list[Timing]) -> list[dict]:
    """The shared-form cells side by side: shared-user ÷ per-example model (same
    application, path, form and concurrency), shared form ÷ repeated rows (same model),
    and each path's shared form ÷ the same call in process."""
    rate = {(*_label(t.name), t.batch): t.examples_per_s for t in timings}
    out = []
    for arch in args.archs:
        tag = arch if len(args.archs) > 1 else ""
        for n in args.candidates:
            for app, path in itertools.product(APPS, PATHS):
                for c in args.concurrency:
                    cell = f"{app} ({path}), {{}} c={c}"
                    shared, rows = rate[tag, cell.format("shared form"), n], rate[tag, cell.format("repeated rows"), n]
                    in_process = rate[tag, f"onnxruntime in-process, shared form c={c}", n]
                    out += [
                        {"compare": f"{arch}: shared form / repeated rows", "app": f"{app} ({path})", "candidates": n,
                         "c": c, "ratio": shared / rows},
                        {"compare": f"{arch}: shared form / in-process", "app": f"{app} ({path})", "candidates": n,
                         "c": c, "ratio": shared / in_process},
                    ]  # fmt: skip
    if {"interformer", "shared_user"} <= set(args.archs):
        for n in args.candidates:
            for app, path in itertools.product(APPS, PATHS):
                for form in ("shared form", "repeated rows"):
                    for c in args.concurrency:
                        cell = f"{app} ({path}), {form} c={c}"
                        out.append({"compare": f"shared_user / interformer, {form}", "app": f"{app} ({path})",
                                    "candidates": n, "c": c,
                                    "ratio": rate["shared_user", cell, n] / rate["interformer", cell, n]})  # fmt: skip
    return out


def _in_process(name: str) -> str:
    """The in-process cell a row is compared with: the same call at the same
    concurrency for a ranker's call, the serial one for the size sweep."""
    if ", " in name:
        return f"onnxruntime in-process, shared form c={name.rpartition(' c=')[2]}"
    return "onnxruntime in-process c=1"


def _report(args, timings: list[Timing]) -> None:
    limit = {(*_label(t.name), t.batch): t.examples_per_s for t in timings if "onnxruntime in-process" in t.name}
    table = Table(title=f"GEM {args.preset} through the front end (seq len {args.seq_len}, {args.seconds:.0f}s each)")
    for col in ("system", "examples/call", "calls", "p50 ms", "p99 ms", "examples/s", "/ in-process"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for t in timings:
        key = (_label(t.name)[0], _in_process(_label(t.name)[1]), t.batch)
        ratio = f"{t.examples_per_s / limit[key]:.2f}" if key in limit else ""
        table.add_row(t.name, str(t.batch), str(t.calls), f"{t.p50_ms:.1f}", f"{t.p99_ms:.1f}",
                      f"{t.examples_per_s:,.0f}", ratio)  # fmt: skip
    console = Console()
    console.print(table)
    compared = ratios(args, timings)
    side = Table(title="one user x N candidates: examples/s ratios")
    for col in ("compare", "application (path)", "candidates", "concurrency", "ratio"):
        side.add_column(col, justify="left" if col == "compare" else "right")
    for r in compared:
        side.add_row(r["compare"], r["app"], str(r["candidates"]), str(r["c"]), f"{r['ratio']:.2f}x")
    console.print(side)
    write_json("frontend", {**vars(args), "ratios": compared}, timings)
    if args.sizes:
        # The size sweep of the last arch (the preset's by default), against p99.
        arch = args.archs[-1] if len(args.archs) > 1 else ""
        sweep = [replace(t, name=_label(t.name)[1]) for t in timings if _label(t.name)[0] == arch]
        RESULTS.mkdir(exist_ok=True)
        plot([t for t in sweep if "," not in t.name], RESULTS / "frontend.png")


if __name__ == "__main__":
    main()
