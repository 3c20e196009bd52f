"""FM inference, side by side: PyTorch eager, in-process ONNX Runtime, and Triton (the
local server, python-backend ONNX Runtime; the FM alone and the full ensemble with the
Student Adapter), serial calls at several batch sizes.

    .venv/bin/python -m bench.inference [--preset small] [--batches 1,64,512] [--seq-len 128]

Prints a table and writes bench/results/inference.json. The model is a randomly
initialized preset (speed does not depend on the weights), exported and served from a
temporary model repository; nothing else is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from functools import partial
from pathlib import Path

import onnxruntime as ort
import torch
from rich.console import Console

from bench.common import Timing, summarize, table, time_async, time_sync, write_json
from export.contract import ENSEMBLE_MODEL, FM_MODEL, KNOWLEDGE_OUTPUTS
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from model.adapter import StudentAdapter
from model.checkpoint import ModelBundle, load_checkpoint, save_checkpoint
from model.config import PRESETS, preset
from model.examples import random_batch
from model.gem import GEM
from model.outputs import FM_OUTPUTS
from model.schema import load_schema
from serving.backends.triton_client import TritonClient
from serving.local.ports import free_ports
from serving.local.triton import TritonConfig, TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--batches", default="1,64,512", help="comma-separated batch sizes")
    parser.add_argument("--seq-len", type=int, default=128, help="behavior sequence length of every row")
    parser.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: all cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    schema = load_schema()
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = GEM(schema, cfg).eval()
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
    console = Console(stderr=True)
    timings: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="gem-bench-") as tmp:
        ckpt = load_checkpoint(save_checkpoint(Path(tmp) / "ckpt", ModelBundle(schema, cfg, model, adapter), {}))
        with console.status(f"exporting {args.preset}"):
            report = publish(ckpt, ModelRepository(Path(tmp) / "repo"), PublishPolicy())
        assert report.fm is not None  # PublishPolicy() publishes the FM
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(report.fm.path / "model.onnx"), options)
        inputs = {b: random_batch(schema, b, args.seq_len, seed=b) for b in batches}
        for b in batches:
            feeds = inputs[b]
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            with console.status(f"batch {b}: torch, onnxruntime"), torch.inference_mode():
                timings.append(summarize("torch eager", b, time_sync(partial(model, tensors))))
                timings.append(summarize("onnxruntime", b, time_sync(partial(session.run, list(FM_OUTPUTS), feeds))))
        http, grpc, metrics = free_ports(3)
        server_cfg = TritonConfig(Path(tmp) / "repo", Path(tmp) / "triton", http, grpc, metrics)
        with console.status("starting Triton"):
            server = TritonServer(server_cfg).start()
        try:
            timings += asyncio.run(_triton(server.cfg.grpc_url, inputs, console))
        finally:
            server.stop()
    timings.sort(key=lambda t: (t.batch, t.name))
    Console().print(table(f"GEM {args.preset} inference, seq len {args.seq_len}, serial calls", timings))
    write_json("inference", vars(args), timings)


async def _triton(url: str, inputs: dict, console: Console) -> list[Timing]:
    out = []
    async with TritonClient(url, timeout_s=60) as client:
        for b, feeds in inputs.items():
            with console.status(f"batch {b}: triton"):
                fm = await time_async(partial(client.infer, feeds, outputs=FM_OUTPUTS, model=FM_MODEL))
                out.append(summarize("triton gem_fm", b, fm))
                ens = await time_async(partial(client.infer, feeds, outputs=KNOWLEDGE_OUTPUTS, model=ENSEMBLE_MODEL))
                out.append(summarize("triton gem_knowledge (ensemble)", b, ens))
    return out


if __name__ == "__main__":
    main()
