"""Single-process training of GEM (and, optionally, its baselines) on Parquet shards.

Shards are in time order (the synthetic generator and the logging pipeline name them
so). The last `test_shards` are the test slice: reported, never tuned on. The
`val_shards` before them are the validation slice: every model (GEM and each baseline
alike) is evaluated on it after every epoch, training stops when its validation NE has
not improved for `patience` epochs, and the epoch with the best validation NE is the
one kept (and the one whose test metrics are reported). The rest are training shards;
the dense features' normalization statistics are measured on them alone.

Embedding tables train with Adagrad (sparse-friendly, per-row adaptive), everything
else with AdamW.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from model.adapter import StudentAdapter
from model.baselines import build_models
from model.batch import Batch, concat, iter_minibatches
from model.checkpoint import ModelBundle, save_checkpoint
from model.config import preset
from model.data.reader import DataError, read_batch, resolve_places
from model.embedding import dense_stats, set_dense_stats
from model.features import input_names
from model.gem import GEM
from model.outputs import LOGITS
from model.progress import SILENT, Progress
from model.schema import DEFAULT_SCHEMA_PATH, SURFACE_INPUT, FeatureSchema, load_schema
from model.storage import Place
from trainer.evaluation import evaluate

log = logging.getLogger(__name__)

# Called after every step with (examples in the step, loss).
StepCallback = Callable[[int, float], None]


# Optimizer defaults per model preset (None in TrainConfig picks these). `tiny` sees
# little data per parameter (tests, 20k-row runs) and memorizes ids within an epoch at
# the `small` settings: smaller steps and more of them let early stopping find a better
# epoch. Any other preset gets `small`'s.
TRAINING_DEFAULTS: dict[str, dict[str, float]] = {
    "tiny": {"batch_size": 128, "lr": 1e-3, "embedding_lr": 0.01},
    "small": {"batch_size": 512, "lr": 2e-3, "embedding_lr": 0.05},
}


@dataclass(frozen=True)
class Steps:
    """The optimizer's settings a fit runs with: a TrainConfig's, the preset's where unset."""

    batch_size: int
    lr: float
    embedding_lr: float


@dataclass(frozen=True)
class TrainConfig:
    # A file, folder or glob; local or s3:// (model/storage.py).
    data: str | Path
    out: Path
    preset: str = "small"
    schema_path: Path = DEFAULT_SCHEMA_PATH
    # The most passes over the training shards; early stopping usually ends sooner.
    epochs: int = 8
    # Epochs without a better validation NE before training stops. On the synthetic
    # data every model's validation curve has one minimum, so waiting one epoch finds it
    # and wastes the least (an epoch of `small` is minutes on a CPU).
    patience: int = 1
    # None: the preset's (TRAINING_DEFAULTS).
    batch_size: int | None = None
    lr: float | None = None
    embedding_lr: float | None = None
    val_shards: int = 1
    test_shards: int = 1
    seed: int = 0
    baselines: bool = False
    adapter_epochs: int = 3
    # Override the preset's `esmm` and `sequence_arch` (None: the preset's).
    esmm: bool | None = None
    sequence_arch: str | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size", "val_shards", "test_shards"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    def steps(self) -> Steps:
        """The optimizer's settings, the preset's (TRAINING_DEFAULTS) where a value is None."""
        defaults = TRAINING_DEFAULTS.get(self.preset, TRAINING_DEFAULTS["small"])
        return Steps(
            batch_size=int(self.batch_size or defaults["batch_size"]),
            lr=self.lr or defaults["lr"],
            embedding_lr=self.embedding_lr or defaults["embedding_lr"],
        )


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLog:
    """`model.progress.Progress` as plain lines, at most one every `every_s` seconds
    (for a log file, compose or CI, where a progress bar is noise). Training's figures
    (`epoch`, `epochs`, `loss`, `rate`: examples/s of training time) make the line:

        gem epoch 2/8: 31,232/160,000 examples, 4,512 examples/s, loss 0.3121, ETA 28s
    """

    def __init__(
        self, write: Callable[[str], None], every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ):
        self.write, self.every_s, self.clock = write, every_s, clock
        self.last: float | None = None
        self.task, self.total, self.done = "", 0, 0

    def start(self, task: str, total: int | None = None) -> None:
        self.task, self.total, self.done, self.last = task, total or 0, 0, None

    def advance(self, n: int, **figures: float) -> None:
        self.done += n
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        rate = figures.get("rate", 0.0)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        self.write(
            f"{self.task} epoch {figures.get('epoch', 0):.0f}/{figures.get('epochs', 0):.0f}: "
            f"{self.done:,}/{self.total:,} examples, {rate:,.0f} examples/s, loss {figures.get('loss', math.nan):.4f}, "
            f"ETA {format_duration(eta)}"
        )

    def note(self, message: str) -> None:
        self.write(message)


def to_tensors(batch: Batch, names: tuple[str, ...], device: torch.device | None = None) -> dict[str, Tensor]:
    if device is None or device.type == "cpu":
        return {n: torch.from_numpy(batch[n]) for n in names}
    return {n: torch.from_numpy(batch[n]).to(device, non_blocking=True) for n in names}


def labels_of(batch: Batch, schema: FeatureSchema) -> np.ndarray:
    return np.stack([batch[t.label_column] for t in schema.tasks], axis=1)


# A shard's name: a local Path or a Place (local or S3).
P = TypeVar("P", Path, Place)


def split_shards(paths: list[P], val_shards: int = 1, test_shards: int = 1) -> tuple[list[P], list[P], list[P]]:
    """Time-ordered shards -> (train, validation, test): the last `test_shards` are the
    test slice, the `val_shards` before them the validation slice."""
    held = val_shards + test_shards
    if len(paths) <= held:
        raise DataError(
            f"need more than {held} shard(s): the last {test_shards} hold(s) out the test time slice and "
            f"the {val_shards} before the validation slice; found {len(paths)}"
        )
    return paths[:-held], paths[-held:-test_shards], paths[-test_shards:]


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


def selection_score(result: dict, schema: FeatureSchema) -> float:
    """What early stopping minimizes: the mean over tasks of the overall NE."""
    return float(np.mean([result[t.name]["overall"]["ne"] for t in schema.tasks]))


def _brief(result: dict, schema: FeatureSchema) -> dict:
    return {t.name: {k: result[t.name]["overall"][k] for k in ("auc", "ne")} for t in schema.tasks}


@dataclass
class FitResult:
    """One model's training: the epoch kept and the validation curve."""

    best_epoch: int
    epochs_run: int
    curve: list[dict]
    examples: int
    seconds: float

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def fit(
    name: str,
    model: nn.Module,
    train_data: list[Batch],
    val_data: Batch,
    schema: FeatureSchema,
    cfg: TrainConfig,
    progress: Progress = SILENT,
) -> FitResult:
    """Trains `model` for at most `cfg.epochs` epochs, evaluating on `val_data` after
    each; stops after `cfg.patience` epochs without a better validation NE and leaves
    the model at its best epoch. Only `val_data` is looked at: never the test slice."""
    steps = cfg.steps()
    rng = np.random.default_rng(cfg.seed)
    optimizers = make_optimizers(model, steps.lr, steps.embedding_lr)
    val_labels = labels_of(val_data, schema)
    examples, recent = 0, []  # recent: the last 50 steps' losses

    def step(n: int, loss: float) -> None:
        nonlocal examples
        examples += n
        recent.append(loss)
        del recent[:-50]
        # Examples/s of training time only (not the evaluation after each epoch): the
        # figure the table reports.
        elapsed = seconds + time.perf_counter() - t0
        rate = examples / elapsed if elapsed > 0 else 0.0
        progress.advance(n, epoch=epoch, epochs=cfg.epochs, loss=float(np.mean(recent)), rate=rate)

    curve: list[dict] = []
    best_score, best_epoch, best_state, seconds = math.inf, 0, None, 0.0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses = []
        for shard in train_data:
            losses.append(train_steps(model, optimizers, shard, schema, steps.batch_size, rng, step))
        seconds += time.perf_counter() - t0
        val = evaluate(schema, predict(model, val_data, schema), val_labels, val_data[SURFACE_INPUT])
        score = selection_score(val, schema)
        improved = score < best_score
        curve.append(
            {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_ne": score, "val": _brief(val, schema)}
        )
        log.info(
            "%s epoch %d: train loss %.4f, validation NE %s%s",
            name,
            epoch,
            curve[-1]["train_loss"],
            ", ".join(f"{t} {m['ne']:.4f}" for t, m in curve[-1]["val"].items()),
            " (best so far)" if improved else "",
        )
        if improved:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None and best_epoch != len(curve):
        model.load_state_dict(best_state)
    return FitResult(best_epoch, len(curve), curve, examples, seconds)


def train(cfg: TrainConfig, progress: Progress = SILENT) -> TrainResult:
    """Trains GEM (and baselines) with early stopping on the validation slice, reports
    the test slice, writes the checkpoint (the best epoch of GEM).

    `progress` starts a unit per model (its total: the examples at the most epochs) and
    advances after every step with the running figures (`epoch`, `epochs`, `loss`,
    `rate`: examples/s of training time).
    """
    schema = load_schema(cfg.schema_path)
    model_cfg = preset(cfg.preset)
    overrides = {"esmm": cfg.esmm, "sequence_arch": cfg.sequence_arch}
    model_cfg = model_cfg.with_(**{k: v for k, v in overrides.items() if v is not None})
    torch.manual_seed(cfg.seed)
    train_paths, val_paths, test_paths = split_shards(resolve_places(cfg.data), cfg.val_shards, cfg.test_shards)
    log.info(
        "training on %d shard(s), validating on %s, testing on %s",
        len(train_paths),
        ", ".join(p.name for p in val_paths),
        ", ".join(p.name for p in test_paths),
    )

    def read(paths: list[Place]) -> list[Batch]:
        return [read_batch(p, schema, max_seq_len=model_cfg.seq_len) for p in paths]

    train_data = read(train_paths)
    val_data, test_data = concat(read(val_paths)), concat(read(test_paths))
    test_labels = labels_of(test_data, schema)
    stats = dense_stats(schema.dense, train_data)

    models = build_models(schema, model_cfg, cfg.baselines, seed=cfg.seed)
    metrics: dict = {
        "preset": cfg.preset,
        "gem_arch": model_cfg.sequence_arch,
        "train_shards": [p.name for p in train_paths],
        "val_shards": [p.name for p in val_paths],
        "test_shards": [p.name for p in test_paths],
        "training": {k: getattr(cfg, k) for k in ("epochs", "patience", "batch_size", "lr", "embedding_lr")},
        "selection": f"best validation NE (mean over tasks), at most {cfg.epochs} epochs, patience {cfg.patience}",
        "dense_stats": stats.to_dict(),
    }
    throughput = 0.0
    rows = sum(len(b[SURFACE_INPUT]) for b in train_data)
    for name, model in models.items():
        progress.start(name, cfg.epochs * rows)
        set_dense_stats(model, stats)
        fitted = fit(name, model, train_data, val_data, schema, cfg, progress)
        result = evaluate(schema, predict(model, test_data, schema), test_labels, test_data[SURFACE_INPUT])
        result["train_examples_per_s"] = fitted.examples_per_s
        result["best_epoch"] = fitted.best_epoch
        result["epochs_run"] = fitted.epochs_run
        result["train_seconds"] = fitted.seconds
        result["curve"] = fitted.curve
        metrics[name] = result
        log.info(
            "%s: test %s (epoch %d of %d, %.0f examples/s)",
            name,
            ", ".join(f"{t.name} AUC {result[t.name]['overall']['auc']:.4f} NE {result[t.name]['overall']['ne']:.4f}"
                      for t in schema.tasks),
            fitted.best_epoch,
            fitted.epochs_run,
            fitted.examples_per_s,
        )  # fmt: skip
        if name == "gem":
            throughput = fitted.examples_per_s

    gem = models["gem"]
    assert isinstance(gem, GEM)  # build_models: GEM first, then the baselines
    # The adapter learns from the freshest labels the FM has not trained on, as the side
    # trainer's adapter does: the validation slice (FM logits on rows it memorized would
    # teach the adapter to trust it too much). The test slice stays unseen.
    fresh = val_data
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents)
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
            torch.from_numpy(predict(gem, test_data, schema)), torch.from_numpy(test_data[SURFACE_INPUT])
        ).numpy()
    metrics["gem_adapted"] = evaluate(schema, adapted, test_labels, test_data[SURFACE_INPUT])

    path = save_checkpoint(cfg.out, ModelBundle(schema, model_cfg, gem, adapter), metrics)
    return TrainResult(path, metrics, throughput)
