"""GEM: the foundation model that generates knowledge for downstream rankers.

    batch -> FeatureEmbedding -> Wukong stack (non-seq tokens)
          -> InterFormer layers (non-seq tokens x behavior sequences)
          -> trunk MLP -> `embedding` -> one tower per surface -> `logits` [B, T]
          (a task with `after: T` is chained: P(task) = P(T) * P(task | T), ESMM)
    user-side features -> user tower -> `user_embedding` (also a trunk input)

The `user_embedding` depends on user-side inputs only, so it is the same for every
candidate ad of a user and can be cached or shared by a ranker. It feeds the trunk,
which is how training shapes it.

The batch may be user-indexed (`model.features.USER_INDEX`): user-side inputs with U
rows, the others with B rows, `user_index` [B] mapping each candidate to its user.
With `sequence_arch="shared_user"` the user side (history, user tower) then runs U
times; the per-example archs gather the user rows to B first. Without the index every
row is its own user.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.embedding import FeatureEmbedding, SequenceTokens
from model.features import USER_INDEX, user_input_names
from model.interformer import InterFormer
from model.layers import MLP, chain_logits, masked_mean
from model.outputs import EMBEDDING, LOGITS, USER_EMBEDDING
from model.schema import SURFACE_INPUT, FeatureSchema
from model.shared_user import SharedUserInterFormer, take
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
        self.user_inputs = user_input_names(schema)
        self.shared = cfg.sequence_arch == "shared_user"
        # User-side tokens for the shared arch: the user's sparse tokens and (if any)
        # one token of the user's dense values.
        user_sparse_names = [f.name for f in schema.sparse_on("user")]
        self.user_token_names = user_sparse_names
        self.sequence_inputs = frozenset(
            n for q in schema.sequences for n in (q.length_name, *(f.name for f in q.fields))
        )
        n_user_dense = len(schema.dense_on("user"))
        if self.shared:
            self.user_dense_token = nn.Linear(n_user_dense, d) if n_user_dense else None
            n_user_tokens = len(user_sparse_names) + (1 if n_user_dense else 0)
            self.sequence: SharedUserInterFormer | InterFormer | PooledSequences = SharedUserInterFormer(
                self.wukong.n_out, n_user_tokens, len(schema.sequences), cfg
            )
        else:
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
        index = batch.get(USER_INDEX)
        if self.shared:
            batch, h, user_embedding = self._shared_user(batch, index)
        else:
            if index is not None:
                batch = {k: take(v, index) if k in self.user_inputs else v for k, v in batch.items()}
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

    def _shared_user(self, batch: dict[str, Tensor], index: Tensor | None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The shared-user arch: the user side on U rows, the candidates on B rows.
        Returns the batch with the non-sequence user inputs on B rows, the sequence
        arch's tokens [B, n_out, d] and the user embedding [B, Du]."""
        users = batch
        if index is not None:
            # Non-sequence user inputs to B rows (a few ids and values per candidate): the
            # embedding and Wukong see whole examples; the sequences stay on U rows.
            keep = self.sequence_inputs
            batch = {k: take(v, index) if k in self.user_inputs and k not in keep else v for k, v in batch.items()}
        tokens, seqs = self.embed(batch)  # tokens [B, N, d], seqs [U, L, d]
        user_tokens = [self.embed.sparse[n](users[n]) for n in self.user_token_names]
        user_parts = [torch.stack(user_tokens, dim=1).flatten(1)] if user_tokens else []
        if self.user_dense:
            dense = self.embed.dense_values(users, self.user_dense)
            user_parts.append(dense)
            # The token's layer exists exactly when there are user dense features.
            assert self.user_dense_token is not None
            user_tokens.append(self.user_dense_token(dense))
        user_parts += [masked_mean(s.tokens, s.mask) for s in seqs]
        user_embedding = take(self.user_tower(torch.cat(user_parts, dim=1)), index)
        u = user_parts[0].shape[0]
        user_tokens_t = torch.stack(user_tokens, dim=1) if user_tokens else tokens.new_zeros(u, 0, tokens.shape[2])
        return batch, self.sequence(self.wukong(tokens), user_tokens_t, seqs, index), user_embedding
