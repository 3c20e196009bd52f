"""Big ranker calls in process: what ONNX Runtime offers for one call of many candidates
(issue 23, item 4), side by side in one run, with the FLOP rate each reaches.

    .venv/bin/python -m bench.big_calls [--preset small] [--candidates 256,512] [--seq-len 128]

One user (a full `--seq-len` history) and each of `--candidates` candidates, the
shared-user GEM's user-indexed call (U = 1), serial calls, in-process ONNX Runtime:

- served settings: intra-op threads = all cores, idle threads do not spin (as the
  embedded backend and the python-backend model run it);
- the same with spinning on (faster alone, but a spinning pool takes the cores the
  front end's event loop and other processes need);
- one intra-op thread (the single-core reference);
- the candidates in two blocks run side by side (two threads, one intra-op thread each;
  each block computes the user side again: `model.user_index.candidate_rows`);
- the graph after ONNX Runtime's transformer optimizer (`onnxruntime.transformers`:
  LayerNorm and Gelu fusions; the graph TensorRT gets is left as exported), served settings.

Achieved GFLOP/s = the call's FLOPs (torch.utils.flop_counter on the same model: the
user side once plus each candidate) / p50; the machine's reference peak is a 1024^3
float32 matmul in torch on the same cores. Random weights. Prints a table and writes
bench/results/big_calls.json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from onnxruntime.transformers.optimizer import optimize_model
from rich.console import Console
from rich.table import Table

from bench.common import Budget, summarize, time_sync, write_json
from bench.shared_user import _call, _flops, _session
from export.onnx_export import export_fm
from model.config import PRESETS, preset
from model.features import user_input_names
from model.gem import GEM
from model.outputs import FM_OUTPUTS
from model.schema import load_schema
from model.user_index import candidate_rows

VARIANTS = ("served", "spinning", "one thread", "two blocks in parallel", "transformer-optimized")


def _in_parallel(pool: ThreadPoolExecutor, run: Callable[[dict], object], blocks: list[dict]) -> list[object]:
    """`run` over candidate blocks on the pool's threads at once."""
    return list(pool.map(run, blocks))


def _peak_gflops(threads: int) -> float:
    """float32 matmul GFLOP/s of torch on `threads` cores: the reference peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    seconds = time_sync(lambda: a @ b, Budget(min_calls=20, max_calls=200, seconds=1.0))
    return 2 * 1024**3 / float(np.percentile(seconds, 50)) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--candidates", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell")
    parser.add_argument("--rounds", type=int, default=2, help="passes over all cells (the best p50 is kept)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    schema = load_schema()
    users = user_input_names(schema)
    torch.manual_seed(0)
    model = GEM(schema, preset(args.preset)).eval()
    cores = torch.get_num_threads()
    outputs = list(FM_OUTPUTS)
    budget = Budget(min_calls=10, max_calls=300, seconds=args.seconds)
    cells: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="gem-bench-") as tmp, ThreadPoolExecutor(2) as pool:
        path, fused = Path(tmp) / "fm.onnx", Path(tmp) / "fm-fused.onnx"
        with console.status(f"exporting {args.preset}, running the transformer optimizer"):
            export_fm(model, schema, path)
            # num_heads/hidden_size 0: read from the graph; only the fusions that match apply.
            optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(str(fused))
        served, spinning, single = _session(path, 0, False), _session(path, 0, True), _session(path, 1, False)
        optimized = _session(fused, 0, False)
        for round_ in range(args.rounds):
            for n in args.candidates:
                call = _call(schema, 1, n, args.seq_len, seed=1)
                halves = [candidate_rows(call, users, 0, n // 2), candidate_rows(call, users, n // 2, n)]
                runs: dict[str, Callable[[], object]] = {
                    "served": partial(served.run, outputs, call),
                    "spinning": partial(spinning.run, outputs, call),
                    "one thread": partial(single.run, outputs, call),
                    "two blocks in parallel": partial(_in_parallel, pool, partial(single.run, outputs), halves),
                    "transformer-optimized": partial(optimized.run, outputs, call),
                }
                for name in VARIANTS:
                    with console.status(f"round {round_ + 1}/{args.rounds}: {n} candidates, {name}"):
                        timed = time_sync(runs[name], budget)
                    best = cells.get((name, n))
                    if best is None or np.median(timed) < np.median(best):
                        cells[(name, n)] = timed
        want = _call(schema, 1, 8, args.seq_len, seed=2)
        same = np.allclose(served.run(outputs, want)[0], optimized.run(outputs, want)[0], atol=1e-4)
    peak = {1: _peak_gflops(1), cores: _peak_gflops(cores)}
    flops = {n: _flops(model, _call(schema, 1, n, args.seq_len, seed=1)) for n in args.candidates}

    timings = [summarize(name, n, cells[(name, n)]) for n in args.candidates for name in VARIANTS]
    rows = []
    t = Table(title=f"GEM {args.preset}, one user x N candidates, {args.seq_len}-event history, ONNX Runtime")
    for col in ("variant", "candidates", "p50 ms", "p99 ms", "examples/s", "GFLOP/s", "% of peak", "÷ served"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for x in timings:
        threads = 1 if x.name == "one thread" else cores
        gflops = flops[x.batch] / (x.p50_ms / 1e3) / 1e9
        base = next(y for y in timings if y.batch == x.batch and y.name == "served")
        speedup = base.p50_ms / x.p50_ms
        rows.append({"variant": x.name, "candidates": x.batch, "gflops": gflops, "peak_gflops": peak[threads],
                     "speedup_over_served": speedup})  # fmt: skip
        t.add_row(x.name, str(x.batch), f"{x.p50_ms:.1f}", f"{x.p99_ms:.1f}", f"{x.examples_per_s:,.0f}",
                  f"{gflops:.1f}", f"{100 * gflops / peak[threads]:.0f} %", f"{speedup:.2f}x")  # fmt: skip
    out = Console()
    out.print(t)
    out.print(
        f"peak (torch 1024^3 float32 matmul): {peak[1]:.0f} GFLOP/s on 1 core, {peak[cores]:.0f} on {cores}; "
        f"call FLOPs: " + ", ".join(f"{n}: {f / 1e6:,.0f} MFLOP" for n, f in flops.items())
        + f"; transformer-optimized graph equals the exported one: {same}"
    )  # fmt: skip
    extra = {"peak_gflops": peak, "flops": flops, "rows": rows, "optimized_equal": bool(same), "cores": cores,
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    write_json("big_calls", {**vars(args), **extra}, timings)


if __name__ == "__main__":
    main()
