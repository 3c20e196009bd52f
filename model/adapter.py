"""The Student Adapter (ExFM, arXiv 2502.17494).

A tiny model from (FM logits, surface) to calibrated logits, retrained often on the
freshest labels so that downstream models are not taught by a stale teacher. It is
its own model with its own versions: the FM can be stale or gated while the adapter
keeps up. It is a residual correction initialised to the identity, so an untrained
adapter passes the FM's logits through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.layers import MLP


class StudentAdapter(nn.Module):
    def __init__(self, n_tasks: int, n_surfaces: int, hidden: int = 32):
        super().__init__()
        self.n_tasks = n_tasks
        self.n_surfaces = n_surfaces
        self.hidden = hidden
        self.surface = nn.Embedding(n_surfaces, hidden)
        self.mlp = MLP([n_tasks + hidden, hidden, n_tasks])
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, fm_logits: Tensor, surface: Tensor) -> Tensor:
        h = torch.cat([fm_logits, self.surface(surface)], dim=1)
        return fm_logits + self.mlp(h)
