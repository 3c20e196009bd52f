"""The embedding layer: a columnar batch -> tokens.

Each sparse feature becomes one d-dim token (hashed lookup, projected from its own
width to d); the dense features are standardized (`DenseNormalizer`: the schema's
transform, then the training shards' mean and standard deviation, all inside the
graph, so every client sends raw values) and go through an MLP into a few tokens; the surface gets a
token of its own. The behavior sequence becomes [B, L, d]: the sum of its fields'
embeddings plus a recency embedding (position 0 is the newest event).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.layers import MLP, HashedEmbedding
from model.schema import SURFACE_INPUT, DenseFeature, FeatureSchema, Sequence

# Standardized values are clipped to this many standard deviations: one wild value
# (a bid of 1e9 in a column of cents) must not saturate every unit it reaches.
DENSE_CLIP = 8.0


# A column of either kind; the transform keeps the kind.
Column = TypeVar("Column", Tensor, np.ndarray)


def transform_dense(x: Column, transform: str | None) -> Column:
    """The schema's `transform` of a dense column (torch or numpy, the same formula)."""
    if transform is None:
        return x
    if transform == "log1p":
        if isinstance(x, Tensor):
            return torch.sign(x) * torch.log1p(torch.abs(x))
        return np.sign(x) * np.log1p(np.abs(x))
    raise ValueError(f"unknown dense transform {transform!r}")


@dataclass(frozen=True)
class DenseStats:
    """Per-feature statistics of the (transformed) training values, in schema order."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {n: {"mean": m, "std": s} for n, m, s in zip(self.names, self.mean, self.std, strict=True)}


def dense_stats(features: Seq[DenseFeature], columns: Seq[dict[str, np.ndarray]]) -> DenseStats:
    """Mean and standard deviation of each dense feature over the given column sets
    (the training shards), after its transform; float64 sums, so 1e6-sized values
    and millions of rows keep their precision. A constant column gets std 1."""
    means, stds = [], []
    for f in features:
        n, total, total_sq = 0, 0.0, 0.0
        for cols in columns:
            x = transform_dense(np.asarray(cols[f.name], dtype=np.float64), f.transform)
            n += len(x)
            total += float(x.sum())
        mean = total / n if n else 0.0
        for cols in columns:
            x = transform_dense(np.asarray(cols[f.name], dtype=np.float64), f.transform)
            total_sq += float(np.square(x - mean).sum())
        std = float(np.sqrt(total_sq / n)) if n else 1.0
        means.append(mean)
        stds.append(std if std > 1e-12 * max(1.0, abs(mean)) else 1.0)
    return DenseStats(tuple(f.name for f in features), tuple(means), tuple(stds))


class DenseNormalizer(nn.Module):
    """Raw dense values -> (transform(x) - mean) / std, clipped to +-DENSE_CLIP.

    The statistics are buffers: they live in the state_dict (so a checkpoint carries
    them) and become constants of the ONNX graph. Until `set_stats` they are the
    identity (mean 0, std 1), which is also what a checkpoint written before they
    existed loads with, so such a model keeps computing what it was trained to."""

    # Buffers (`register_buffer`), declared for the type checker.
    mean: Tensor
    std: Tensor
    clip: Tensor

    def __init__(self, features: Seq[DenseFeature]):
        super().__init__()
        self.names = [f.name for f in features]
        self.transforms = [f.transform for f in features]
        self.register_buffer("mean", torch.zeros(len(self.names)))
        self.register_buffer("std", torch.ones(len(self.names)))
        # No clipping until there are statistics (the largest finite float32, not inf:
        # the bound becomes a graph constant).
        self.register_buffer("clip", torch.tensor(torch.finfo(torch.float32).max))
        self._register_load_state_dict_pre_hook(self._fill_missing)

    def _fill_missing(self, state_dict, prefix, *args) -> None:
        for key in ("mean", "std", "clip"):
            state_dict.setdefault(prefix + key, getattr(self, key).detach().clone())

    def set_stats(self, stats: DenseStats) -> None:
        index = {n: i for i, n in enumerate(stats.names)}
        missing = [n for n in self.names if n not in index]
        if missing:
            raise ValueError(f"no statistics for dense feature {missing[0]!r}")
        with torch.no_grad():
            self.mean.copy_(torch.tensor([stats.mean[index[n]] for n in self.names]))
            self.std.copy_(torch.tensor([stats.std[index[n]] for n in self.names]))
            self.clip.fill_(DENSE_CLIP)

    def forward(self, batch: dict[str, Tensor], names: Seq[str] | None = None) -> Tensor:
        """[B, F] standardized values of `names` (default: all, in schema order)."""
        picks = range(len(self.names)) if names is None else [self.names.index(n) for n in names]
        cols = []
        for i in picks:
            x = transform_dense(batch[self.names[i]], self.transforms[i])
            cols.append((x - self.mean[i]) / self.std[i])
        x = torch.stack(cols, dim=1)
        return torch.minimum(torch.maximum(x, -self.clip), self.clip)


def set_dense_stats(model: nn.Module, stats: DenseStats) -> int:
    """Gives every `DenseNormalizer` inside `model` the statistics; returns how many."""
    found = [m for m in model.modules() if isinstance(m, DenseNormalizer)]
    for m in found:
        m.set_stats(stats)
    return len(found)


def _projected(buckets: int, dim: int, d: int) -> nn.Module:
    table = HashedEmbedding(buckets, dim)
    return table if dim == d else nn.Sequential(table, nn.Linear(dim, d, bias=False))


@dataclass
class SequenceTokens:
    tokens: Tensor  # [B, L, d], L = min(input length, config.seq_len)
    mask: Tensor  # [B, L] bool, True where an event is present


class SequenceEmbedding(nn.Module):
    def __init__(self, seq: Sequence, d: int, seq_len: int):
        super().__init__()
        self.seq = seq
        self.seq_len = seq_len
        self.fields = nn.ModuleDict({f.name: _projected(f.buckets, f.dim, d) for f in seq.fields})
        self.recency = nn.Parameter(torch.randn(seq_len, d) * 0.02)

    def forward(self, batch: dict[str, Tensor]) -> SequenceTokens:
        # Newest first, so reading the newest `seq_len` events is a prefix slice.
        names = [f.name for f in self.seq.fields]
        ids = [batch[n][:, : self.seq_len] for n in names]
        tokens = sum(self.fields[n](x) for n, x in zip(names, ids, strict=True))
        length = tokens.shape[1]
        tokens = tokens + self.recency[:length]
        positions = torch.arange(length, device=tokens.device)
        mask = positions[None, :] < batch[self.seq.length_name][:, None]
        return SequenceTokens(tokens * mask.unsqueeze(-1).to(tokens.dtype), mask)


class FeatureEmbedding(nn.Module):
    """Non-sequence tokens [B, N, d] plus one `SequenceTokens` per sequence."""

    def __init__(self, schema: FeatureSchema, cfg: GEMConfig):
        super().__init__()
        d = cfg.d_model
        self.schema = schema
        self.dense_names = [f.name for f in schema.dense]
        self.normalize = DenseNormalizer(schema.dense)
        self.sparse = nn.ModuleDict({f.name: _projected(f.buckets, f.dim, d) for f in schema.sparse})
        self.dense_tokens = cfg.dense_tokens if schema.dense else 0
        if schema.dense:
            self.dense = MLP([len(schema.dense), cfg.d_model * 2, cfg.dense_tokens * d])
        self.surface = nn.Embedding(len(schema.surfaces), d)
        self.sequences = nn.ModuleList(SequenceEmbedding(s, d, cfg.seq_len) for s in schema.sequences)
        self.d = d
        self.n_tokens = len(schema.sparse) + self.dense_tokens + 1

    def dense_values(self, batch: dict[str, Tensor], names: list[str]) -> Tensor:
        """[B, len(names)] standardized dense values (raw values in, see DenseNormalizer)."""
        return self.normalize(batch, names)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, list[SequenceTokens]]:
        tokens = [self.sparse[f.name](batch[f.name]) for f in self.schema.sparse]
        if self.dense_tokens:
            dense = self.dense(self.dense_values(batch, self.dense_names))
            tokens.extend(dense.reshape(dense.shape[0], self.dense_tokens, self.d).unbind(1))
        tokens.append(self.surface(batch[SURFACE_INPUT]))
        return torch.stack(tokens, dim=1), [s(batch) for s in self.sequences]
