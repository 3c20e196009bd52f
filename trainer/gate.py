"""The publish gate: progressive validation of the candidate against the served version.

Each cycle's candidate (trained on shard n) and the FM version being served are both
scored on shard n + 1, which neither has trained on: the freshest honest test set there
is. The candidate is refused when, for any task, its normalized entropy is worse than the
served version's by more than the tolerance (relative). The served version is scored
from its own ONNX file in the model repository (what Triton serves, whoever published
it, rollbacks included), not from weights the trainer remembers. With --knowledge-out,
that same pass also keeps the served version's adapted logits and embeddings: the
knowledge trainer/knowledge.py writes for the shard (no second forward pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.contract import ADAPTER_INPUTS, ADAPTER_MODEL, ADAPTER_OUTPUT, FM_MODEL, ONNX_FILENAME
from export.repository import ModelRepository
from model.batch import Batch, iter_minibatches, take
from model.features import input_names
from model.outputs import LOGITS, sigmoid
from model.schema import SURFACE_INPUT, FeatureSchema
from model.user_index import graph_feeds
from serving.backends.base import Knowledge
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
    # The served version's pass over the eval shard (its outputs and versions): the
    # knowledge that version served for those rows.
    served: Knowledge | None = None


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


def _session(model_path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(
    model_path: Path, batch: Batch, schema: FeatureSchema, outputs: tuple[str, ...] = (LOGITS,), batch_size: int = 4096
) -> dict[str, np.ndarray]:
    """The FM's `outputs` from an ONNX file (a published version) for every row, in one pass."""
    session = _session(model_path)
    names = input_names(schema)
    n = len(batch[SURFACE_INPUT])
    out: dict[str, np.ndarray] = {}
    for rows, mb in iter_minibatches(take(batch, slice(None)), batch_size, schema):
        values = session.run(list(outputs), graph_feeds({k: mb[k] for k in names}, session.get_inputs()))
        for name, value in zip(outputs, values, strict=True):
            if name not in out:
                out[name] = np.empty((n, *value.shape[1:]), value.dtype)
            out[name][rows] = value
    return out


def onnx_logits(model_path: Path, batch: Batch, schema: FeatureSchema, batch_size: int = 4096) -> np.ndarray:
    """The FM's logits from an ONNX file (a published version) for every row."""
    return onnx_outputs(model_path, batch, schema, (LOGITS,), batch_size)[LOGITS]


def serving_pass(
    repo: ModelRepository, batch: Batch, schema: FeatureSchema, outputs: tuple[str, ...] = (LOGITS,)
) -> Knowledge | None:
    """The served FM version's one pass over the batch: its `outputs` (logits always; the
    served adapter's adapted logits too when asked and one is published, from the FM's
    logits of this same pass) with both versions (0: no adapter), or None when no FM is
    published."""
    version = repo.latest(FM_MODEL)
    if version is None:
        return None
    fm_outputs = tuple(dict.fromkeys((LOGITS, *(o for o in outputs if o != ADAPTER_OUTPUT))))
    out = onnx_outputs(repo.root / FM_MODEL / str(version) / ONNX_FILENAME, batch, schema, fm_outputs)
    adapter_version = repo.latest(ADAPTER_MODEL) if ADAPTER_OUTPUT in outputs else None
    if adapter_version is not None:  # else not asked, or no adapter published: no adapted logits
        logits, surface = ADAPTER_INPUTS
        session = _session(repo.root / ADAPTER_MODEL / str(adapter_version) / ONNX_FILENAME)
        (out[ADAPTER_OUTPUT],) = session.run(
            [ADAPTER_OUTPUT], {logits: out[LOGITS], surface: np.ascontiguousarray(batch[SURFACE_INPUT])}
        )
    return Knowledge(out, version, adapter_version or 0)


def gate(
    schema: FeatureSchema,
    candidate_logits: np.ndarray,
    eval_batch: Batch,
    eval_shard: str,
    repo: ModelRepository,
    cfg: GateConfig,
    outputs: tuple[str, ...] = (LOGITS,),
) -> GateResult:
    """`outputs`: what the served version's pass keeps beyond its logits (the knowledge)."""
    candidate = task_metrics(schema, candidate_logits, eval_batch)
    served = serving_pass(repo, eval_batch, schema, outputs)
    serving = None if served is None else task_metrics(schema, served.outputs[LOGITS], eval_batch)
    passed, reason = decide(candidate, serving, cfg)
    version = None if served is None else served.fm_version
    return GateResult(passed, reason, eval_shard, candidate, serving, version, served)
