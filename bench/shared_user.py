"""One user, many candidates: the shared-user GEM against the per-example GEM (issue 13).

    .venv/bin/python -m bench.shared_user [--preset small] [--candidates 256] [--seq-len 128]

In-process ONNX Runtime, serial calls of one user (a full `--seq-len` history) and
`--candidates` candidates:

- per-example GEM (`sequence_arch=interformer`) on the call as repeated rows (the user
  row broadcast to every candidate), as served today;
- shared-user GEM (`sequence_arch=shared_user`) on the user-indexed call (U = 1);
- shared-user GEM on the same call with every row its own user (U = B): what it costs
  when nothing is shared;
- the merging question: `--merge` calls of different users as one user-indexed run
  (U = merge, as the front end's `@serve.batch` hands them over) against the same calls
  run one by one, and the cost of `share_users` (finding the users of a merged
  per-example batch) on that batch.

Then the compute split, counted with torch.utils.flop_counter.FlopCounterMode: FLOPs per
call for the user side and per candidate, from calls of 1 and 1 + `--candidates`
candidates of one user. Random weights (speed does not depend on them). Prints tables
and writes bench/results/shared_user.json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Timing, summarize, table, time_sync, write_json
from export.onnx_export import export_fm
from model.config import PRESETS, preset
from model.examples import random_user_batch
from model.features import USER_INDEX, user_input_names
from model.gem import GEM
from model.outputs import FM_OUTPUTS
from model.schema import load_schema
from model.user_index import expand_users, graph_feeds, share_users


def _call(schema, users: int, candidates: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """A user-indexed call with full histories (every event present)."""
    batch = random_user_batch(schema, users, candidates, seq_len, seed)
    for seq in schema.sequences:
        batch[seq.length_name] = np.full(users, seq_len, dtype=np.int64)
    if users == 1:
        batch[USER_INDEX] = np.zeros(candidates, dtype=np.int64)
    return batch


def _session(path: Path, threads: int, spinning: bool = True) -> ort.InferenceSession:
    """`spinning`: idle intra-op threads spin (ONNX Runtime's default) or sleep (as served)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _flops(model: GEM, batch: dict[str, np.ndarray]) -> int:
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        model(tensors)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--candidates", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--merge", type=int, default=4, help="calls (users) merged into one run")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    schema = load_schema()
    users = user_input_names(schema)
    base = preset(args.preset)
    models = {}
    for arch in ("interformer", "shared_user"):
        torch.manual_seed(0)
        models[arch] = GEM(schema, base.with_(sequence_arch=arch)).eval()

    call = _call(schema, 1, args.candidates, args.seq_len, seed=1)
    rows = expand_users(call, users)  # the same call as repeated rows
    merged = _call(schema, args.merge, args.merge * args.candidates, args.seq_len, seed=2)
    merged[USER_INDEX] = np.repeat(np.arange(args.merge), args.candidates)
    parts = [
        {
            k: (v[i : i + 1] if k in users else v[i * args.candidates : (i + 1) * args.candidates])
            for k, v in merged.items()
        }
        for i in range(args.merge)
    ]
    for p in parts:
        p[USER_INDEX] = np.zeros(args.candidates, dtype=np.int64)
    merged_rows = expand_users(merged, users)

    timings: list[Timing] = []
    outputs = list(FM_OUTPUTS)
    with tempfile.TemporaryDirectory(prefix="gem-bench-") as tmp:
        sessions = {}
        for arch, model in models.items():
            with console.status(f"exporting {args.preset} {arch}"):
                path = Path(tmp) / f"{arch}.onnx"
                export_fm(model, schema, path)
                sessions[arch] = _session(path, args.threads)
        per_example, shared = sessions["interformer"], sessions["shared_user"]
        n = args.candidates
        with console.status("timing"):
            timings.append(
                summarize("per-example, repeated rows", n, time_sync(lambda: per_example.run(outputs, rows)))
            )
            timings.append(summarize("shared-user, U = 1", n, time_sync(lambda: shared.run(outputs, call))))
            identity = share_users(rows, users, dedup=False)
            timings.append(
                summarize("shared-user, U = B (no sharing)", n, time_sync(lambda: shared.run(outputs, identity)))
            )
            m = args.merge * n
            timings.append(
                summarize(f"shared-user, {args.merge} calls merged (U = {args.merge})", m,
                          time_sync(lambda: shared.run(outputs, merged)))
            )  # fmt: skip
            timings.append(
                summarize(f"shared-user, {args.merge} calls one by one", m,
                          time_sync(lambda: [shared.run(outputs, p) for p in parts]))
            )  # fmt: skip
            inputs = shared.get_inputs()
            timings.append(
                summarize(f"share_users on {m} merged rows (no model)", m,
                          time_sync(lambda: graph_feeds(merged_rows, inputs)))
            )  # fmt: skip
        found = graph_feeds(merged_rows, shared.get_inputs())
        assert len(found[users[0]]) == args.merge, "share_users must find the merged calls' users"

    by_name = {t.name: t for t in timings}
    ratio = by_name["shared-user, U = 1"].examples_per_s / by_name["per-example, repeated rows"].examples_per_s
    merge_gain = (
        by_name[f"shared-user, {args.merge} calls merged (U = {args.merge})"].examples_per_s
        / by_name[f"shared-user, {args.merge} calls one by one"].examples_per_s
    )
    out = Console()
    out.print(
        table(
            f"GEM {args.preset}, ONNX Runtime in-process, one user x {n} candidates, {args.seq_len}-event history",
            timings,
        )
    )
    out.print(f"shared-user / per-example examples/s: {ratio:.2f}x; merged / one by one: {merge_gain:.2f}x")

    flops = []
    one = _call(schema, 1, 1, args.seq_len, seed=3)
    many = _call(schema, 1, 1 + n, args.seq_len, seed=3)
    for arch, model in models.items():
        f1 = _flops(model, one if arch == "shared_user" else expand_users(one, users))
        fn = _flops(model, many if arch == "shared_user" else expand_users(many, users))
        per_candidate = (fn - f1) / n
        user_side = f1 - per_candidate
        flops.append({
            "arch": arch, "user_side_mflops": user_side / 1e6, "per_candidate_mflops": per_candidate / 1e6,
            f"call_{n}_mflops": (user_side + n * per_candidate) / 1e6,
        })  # fmt: skip
    ft = Table(title=f"FLOPs per call (FlopCounterMode), {args.seq_len}-event history")
    for col in ("arch", "user side (MFLOP, once per call)", "per candidate (MFLOP)", f"call of {n} (MFLOP)"):
        ft.add_column(col, justify="right")
    for f in flops:
        ft.add_row(f["arch"], f"{f['user_side_mflops']:,.1f}", f"{f['per_candidate_mflops']:,.2f}",
                   f"{f[f'call_{n}_mflops']:,.0f}")  # fmt: skip
    out.print(ft)
    extra = {"ratio_shared_over_per_example": ratio, "merged_over_one_by_one": merge_gain, "flops": flops,
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    write_json("shared_user", {**vars(args), **extra}, timings)


if __name__ == "__main__":
    main()
