"""A student streaming the late shards, as a vertical model runs in production.

It launches on shard `launch` (trains one pass on it), then on every later shard is
scored first (progressive validation: rows it has never trained on) and trains on it
after, with its optimizers kept across shards. Its scores over the scored shards are its
result; the teachers are scored on the very same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.students_stream.world import ADAPTED, PLANTED, RAW
from model.batch import Batch
from model.outputs import EMBEDDING, USER_EMBEDDING
from model.schema import SURFACE_INPUT, FeatureSchema
from students.config import StudentConfig
from students.share import share_tables
from students.train import TEACHER, build_student, fit_pass, predict
from students.variants import Variant, parse_variant
from trainer.train import labels_of, make_optimizers


@dataclass(frozen=True)
class Settings:
    passes: int
    batch_size: int
    lr: float
    embedding_lr: float


@dataclass(frozen=True)
class Run:
    """A named student: its variant, where its teacher comes from, its tables' checkpoint."""

    name: str
    variant: Variant
    # RAW, ADAPTED or PLANTED (None: no teacher); shuffled: permuted across each shard's rows.
    teacher: str | None = None
    shuffled: bool = False
    share_checkpoint: Path | None = None


def make_run(name: str, weight: float, temperature: float, share_checkpoint: Path | None) -> Run:
    """A variant or control name -> its Run ("aux" is the tower, "aux-linear" the linear
    head; "-oracle": the planted probability as teacher; "-shuffled": the FM's, shuffled)."""
    base, _, control = name.partition("-")
    head = "linear" if control == "linear" else "tower"
    variant = parse_variant(base, weight=weight, temperature=temperature, aux_head=head)
    teacher = None
    if variant.distills:
        teacher = {"oracle": PLANTED}.get(control, ADAPTED if variant.adapted else RAW)
    return Run(name, variant, teacher, control == "shuffled", share_checkpoint if variant.share else None)


def _teacher_batch(batch: Batch, run: Run, rng: np.random.Generator) -> Batch:
    out = dict(batch)
    if run.teacher is not None:
        probs = batch[run.teacher]
        out[TEACHER] = probs[rng.permutation(len(probs))] if run.shuffled else probs
    return out


def stream_student(
    run: Run,
    shards: list[Batch],
    cfg: StudentConfig,
    schema: FeatureSchema,
    settings: Settings,
    seed: int,
) -> np.ndarray:
    """Trains `run` through `shards` (the launch shard first) and returns its serving
    logits on every shard after the first, each scored before it was trained on."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    widths = (shards[0][EMBEDDING].shape[1], shards[0][USER_EMBEDDING].shape[1]) if run.variant.repr else None
    model = build_student(cfg, schema, run.variant, widths)
    if run.share_checkpoint is not None:
        share_tables(model, run.share_checkpoint, run.variant.share_mode)
    optimizers = make_optimizers(model, settings.lr, settings.embedding_lr)
    scores = []
    for i, shard in enumerate(shards):
        if i:
            scores.append(predict(model, shard))
        data = _teacher_batch(shard, run, rng)
        for _ in range(settings.passes):
            fit_pass(model, optimizers, data, schema, run.variant, settings.batch_size, rng)
    return np.concatenate(scores)


def tune_hard(
    shards: list[Batch],
    cfg: StudentConfig,
    schema: FeatureSchema,
    base: Settings,
    passes: tuple[int, ...],
    batch_sizes: tuple[int, ...],
    seed: int,
    score: Callable[[np.ndarray], float],
) -> tuple[Settings, dict[str, float]]:
    """The hard student's passes per shard and batch size with the best validation score
    (`score(logits) -> float`, lower is better), on the validation world only."""
    hard = Run("hard", Variant())
    tried = {}
    for p in passes:
        for b in batch_sizes:
            settings = replace(base, passes=p, batch_size=b)
            tried[f"passes={p} batch={b}"] = (
                score(stream_student(hard, shards, cfg, schema, settings, seed)),
                settings,
            )
    best = min(tried, key=lambda k: tried[k][0])
    return tried[best][1], {k: v[0] for k, v in tried.items()}


def surfaces_labels(shards: list[Batch], schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N, T] and surfaces [N] of the scored rows (every shard after the first)."""
    rows = shards[1:]
    return np.concatenate([labels_of(b, schema) for b in rows]), np.concatenate([b[SURFACE_INPUT] for b in rows])


def scored(shards: list[Batch], column: str) -> np.ndarray:
    """A teacher column (RAW, ADAPTED, PLANTED) over the scored rows."""
    return np.concatenate([b[column] for b in shards[1:]])
