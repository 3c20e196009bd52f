"""Baselines trained on the same data and split as GEM (`gem train --baselines`).

With GEM's own ablation (`GEMConfig(sequence_arch="mean_pool")`) they show what each
part of GEM buys: feature interactions (vs logistic regression), the Wukong and
InterFormer structure (vs a plain MLP over pooled embeddings), and order-aware
sequence modeling (vs mean pooling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.embedding import DenseNormalizer, FeatureEmbedding
from model.gem import GEM
from model.layers import MLP, HashedEmbedding, masked_mean
from model.outputs import LOGITS
from model.schema import SURFACE_INPUT, FeatureSchema


class LogisticRegression(nn.Module):
    """One hashed weight per id and task, the mean of the history's weights, a linear
    term for dense features and a bias per surface: additive, no crosses."""

    def __init__(self, schema: FeatureSchema, seq_len: int):
        super().__init__()
        n_tasks = len(schema.tasks)
        self.schema = schema
        self.seq_len = seq_len
        # Weights start at zero, as a logistic regression's do: random per-id weights
        # would be pure noise added to every logit.
        self.sparse = nn.ModuleDict({f.name: HashedEmbedding(f.buckets, n_tasks, 0.0) for f in schema.sparse})
        fields = [f for s in schema.sequences for f in s.fields]
        self.fields = nn.ModuleDict({f.name: HashedEmbedding(f.buckets, n_tasks, 0.0) for f in fields})
        self.dense = nn.Linear(len(schema.dense), n_tasks) if schema.dense else None
        self.normalize = DenseNormalizer(schema.dense)
        self.surface = nn.Embedding(len(schema.surfaces), n_tasks)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.surface(batch[SURFACE_INPUT])
        for f in self.schema.sparse:
            logits = logits + self.sparse[f.name](batch[f.name])
        for seq in self.schema.sequences:
            ids = {f.name: batch[f.name][:, : self.seq_len] for f in seq.fields}
            width = next(iter(ids.values())).shape[1]
            mask = torch.arange(width)[None, :] < batch[seq.length_name][:, None]
            for name, x in ids.items():
                logits = logits + masked_mean(self.fields[name](x), mask)
        if self.dense is not None:
            logits = logits + self.dense(self.normalize(batch))
        return {LOGITS: logits}


class PooledMLP(nn.Module):
    """DLRM-style: GEM's embedding layer, each sequence mean-pooled, one MLP on the
    concatenation; no explicit interaction layers."""

    def __init__(self, schema: FeatureSchema, cfg: GEMConfig):
        super().__init__()
        self.embed = FeatureEmbedding(schema, cfg)
        width = (self.embed.n_tokens + len(schema.sequences)) * cfg.d_model
        self.mlp = MLP([width, cfg.trunk_hidden, cfg.trunk_hidden // 2, len(schema.tasks)])

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        tokens, seqs = self.embed(batch)
        pooled = [masked_mean(s.tokens, s.mask) for s in seqs]
        return {LOGITS: self.mlp(torch.cat([tokens.flatten(1), *pooled], dim=1))}


def build_models(
    schema: FeatureSchema, cfg: GEMConfig, baselines: bool, seed: int | None = None
) -> dict[str, nn.Module]:
    """GEM first, then (optionally) the baselines, keyed by the name metrics use. With
    `seed`, every model is initialized from that seed alone, so a row of the metric
    table does not depend on which models were built before it."""
    makers: dict[str, Callable[[], nn.Module]] = {"gem": lambda: GEM(schema, cfg)}
    if baselines:
        # The other of the two full archs, so both are compared on the same data.
        other = {"shared_user": ("gem_per_example", "interformer"), "interformer": ("gem_shared_user", "shared_user")}
        if cfg.sequence_arch in other:
            name, arch = other[cfg.sequence_arch]
            makers[name] = lambda: GEM(schema, cfg.with_(sequence_arch=arch))
        makers["gem_mean_pool"] = lambda: GEM(schema, cfg.with_(sequence_arch="mean_pool"))
        makers["pooled_mlp"] = lambda: PooledMLP(schema, cfg)
        makers["logistic"] = lambda: LogisticRegression(schema, cfg.seq_len)
    models = {}
    for name, make in makers.items():
        if seed is not None:
            torch.manual_seed(seed)
        models[name] = make()
    return models
