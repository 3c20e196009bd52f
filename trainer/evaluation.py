"""Offline metrics: AUC, log loss and normalized entropy (NE), per task and surface.

NE is the log loss divided by the entropy of the base rate (the log loss of always
predicting the average CTR): below 1 means the model knows more than the base rate.
"""

from __future__ import annotations

import numpy as np

from model.outputs import sigmoid
from model.schema import FeatureSchema

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney rank sum (ties get mean ranks)."""
    labels = labels.astype(bool)
    pos, n = int(labels.sum()), len(labels)
    if pos == 0 or pos == n:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(n, dtype=np.float64)
    # Mean rank per run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], n]
    run_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_rank, ends - starts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * (n - pos)))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, EPS, 1 - EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    base = float(np.clip(labels.mean(), EPS, 1 - EPS))
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    return log_loss(labels, probs) / entropy


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = sigmoid(logits.astype(np.float64))
    return {
        "auc": auc(labels, logits),
        "log_loss": log_loss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "rows": len(labels),
        "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
    }


def evaluate(schema: FeatureSchema, logits: np.ndarray, labels: np.ndarray, surfaces: np.ndarray) -> dict:
    """logits, labels: [N, T]; surfaces: [N] -> {task: {overall, by_surface: {name: ...}}}."""
    out = {}
    for t, task in enumerate(schema.tasks):
        per_surface = {
            name: binary_metrics(labels[surfaces == s, t], logits[surfaces == s, t])
            for s, name in enumerate(schema.surfaces)
            if (surfaces == s).any()
        }
        out[task.name] = {"overall": binary_metrics(labels[:, t], logits[:, t]), "by_surface": per_surface}
    return out
