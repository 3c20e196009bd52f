"""Building blocks shared by the GEM modules and the baselines.

Everything here exports to plain ONNX ops (Gather, MatMul, Softmax, Where, Mod):
no EmbeddingBag, no sequence ops, so TensorRT can run the whole graph.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear -> GELU -> ... -> Linear (no activation after the last layer)."""

    def __init__(self, dims: list[int]):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        super().__init__(*layers)


class HashedEmbedding(nn.Module):
    """An embedding table indexed by `id mod buckets`.

    Any int64 id is valid input, including ids never seen in training, negative ids
    and ids far beyond the table (remainder with a positive divisor is never
    negative), so serving never crashes on an id.
    """

    def __init__(self, buckets: int, dim: int, init_std: float | None = None):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim)
        nn.init.normal_(self.table.weight, std=1.0 / math.sqrt(dim) if init_std is None else init_std)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(torch.remainder(ids, self.buckets))


def attention_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention mask [B, 1, 1, Lk]: 0 where kept, the dtype's lowest finite
    value where masked, never -inf.

    A row whose keys are all padding then softmaxes to a uniform (finite) row instead
    of NaN; callers zero out what such rows produce.
    """
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a key padding mask.

    Runs on `scaled_dot_product_attention` (fused kernels, faster than explicit matmuls
    on CPU: bench/README.md), which the ONNX exporter decomposes into MatMul/Softmax at
    the opset we export with, so TensorRT sees plain ops.
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:  # [B, L, d] -> [B, h, L, dh]
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        """queries [B, Lq, d], keys [B, Lk, d], key_mask [B, Lk] (True = valid)."""
        q = self._split(self.q(queries))
        k, v = self.kv(keys).chunk(2, dim=-1)
        ctx = nn.functional.scaled_dot_product_attention(
            q, self._split(k), self._split(v), attn_mask=attention_bias(key_mask, q.dtype)
        )
        b, _, lq, _ = ctx.shape
        return self.out(ctx.transpose(1, 2).reshape(b, lq, -1))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid positions of x [B, L, d]; zeros for a row with none."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class TokenMix(nn.Module):
    """A learned linear map along the token axis: [B, N_in, d] -> [B, N_out, d]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(self.weight, x)


def chain_logits(logits: Tensor, parents: tuple[int | None, ...]) -> Tensor:
    """ESMM over logits: column t of `logits` is read as the logit of P(t | parent) for a
    task with a parent, and replaced by the logit of P(parent) * P(t | parent), the
    parent being already chained (parents come first). Computed as
    logit(sigmoid(a) * sigmoid(b)) = a + b - logsumexp(0, a, b), finite for all finite
    inputs (no inf, no NaN), and capped by the parent's logit so that rounding can
    never put P(t) above P(parent)."""
    if all(p is None for p in parents):
        return logits
    cols = list(logits.unbind(1))
    for t, p in enumerate(parents):
        if p is not None:
            a, b = cols[p], cols[t]
            joint = a + b - torch.logsumexp(torch.stack([torch.zeros_like(a), a, b], dim=-1), dim=-1)
            cols[t] = torch.minimum(joint, a)
    return torch.stack(cols, dim=1)
