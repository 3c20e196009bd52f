"""The embedding layer: a columnar batch -> tokens.

Each sparse feature becomes one d-dim token (hashed lookup, projected from its own
width to d); the dense features go through an MLP into a few tokens; the surface gets a
token of its own. The behavior sequence becomes [B, L, d]: the sum of its fields'
embeddings plus a recency embedding (position 0 is the newest event).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.layers import MLP, HashedEmbedding
from model.schema import SURFACE_INPUT, FeatureSchema, Sequence


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
        self.sparse = nn.ModuleDict({f.name: _projected(f.buckets, f.dim, d) for f in schema.sparse})
        self.dense_tokens = cfg.dense_tokens if schema.dense else 0
        if schema.dense:
            self.dense = MLP([len(schema.dense), cfg.d_model * 2, cfg.dense_tokens * d])
        self.surface = nn.Embedding(len(schema.surfaces), d)
        self.sequences = nn.ModuleList(SequenceEmbedding(s, d, cfg.seq_len) for s in schema.sequences)
        self.d = d
        self.n_tokens = len(schema.sparse) + self.dense_tokens + 1

    def dense_values(self, batch: dict[str, Tensor], names: list[str]) -> Tensor:
        return torch.stack([batch[n] for n in names], dim=1)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, list[SequenceTokens]]:
        tokens = [self.sparse[f.name](batch[f.name]) for f in self.schema.sparse]
        if self.dense_tokens:
            dense = self.dense(self.dense_values(batch, self.dense_names))
            tokens.extend(dense.reshape(dense.shape[0], self.dense_tokens, self.d).unbind(1))
        tokens.append(self.surface(batch[SURFACE_INPUT]))
        return torch.stack(tokens, dim=1), [s(batch) for s in self.sequences]
