"""`gem embed` against the bare in-process ONNX Runtime loop on the same rows, and how
rows/s moves with the actor pool size and batch size.

    .venv/bin/python -m bench.embed [--rows 200000] [--preset small]

Prints a table (with the ratio to the bare loop) and writes bench/results/embed-<rows>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.table import Table

from bench.common import RESULTS
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from jobs.embed import MODEL_OUTPUTS, EmbedConfig, run_embed
from model.adapter import StudentAdapter
from model.checkpoint import ModelBundle, load_checkpoint, save_checkpoint
from model.config import PRESETS, preset
from model.data.reader import resolve_paths, table_to_batch
from model.data.synth import SynthConfig, write_shards
from model.gem import GEM
from model.schema import load_schema
from serving.backends.onnx import OnnxBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--actors", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console, schema, cfg = Console(stderr=True), load_schema(), preset(args.preset)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gem-bench-embed-") as tmp_name:
        tmp = Path(tmp_name)
        with console.status("synthesizing and exporting"):
            write_shards(SynthConfig(rows=args.rows, shards=args.files, seed=1), schema, tmp / "data")
            model, adapter = GEM(schema, cfg).eval(), StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
            ckpt = load_checkpoint(save_checkpoint(tmp / "ckpt", ModelBundle(schema, cfg, model, adapter), {}))
            publish(ckpt, ModelRepository(tmp / "repo"), PublishPolicy())
        with console.status("bare ONNX Runtime loop"):
            backend, start = OnnxBackend(tmp / "repo"), time.perf_counter()
            for path in resolve_paths(tmp / "data"):
                table = pq.read_table(path)
                for offset in range(0, table.num_rows, 2048):
                    backend.run(table_to_batch(table.slice(offset, 2048), schema, labels=False), MODEL_OUTPUTS)
            bare = args.rows / (time.perf_counter() - start)
        rows.append({"system": "bare onnxruntime loop", "actors": 1, "batch_size": 2048, "rows_per_s": bare})
        # Ray itself starts once, outside the timings (a job pays it once, a cluster never).
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        for actors, batch_size in itertools.product(args.actors, args.batch_sizes):
            with console.status(f"gem embed: {actors} actor(s), batch {batch_size}"):
                out = tmp / f"out-{actors}-{batch_size}"
                summary = run_embed(
                    EmbedConfig(str(tmp / "data"), out, tmp / "repo", actors=actors, batch_size=batch_size)
                )
            rate = summary.rows_out / summary.seconds
            rows.append({"system": "gem embed", "actors": actors, "batch_size": batch_size, "rows_per_s": rate})
    table = Table(title=f"{args.rows:,} rows, {args.files} files, {args.preset} preset, 2 cores")
    for col in ("system", "actors", "batch size", "rows/s", "/ bare loop"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        table.add_row(r["system"], str(r["actors"]), str(r["batch_size"]), f"{r['rows_per_s']:,.0f}",
                      f"{r['rows_per_s'] / bare:.2f}")  # fmt: skip
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"embed-{args.rows}.json").write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
