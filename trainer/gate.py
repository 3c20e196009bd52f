"""The publish gate: progressive validation of the candidate against the served version.

Each cycle's candidate (trained on shard n) and the FM version being served are both
scored on shard n + 1, which neither has trained on: the freshest honest test set there
is. The candidate is refused when, for any task, its normalized entropy is worse than the
served version's by more than the tolerance (relative). The served version is scored
from its own ONNX file in the model repository (what Triton serves, whoever published
it, rollbacks included), not from weights the trainer remembers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.contract import FM_MODEL, ONNX_FILENAME
from export.repository import ModelRepository
from model.batch import Batch, iter_minibatches, take
from model.features import input_names
from model.outputs import LOGITS, sigmoid
from model.schema import SURFACE_INPUT, FeatureSchema
from model.user_index import graph_feeds
from trainer.evaluation import auc, normalized_entropy


@dataclass(frozen=True)
class GateConfig:
    # A task's NE may be at most (1 + tolerance) x the served version's.
    tolerance: float = 0.01


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    eval_shard: str
    candidate: dict[str, dict[str, float]]
    serving: dict[str, dict[str, float]] | None = None
    serving_version: int | None = None


def task_metrics(schema: FeatureSchema, logits: np.ndarray, batch: Batch) -> dict[str, dict[str, float]]:
    """NE, AUC and log loss per task of logits [N, T] on the batch's labels."""
    out = {}
    for t, task in enumerate(schema.tasks):
        y = batch[task.label_column]
        p = sigmoid(logits[:, t].astype(np.float64))
        ne = normalized_entropy(y, p)
        out[task.name] = {"ne": ne, "auc": auc(y, logits[:, t]), "log_loss": ne_to_log_loss(y, ne)}
    return out


def ne_to_log_loss(labels: np.ndarray, ne: float) -> float:
    base = float(np.clip(labels.mean(), 1e-7, 1 - 1e-7))
    return ne * -(base * math.log(base) + (1 - base) * math.log(1 - base))


def decide(
    candidate: dict[str, dict[str, float]], serving: dict[str, dict[str, float]] | None, cfg: GateConfig
) -> tuple[bool, str]:
    if serving is None:
        return True, "nothing is served yet"
    worse = []
    for task, m in candidate.items():
        cand, served = m["ne"], serving[task]["ne"]
        if not math.isfinite(cand) or cand > served * (1.0 + cfg.tolerance):
            worse.append(f"{task} NE {cand:.4f} vs served {served:.4f}")
    if worse:
        return False, f"regression beyond tolerance {cfg.tolerance:.2%}: " + "; ".join(worse)
    summary = ", ".join(f"{t} NE {m['ne']:.4f} vs {serving[t]['ne']:.4f}" for t, m in candidate.items())
    return True, f"within tolerance {cfg.tolerance:.2%}: {summary}"


def onnx_logits(model_path: Path, batch: Batch, schema: FeatureSchema, batch_size: int = 4096) -> np.ndarray:
    """The FM's logits from an ONNX file (a published version) for every row."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = input_names(schema)
    out = np.empty((len(batch[SURFACE_INPUT]), len(schema.tasks)), dtype=np.float32)
    for rows, mb in iter_minibatches(take(batch, slice(None)), batch_size, schema):
        (out[rows],) = session.run([LOGITS], graph_feeds({n: mb[n] for n in names}, session.get_inputs()))
    return out


def serving_logits(repo: ModelRepository, batch: Batch, schema: FeatureSchema) -> tuple[int | None, np.ndarray | None]:
    """(served FM version, its logits), or (None, None) when nothing is published."""
    version = repo.latest(FM_MODEL)
    if version is None:
        return None, None
    return version, onnx_logits(repo.root / FM_MODEL / str(version) / ONNX_FILENAME, batch, schema)


def gate(
    schema: FeatureSchema,
    candidate_logits: np.ndarray,
    eval_batch: Batch,
    eval_shard: str,
    repo: ModelRepository,
    cfg: GateConfig,
) -> GateResult:
    candidate = task_metrics(schema, candidate_logits, eval_batch)
    version, served_logits = serving_logits(repo, eval_batch, schema)
    serving = None if served_logits is None else task_metrics(schema, served_logits, eval_batch)
    passed, reason = decide(candidate, serving, cfg)
    return GateResult(passed, reason, eval_shard, candidate, serving, version)
