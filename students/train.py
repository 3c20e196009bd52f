"""Training a student on logged Parquet (plus GEM's knowledge), tested on the newest
shard(s): the time-ordered slice, as the FM is (trainer/train.py).

Rows are read with the FM's Parquet reader through the student's sub-schema (only its
columns, sequences cut to its newest events), filtered to its surfaces, joined to the
knowledge one to one when the variant needs it, then trained in shuffled minibatches:
tables with Adagrad, the rest with AdamW, as the FM. The checkpoint is a folder written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.batch import Batch, concat, minibatch_rows, take
from model.data.reader import DataError, resolve_paths, surface_index, table_to_batch
from model.outputs import EMBEDDING, USER_EMBEDDING
from model.schema import DEFAULT_SCHEMA_PATH, SURFACE_INPUT, FeatureSchema, load_schema, schema_from_yaml
from students.config import REFERENCE_CONFIG, StudentConfig, load_student_config
from students.knowledge import (
    KEY,
    join_knowledge,
    knowledge_columns,
    knowledge_fm_version,
    matrix,
    read_knowledge,
    teacher_probs,
)
from students.losses import student_loss
from students.model import SERVING, Student
from students.share import share_tables, shared_fm_version
from students.variants import Variant
from trainer.evaluation import evaluate
from trainer.train import labels_of, make_optimizers, split_shards

log = logging.getLogger(__name__)

TEACHER = "teacher"
StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class StudentTrainConfig:
    data: Path
    out: Path
    knowledge: Path | None = None
    variant: Variant = field(default_factory=Variant)
    config_path: Path = REFERENCE_CONFIG
    schema_path: Path = DEFAULT_SCHEMA_PATH
    # The FM checkpoint whose tables `share` takes, and the model repository it was
    # published to (to record the FM version; None: the digest only).
    share_checkpoint: Path | None = None
    repository: Path | None = None
    epochs: int = 2
    batch_size: int = 512
    lr: float = 2e-3
    embedding_lr: float = 0.05
    eval_shards: int = 1
    seed: int = 0


@dataclass
class StudentResult:
    checkpoint: Path
    metrics: dict
    shared: list[str]
    examples_per_s: float


def read_rows(
    path: Path, cfg: StudentConfig, schema: FeatureSchema, knowledge: Path | None, variant: Variant
) -> tuple[Batch, int]:
    """One logged file -> the student's batch (+ teacher labels, GEM embeddings), and
    the rows of other surfaces left out."""
    sub = cfg.sub_schema(schema)
    columns = [KEY, SURFACE_INPUT, *cfg.sparse, *cfg.dense, *cfg.sequence_fields]
    columns += [t.label_column for t in schema.tasks]
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file with the student's columns: {e}") from None
    keep = np.isin(surface_index(table.column(SURFACE_INPUT), schema), cfg.surface_indices(schema))
    other = int((~keep).sum())
    table = table.filter(pa.array(keep))
    if knowledge is not None and variant.needs_knowledge:
        wanted = knowledge_columns(schema.task_names, labels=variant.distills, embeddings=variant.repr)
        table = join_knowledge(table, read_knowledge(knowledge, [path.stem], wanted))
    try:
        batch = table_to_batch(table, sub, max_seq_len=cfg.sequence_events or None)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    if knowledge is not None and (teacher := variant.teacher) is not None:  # a distilling variant
        batch[TEACHER] = teacher_probs(table, teacher, schema.task_names)
    if knowledge is not None and variant.repr:
        batch[EMBEDDING] = matrix(table.column(EMBEDDING))
        batch[USER_EMBEDDING] = matrix(table.column(USER_EMBEDDING))
    return batch, other


def load_split(
    paths: list[Path], cfg: StudentConfig, schema: FeatureSchema, knowledge: Path | None, variant: Variant
) -> Batch:
    parts = [read_rows(p, cfg, schema, knowledge, variant) for p in paths]
    if other := sum(o for _, o in parts):
        log.info("%s: %d rows of other surfaces left out", ", ".join(p.name for p in paths), other)
    return concat([b for b, _ in parts])


def _tensors(batch: Batch, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.require(batch[n], requirements=("C", "W"))) for n in names}


@torch.no_grad()
def predict(model: Student, batch: Batch, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    names = model.input_names()
    n = len(batch[SURFACE_INPUT])
    out = [
        model(_tensors(take(batch, slice(lo, lo + batch_size)), names))[SERVING].numpy()
        for lo in range(0, n, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(model.schema.tasks)), np.float32)


def fit_pass(
    model: Student,
    optimizers: list[torch.optim.Optimizer],
    data: Batch,
    schema: FeatureSchema,
    variant: Variant,
    batch_size: int,
    rng: np.random.Generator,
    on_step: StepCallback | None = None,
) -> float:
    """One pass over `data` in shuffled minibatches with the caller's optimizers (a
    streaming student keeps them across shards); returns the mean loss."""
    names = model.input_names()
    labels = labels_of(data, schema)
    # The tables' sparse gradients are made by torch itself: its invariant checks can stay off.
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    model.train()
    losses = []
    for rows in minibatch_rows(len(labels), batch_size, rng):
        mb = take(data, rows)
        teacher = torch.from_numpy(mb[TEACHER]) if TEACHER in mb else None
        parts = student_loss(model(_tensors(mb, names)), torch.from_numpy(labels[rows]), teacher, variant)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        parts.total.backward()
        for opt in optimizers:
            opt.step()
        losses.append(parts.total.item())
        if on_step:
            on_step(len(rows), losses[-1])
    return float(np.mean(losses)) if losses else float("nan")


def fit(
    model: Student,
    data: Batch,
    schema: FeatureSchema,
    variant: Variant,
    cfg: StudentTrainConfig,
    on_step: StepCallback | None = None,
) -> float:
    """Trains in place; returns the last epoch's mean loss."""
    rng = np.random.default_rng(cfg.seed)
    optimizers = make_optimizers(model, cfg.lr, cfg.embedding_lr)
    loss_mean = float("nan")
    for _ in range(cfg.epochs):
        loss_mean = fit_pass(model, optimizers, data, schema, variant, cfg.batch_size, rng, on_step)
    return loss_mean


def build_student(
    cfg: StudentConfig, schema: FeatureSchema, variant: Variant, repr_widths: tuple[int, int] | None = None
) -> Student:
    return Student(
        cfg.sub_schema(schema), cfg, repr_widths if variant.repr else None, variant.aux and variant.aux_head == "tower"
    )


def train_student(
    cfg: StudentTrainConfig, on_step: StepCallback | None = None, on_start: Callable[[int], None] | None = None
) -> StudentResult:
    """Trains the student variant, evaluates its serving head on the test slice, writes the
    checkpoint. `on_start(examples)` before training, `on_step(examples, loss)` after each step."""
    variant = cfg.variant
    if variant.needs_knowledge and cfg.knowledge is None:
        raise ValueError(f"variant {variant.name!r} learns from GEM's knowledge: give --knowledge (gem embed's --out)")
    if variant.share and cfg.share_checkpoint is None:
        raise ValueError("variant 'share' takes the FM's tables from a checkpoint: give --share-checkpoint")
    schema = load_schema(cfg.schema_path)
    student_cfg = load_student_config(cfg.config_path, cfg.schema_path)
    torch.manual_seed(cfg.seed)
    # No validation slice: the student's epochs are fixed; the newest shards are its test slice.
    train_paths, _, test_paths = split_shards(resolve_paths(cfg.data), val_shards=0, test_shards=cfg.eval_shards)
    train = load_split(train_paths, student_cfg, schema, cfg.knowledge, variant)
    # Only `repr` needs knowledge at test time (as input, as the service gives it online).
    test_variant = Variant(repr=True) if variant.repr else Variant()
    test = load_split(test_paths, student_cfg, schema, cfg.knowledge, test_variant)
    # The FM version whose embeddings `repr` takes as inputs (one, checked before any
    # training): a ranker serving this student pins it (examples/student_ranker.py).
    fm_version = None
    if variant.repr and cfg.knowledge is not None:
        fm_version = knowledge_fm_version(cfg.knowledge, [p.stem for p in (*train_paths, *test_paths)])
    widths = (train[EMBEDDING].shape[1], train[USER_EMBEDDING].shape[1]) if variant.repr else None
    model = build_student(student_cfg, schema, variant, widths)
    share_checkpoint = cfg.share_checkpoint if variant.share else None  # set when sharing (checked above)
    shared = share_tables(model, share_checkpoint, variant.share_mode) if share_checkpoint is not None else []
    share_source, share_fm_version = (None, None)
    # After share_tables, whose checkpoint load checks its manifest, and before training:
    # a repository that never published the checkpoint is the caller's error.
    if share_checkpoint is not None:
        share_source, share_fm_version = shared_fm_version(share_checkpoint, cfg.repository)
    if shared:
        log.info("shared FM tables (%s): %s", variant.share_mode, ", ".join(shared))
    n = len(train[SURFACE_INPUT])
    if on_start:
        on_start(n * cfg.epochs)
    start = time.perf_counter()
    loss = fit(model, train, schema, variant, cfg, on_step)
    rate = n * cfg.epochs / (time.perf_counter() - start)
    metrics = {
        "variant": variant.name,
        "train_shards": [p.name for p in train_paths],
        "test_shards": [p.name for p in test_paths],
        "train_rows": n,
        "test_rows": len(test[SURFACE_INPUT]),
        "train_loss": loss,
        "shared": shared,
        "fm_version": fm_version,
        "share_fm_source": share_source,
        "share_fm_version": share_fm_version,
        "test": evaluate(schema, predict(model, test), labels_of(test, schema), test[SURFACE_INPUT]),
    }
    path = save_student(cfg.out, model, variant, metrics)
    return StudentResult(path, metrics, shared, rate)


# -- checkpoints ------------------------------------------------------------------------


def save_student(path: str | Path, model: Student, variant: Variant, metrics: dict) -> Path:
    """<path>/student.pt (state dict) and student.json (config, sub-schema, variant,
    input widths, metrics), written in a temporary folder and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(model.state_dict(), tmp / "student.pt")
    meta = {
        "config": model.cfg.to_dict(), "schema_yaml": model.schema.to_yaml(), "variant": asdict(variant),
        "repr_widths": list(model.repr_widths) if model.repr_widths else None, "metrics": metrics,
    }  # fmt: skip
    (tmp / "student.json").write_text(json.dumps(meta, indent=2, allow_nan=True))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_student(path: str | Path) -> tuple[Student, Variant, dict]:
    path = Path(path)
    try:
        meta = json.loads((path / "student.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a student checkpoint: {e}") from None
    cfg = StudentConfig.from_dict(meta["config"])
    schema = schema_from_yaml(meta["schema_yaml"], source=str(path / "student.json"))
    widths = tuple(meta["repr_widths"]) if meta["repr_widths"] else None
    variant = Variant(**meta["variant"])
    model = Student(schema, cfg, widths, variant.aux and variant.aux_head == "tower")
    model.load_state_dict(torch.load(path / "student.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, variant, meta["metrics"]
