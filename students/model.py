"""The reference student: a DLRM-style ranker with a serving head and an auxiliary head.

    sparse ids   -> hashed tables (the FM schema's buckets and widths) -> d-dim tokens
    newest events of the history -> one token per event (its fields' tables summed)
    dense        -> bottom MLP -> one token;  surface -> one token
    [repr]       GEM's embedding and user_embedding -> one token each (linear)
    all tokens: pairwise dot products (DLRM) || the dense token || [repr vectors]
      -> top MLP -> h -> serving head  [B, T]   (what the vertical ranks with)
                     -> auxiliary head [B, T]   (ExFM: where the teacher is distilled)
      or, with `aux_tower`, the auxiliary head on its own MLP from the same
      interaction features (ExFM's auxiliary tower on the shared bottom: the teacher
      reaches the tables and the bottom MLP, never the serving tower)

The tables are named `tables.<feature>` (hashed as the FM's `HashedEmbedding`), so that
`students.share` can load the FM's table of the same feature by name.
"""

from __future__ import annotations

import operator
from functools import reduce

import torch
from torch import Tensor, nn

from model.layers import MLP
from model.outputs import EMBEDDING, USER_EMBEDDING
from model.schema import SURFACE_INPUT, FeatureSchema
from students.config import StudentConfig

SERVING = "logits"
AUX = "aux_logits"


class HashedTable(nn.Module):
    """`model.layers.HashedEmbedding` (ids hashed by `id mod buckets`, the parameter
    named `table.weight`) with sparse gradients: a step touches the rows of its ids only,
    not a 100k-row table (Adagrad takes sparse gradients)."""

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim, sparse=True)
        nn.init.normal_(self.table.weight, std=dim**-0.5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(torch.remainder(ids, self.buckets))


class Student(nn.Module):
    def __init__(
        self,
        schema: FeatureSchema,
        cfg: StudentConfig,
        repr_widths: tuple[int, int] | None = None,
        aux_tower: bool = False,
    ):
        """`schema`: the student's sub-schema (StudentConfig.sub_schema); `repr_widths`:
        (embedding, user_embedding) widths when GEM's embeddings are inputs; `aux_tower`:
        the auxiliary head on its own tower (the serving tower's widths)."""
        super().__init__()
        self.schema, self.cfg, self.repr_widths, self.aux_tower = schema, cfg, repr_widths, aux_tower
        d = cfg.dim
        self.sparse_names = [f.name for f in schema.sparse]
        self.dense_names = [f.name for f in schema.dense]
        self.seq = schema.sequences[0] if schema.sequences else None
        specs = list(schema.sparse) + (list(self.seq.fields) if self.seq else [])
        self.tables = nn.ModuleDict({f.name: HashedTable(f.buckets, f.dim) for f in specs})
        self.project = nn.ModuleDict({f.name: nn.Linear(f.dim, d, bias=False) for f in specs if f.dim != d})
        self.surface = nn.Embedding(len(schema.surfaces), d)
        if self.seq:
            self.recency = nn.Parameter(torch.randn(self.seq.max_length, d) * 0.02)
        n_tokens = len(schema.sparse) + (self.seq.max_length if self.seq else 0) + 1
        if self.dense_names:
            self.bottom = MLP([len(self.dense_names), 2 * d, d])
            n_tokens += 1
        extra = d if self.dense_names else 0
        if repr_widths:
            self.repr_in = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d)) for w in repr_widths)
            n_tokens += len(repr_widths)
            extra += sum(repr_widths)
        self.n_tokens = n_tokens
        self.pairs = torch.triu_indices(n_tokens, n_tokens, offset=1)
        n_tasks = len(schema.tasks)
        self.top = nn.Sequential(MLP([self.pairs.shape[1] + extra, *cfg.top]), nn.GELU())
        self.serving_head = nn.Linear(cfg.top[-1], n_tasks)
        self.aux_head = nn.Linear(cfg.top[-1], n_tasks)
        if aux_tower:
            self.aux_top = nn.Sequential(MLP([self.pairs.shape[1] + extra, *cfg.top]), nn.GELU())

    def _embed(self, name: str, ids: Tensor) -> Tensor:
        x = self.tables[name](ids)
        return self.project[name](x) if name in self.project else x

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        tokens = [self._embed(n, batch[n]) for n in self.sparse_names]
        tokens.append(self.surface(batch[SURFACE_INPUT]))
        flat: list[Tensor] = []
        if self.seq:
            k = self.seq.max_length
            events = reduce(operator.add, (self._embed(f.name, batch[f.name][:, :k]) for f in self.seq.fields))
            width = events.shape[1]
            mask = torch.arange(width, device=events.device)[None, :] < batch[self.seq.length_name][:, None]
            events = (events + self.recency[:width]) * mask.unsqueeze(-1).to(events.dtype)
            if width < k:  # a batch whose longest history is shorter than k
                events = nn.functional.pad(events, (0, 0, 0, k - width))
            tokens.extend(events.unbind(1))
        if self.dense_names:
            dense = self.bottom(torch.stack([batch[n] for n in self.dense_names], dim=1))
            tokens.append(dense)
            flat.append(dense)
        if self.repr_widths:
            for layer, name in zip(self.repr_in, (EMBEDDING, USER_EMBEDDING), strict=True):
                tokens.append(layer(batch[name]))
                flat.append(batch[name])
        x = torch.stack(tokens, dim=1)  # [B, N, d]
        dots = torch.bmm(x, x.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        bottom = torch.cat([dots, *flat], dim=1)
        h = self.top(bottom)
        aux = self.aux_head(self.aux_top(bottom) if self.aux_tower else h)
        return {SERVING: self.serving_head(h), AUX: aux}

    def input_names(self) -> list[str]:
        names = [*self.sparse_names, SURFACE_INPUT, *self.dense_names]
        if self.seq:
            names += [f.name for f in self.seq.fields] + [self.seq.length_name]
        if self.repr_widths:
            names += [EMBEDDING, USER_EMBEDDING]
        return names
