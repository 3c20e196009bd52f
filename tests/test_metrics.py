import numpy as np
import pytest

from trainer.evaluation import auc, binary_metrics, normalized_entropy


def _brute_force_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 20, 500).astype(float)  # many ties
    assert auc(labels, scores) == pytest.approx(_brute_force_auc(labels, scores), abs=1e-12)


def test_auc_extremes():
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert np.isnan(auc(np.ones(4), np.arange(4.0)))


def test_ne_of_the_base_rate_is_one_and_better_is_lower():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.5, 100_000)
    labels = (rng.random(100_000) < p).astype(float)
    assert normalized_entropy(labels, np.full_like(p, labels.mean())) == pytest.approx(1.0, abs=1e-6)
    assert normalized_entropy(labels, p) < 0.95
    m = binary_metrics(labels, np.log(p / (1 - p)))
    assert m["auc"] > 0.6 and m["rows"] == 100_000
