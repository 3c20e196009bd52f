"""GEM: the foundation model that generates knowledge for downstream rankers.

    batch -> FeatureEmbedding -> Wukong stack (non-seq tokens)
          -> InterFormer layers (non-seq tokens x behavior sequences)
          -> trunk MLP -> `embedding` -> one tower per surface -> `logits` [B, T]
          (a task with `after: T` is chained: P(task) = P(T) * P(task | T), ESMM)
    user-side features -> user tower -> `user_embedding` (also a trunk input)

The `user_embedding` depends on user-side inputs only, so it is the same for every
candidate ad of a user and can be cached or shared by a ranker. It feeds the trunk,
which is how training shapes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.embedding import FeatureEmbedding, SequenceTokens
from model.features import EMBEDDING, LOGITS, USER_EMBEDDING
from model.interformer import InterFormer
from model.layers import MLP, chain_logits, masked_mean
from model.schema import SURFACE_INPUT, FeatureSchema
from model.wukong import WukongStack


class PooledSequences(nn.Module):
    """The ablation of InterFormer: each sequence mean-pooled into one token, then the
    same number of Wukong interaction layers over [non-seq tokens || pooled]."""

    def __init__(self, n_tokens: int, n_sequences: int, cfg: GEMConfig):
        super().__init__()
        self.interaction = WukongStack(
            n_tokens + n_sequences,
            cfg.d_model,
            layers=cfg.interformer_layers,
            fm_tokens=n_tokens // 2,
            lcb_tokens=n_tokens - n_tokens // 2,
            rank=cfg.wukong_fm_rank,
            hidden=cfg.wukong_mlp_hidden,
        )
        self.n_out = self.interaction.n_out

    def forward(self, x: Tensor, seqs: list[SequenceTokens]) -> Tensor:
        pooled = [masked_mean(s.tokens, s.mask).unsqueeze(1) for s in seqs]
        return self.interaction(torch.cat([x, *pooled], dim=1))


class GEM(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: GEMConfig):
        super().__init__()
        self.schema = schema
        self.cfg = cfg
        d = cfg.d_model
        self.embed = FeatureEmbedding(schema, cfg)
        self.wukong = WukongStack(
            self.embed.n_tokens,
            d,
            layers=cfg.wukong_layers,
            fm_tokens=cfg.wukong_fm_tokens,
            lcb_tokens=cfg.wukong_lcb_tokens,
            rank=cfg.wukong_fm_rank,
            hidden=cfg.wukong_mlp_hidden,
        )
        arch = InterFormer if cfg.sequence_arch == "interformer" else PooledSequences
        self.sequence = arch(self.wukong.n_out, len(schema.sequences), cfg)
        self.trunk = nn.Sequential(
            MLP([self.sequence.n_out * d + cfg.user_embedding_dim, cfg.trunk_hidden, cfg.embedding_dim]),
            nn.LayerNorm(cfg.embedding_dim),
        )
        n_tasks = len(schema.tasks)
        self.towers = nn.ModuleList(MLP([cfg.embedding_dim, cfg.tower_hidden, n_tasks]) for _ in schema.surfaces)
        # ESMM: the towers' columns of `after:` tasks are conditional logits.
        self.task_parents = schema.task_parents if cfg.esmm else (None,) * n_tasks

        # User tower inputs: the user-side sparse tokens, the user-side dense values
        # and a mean of each sequence's input tokens.
        self.user_sparse = [i for i, f in enumerate(schema.sparse) if f.side == "user"]
        self.user_dense = [f.name for f in schema.dense_on("user")]
        user_in = len(self.user_sparse) * d + len(self.user_dense) + len(schema.sequences) * d
        self.user_tower = nn.Sequential(
            MLP([user_in, cfg.trunk_hidden, cfg.user_embedding_dim]), nn.LayerNorm(cfg.user_embedding_dim)
        )

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        tokens, seqs = self.embed(batch)
        user_parts = [tokens[:, self.user_sparse].flatten(1)]
        if self.user_dense:
            user_parts.append(self.embed.dense_values(batch, self.user_dense))
        user_parts += [masked_mean(s.tokens, s.mask) for s in seqs]
        user_embedding = self.user_tower(torch.cat(user_parts, dim=1))

        h = self.sequence(self.wukong(tokens), seqs)
        embedding = self.trunk(torch.cat([h.flatten(1), user_embedding], dim=1))
        per_surface = torch.stack([tower(embedding) for tower in self.towers], dim=1)  # [B, S, T]
        surface = batch[SURFACE_INPUT].reshape(-1, 1, 1).expand(-1, 1, per_surface.shape[2])
        logits = chain_logits(torch.gather(per_surface, 1, surface).squeeze(1), self.task_parents)
        return {LOGITS: logits, EMBEDDING: embedding, USER_EMBEDDING: user_embedding}
