"""The Student Adapter (ExFM, arXiv 2502.17494).

A tiny model from (FM logits, surface) to calibrated logits, retrained often on the
freshest labels so that downstream models are not taught by a stale teacher. It is
its own model with its own versions: the FM can be stale or gated while the adapter
keeps up. It is a residual correction initialised to the identity, so an untrained
adapter passes the FM's logits through unchanged.

Tasks that follow tasks (`after:` in the schema, e.g. conversion after click) keep
their order through the adapter too: an adapted P(conversion) never exceeds the adapted
P(click) of the same row. The parent of each task is a buffer, so it travels in the
adapter's state_dict (and checkpoints) and is a constant of the ONNX graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from model.layers import MLP


class StudentAdapter(nn.Module):
    # A buffer (`register_buffer`), declared for the type checker.
    parent: Tensor

    def __init__(self, n_tasks: int, n_surfaces: int, hidden: int = 32, parents: Sequence[int | None] | None = None):
        """`parents`: for each task the index of the task it follows, or None
        (`FeatureSchema.task_parents`); default: independent tasks."""
        super().__init__()
        self.n_tasks = n_tasks
        self.n_surfaces = n_surfaces
        self.hidden = hidden
        self.surface = nn.Embedding(n_surfaces, hidden)
        self.mlp = MLP([n_tasks + hidden, hidden, n_tasks])
        # Zero: a fresh adapter adds nothing to the FM's logits.
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)
        parents = [None] * n_tasks if parents is None else list(parents)
        if len(parents) != n_tasks or any(p is not None and not 0 <= p < t for t, p in enumerate(parents)):
            raise ValueError(f"parents must name an earlier task for each of {n_tasks} tasks, got {parents}")
        # parent[t] == t for a task of its own (the min below is then a no-op).
        self.register_buffer("parent", torch.tensor([t if p is None else p for t, p in enumerate(parents)]))
        self._register_load_state_dict_pre_hook(self._fill_missing)

    def _fill_missing(self, state_dict, prefix, *args) -> None:
        # An adapter saved before the buffer existed: independent tasks, as it was.
        state_dict.setdefault(prefix + "parent", torch.arange(self.n_tasks))

    @property
    def last(self) -> nn.Linear:
        """The MLP's last layer, whose output is added to the FM's logits."""
        return cast(nn.Linear, self.mlp[-1])

    @property
    def parents(self) -> tuple[int | None, ...]:
        return tuple(None if int(p) == t else int(p) for t, p in enumerate(self.parent))

    def forward(self, fm_logits: Tensor, surface: Tensor) -> Tensor:
        h = torch.cat([fm_logits, self.surface(surface)], dim=1)
        out = fm_logits + self.mlp(h)
        # A task's logit is capped by its parent's (sigmoid is monotone, so the
        # probabilities keep the order); a chain a -> b -> c needs one pass per level.
        for _ in range(self.n_tasks - 1):
            out = torch.minimum(out, out.index_select(1, self.parent))
        return out
