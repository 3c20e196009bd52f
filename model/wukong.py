"""Wukong interaction layers (arXiv 2403.02545).

A layer runs two blocks side by side over the token matrix X [B, N, d]:

- the optimized factorization-machine block, MLP(LN(flatten(X (X^T Y)))), with a
  learned Y [N, k] that keeps the pairwise-interaction cost at O(N d k) rather than
  O(N^2 d);
- the linear compression block, W_L X, which carries lower-order interactions
  forward so that stacking layers raises the interaction order.

Their outputs are concatenated, added to a (projected) residual and LayerNormed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.layers import MLP, TokenMix


class WukongLayer(nn.Module):
    def __init__(self, n_in: int, d: int, *, fm_tokens: int, lcb_tokens: int, rank: int, hidden: int):
        super().__init__()
        self.fm_tokens = fm_tokens
        self.d = d
        self.y = nn.Parameter(torch.randn(n_in, rank) / math.sqrt(n_in))
        self.fm_norm = nn.LayerNorm(n_in * rank)
        self.fm_mlp = MLP([n_in * rank, hidden, fm_tokens * d])
        self.lcb = TokenMix(n_in, lcb_tokens)
        n_out = fm_tokens + lcb_tokens
        self.residual = nn.Identity() if n_out == n_in else TokenMix(n_in, n_out)
        self.norm = nn.LayerNorm(d)
        self.n_out = n_out

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        xty = torch.matmul(x.transpose(1, 2), self.y)  # [B, d, k]
        fm = torch.matmul(x, xty).flatten(1)  # [B, N, k] -> [B, N*k]
        fm = self.fm_mlp(self.fm_norm(fm)).reshape(b, self.fm_tokens, self.d)
        out = torch.cat([fm, self.lcb(x)], dim=1)
        return self.norm(out + self.residual(x))


class WukongStack(nn.Sequential):
    def __init__(self, n_in: int, d: int, *, layers: int, fm_tokens: int, lcb_tokens: int, rank: int, hidden: int):
        blocks = []
        for _ in range(layers):
            block = WukongLayer(n_in, d, fm_tokens=fm_tokens, lcb_tokens=lcb_tokens, rank=rank, hidden=hidden)
            blocks.append(block)
            n_in = block.n_out
        super().__init__(*blocks)
        self.n_out = n_in
