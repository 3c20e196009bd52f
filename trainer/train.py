"""Single-process training of GEM (and, optionally, its baselines) on Parquet shards.

Shards are in time order (the synthetic generator and the logging pipeline name them
so); the last `eval_shards` are the held-out time slice. Embedding tables train with
Adagrad (sparse-friendly, per-row adaptive), everything else with AdamW.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.adapter import StudentAdapter
from model.baselines import build_models
from model.checkpoint import save_checkpoint
from model.config import preset
from model.data.reader import Batch, DataError, concat, iter_minibatches, read_batch, resolve_paths
from model.features import LOGITS, input_names
from model.schema import DEFAULT_SCHEMA_PATH, SURFACE_INPUT, FeatureSchema, load_schema
from trainer.metrics import evaluate

log = logging.getLogger(__name__)

# Called after every step with (examples in the step, loss).
StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    preset: str = "small"
    schema_path: Path = DEFAULT_SCHEMA_PATH
    epochs: int = 1
    batch_size: int = 512
    lr: float = 2e-3
    embedding_lr: float = 0.05
    eval_shards: int = 1
    seed: int = 0
    baselines: bool = False
    adapter_epochs: int = 3


def to_tensors(batch: Batch, names: tuple[str, ...], device: torch.device | None = None) -> dict[str, Tensor]:
    if device is None or device.type == "cpu":
        return {n: torch.from_numpy(batch[n]) for n in names}
    return {n: torch.from_numpy(batch[n]).to(device, non_blocking=True) for n in names}


def labels_of(batch: Batch, schema: FeatureSchema) -> np.ndarray:
    return np.stack([batch[t.label_column] for t in schema.tasks], axis=1)


def split_shards(paths: list[Path], eval_shards: int) -> tuple[list[Path], list[Path]]:
    if len(paths) <= eval_shards:
        raise DataError(
            f"need more than {eval_shards} shard(s) to hold out the last {eval_shards} as the "
            f"evaluation time slice; found {len(paths)}"
        )
    return paths[:-eval_shards], paths[-eval_shards:]


def make_optimizers(model: nn.Module, lr: float, embedding_lr: float) -> list[torch.optim.Optimizer]:
    """Embedding tables -> Adagrad, the dense part -> AdamW."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    emb = [p for p in model.parameters() if id(p) in tables]
    dense = [p for p in model.parameters() if id(p) not in tables]
    return [torch.optim.Adagrad(emb, lr=embedding_lr), torch.optim.AdamW(dense, lr=lr, weight_decay=1e-5)]


def train_steps(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batch: Batch,
    schema: FeatureSchema,
    batch_size: int,
    rng: np.random.Generator,
    on_step: StepCallback | None = None,
    device: torch.device | None = None,
) -> float:
    """One pass over `batch` in shuffled minibatches; returns the mean loss. `model` may
    be wrapped for data parallelism (DDP, FSDP2): each rank passes its own rows."""
    names = input_names(schema)
    model.train()
    losses = []
    for _, mb in iter_minibatches(batch, batch_size, schema, rng):
        labels = torch.from_numpy(labels_of(mb, schema))
        if device is not None:
            labels = labels.to(device)
        logits = model(to_tensors(mb, names, device))[LOGITS]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / len(labels)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(len(labels), losses[-1])
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def predict(model: nn.Module, batch: Batch, schema: FeatureSchema, batch_size: int = 4096) -> np.ndarray:
    names = input_names(schema)
    model.eval()
    out = np.empty((len(batch[SURFACE_INPUT]), len(schema.tasks)), dtype=np.float32)
    for rows, mb in iter_minibatches(batch, batch_size, schema):
        out[rows] = model(to_tensors(mb, names))[LOGITS].numpy()
    return out


def fit_adapter(
    adapter: StudentAdapter, fm_logits: np.ndarray, surfaces: np.ndarray, labels: np.ndarray, epochs: int, seed: int = 0
) -> float:
    """Fits the Student Adapter on (frozen) FM logits and fresh labels; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(adapter.parameters(), lr=5e-3)
    x, s, y = torch.from_numpy(fm_logits), torch.from_numpy(surfaces), torch.from_numpy(labels)
    adapter.train()
    loss = float("nan")
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(1024):
            batch_loss = nn.functional.binary_cross_entropy_with_logits(adapter(x[idx], s[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            loss = batch_loss.item()
    adapter.eval()
    return loss


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict
    examples_per_s: float


def train(
    cfg: TrainConfig, on_step: StepCallback | None = None, on_model: Callable[[str, int], None] | None = None
) -> TrainResult:
    """Trains GEM (and baselines), evaluates on the held-out slice, writes the checkpoint.

    `on_model(name, examples)` is called as each model starts, with the examples it
    will train on; `on_step(examples, loss)` after every step.
    """
    schema = load_schema(cfg.schema_path)
    model_cfg = preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    train_paths, eval_paths = split_shards(resolve_paths(cfg.data), cfg.eval_shards)
    log.info("training on %d shard(s), evaluating on %s", len(train_paths), ", ".join(p.name for p in eval_paths))
    train_data = [read_batch(p, schema, max_seq_len=model_cfg.seq_len) for p in train_paths]
    eval_data = concat([read_batch(p, schema, max_seq_len=model_cfg.seq_len) for p in eval_paths])
    eval_labels = labels_of(eval_data, schema)

    models = build_models(schema, model_cfg, cfg.baselines)
    metrics: dict = {
        "preset": cfg.preset,
        "gem_arch": model_cfg.sequence_arch,
        "train_shards": [p.name for p in train_paths],
        "eval_shards": [p.name for p in eval_paths],
    }
    throughput = 0.0
    total = cfg.epochs * sum(len(b[SURFACE_INPUT]) for b in train_data)
    for name, model in models.items():
        if on_model:
            on_model(name, total)
        rng = np.random.default_rng(cfg.seed)
        optimizers = make_optimizers(model, cfg.lr, cfg.embedding_lr)
        start, examples = time.perf_counter(), 0
        for epoch in range(cfg.epochs):
            for shard in train_data:
                loss = train_steps(model, optimizers, shard, schema, cfg.batch_size, rng, on_step)
                examples += len(shard[SURFACE_INPUT])
            log.info("%s epoch %d: train loss %.4f", name, epoch + 1, loss)
        elapsed = time.perf_counter() - start
        result = evaluate(schema, predict(model, eval_data, schema), eval_labels, eval_data[SURFACE_INPUT])
        result["train_examples_per_s"] = examples / elapsed
        metrics[name] = result
        if name == "gem":
            throughput = examples / elapsed

    gem = models["gem"]
    # The adapter learns from the freshest training shard, as the side trainer will.
    fresh = train_data[-1]
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces))
    fit_adapter(
        adapter,
        predict(gem, fresh, schema),
        fresh[SURFACE_INPUT],
        labels_of(fresh, schema),
        cfg.adapter_epochs,
        cfg.seed,
    )
    with torch.no_grad():
        adapted = adapter(
            torch.from_numpy(predict(gem, eval_data, schema)), torch.from_numpy(eval_data[SURFACE_INPUT])
        ).numpy()
    metrics["gem_adapted"] = evaluate(schema, adapted, eval_labels, eval_data[SURFACE_INPUT])

    path = save_checkpoint(cfg.out, schema, model_cfg, gem, adapter, metrics)
    return TrainResult(path, metrics, throughput)
