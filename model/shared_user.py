"""The shared-user sequence arch: the user side runs once per user, not per candidate.

A ranking call is one user and hundreds of candidates. In the per-example InterFormer
the sequence arch's personalized FFN is conditioned on a summary of *all* non-sequence
tokens, ad included, so the whole history is re-encoded for every candidate. Here every
sequence-side computation depends on user-side inputs only:

- sequence arch (U rows): the personalized FFN is conditioned on a user-side summary
  (the user's sparse/dense tokens and the sequence's CLS tokens of the previous layer),
  then masked self-attention over [CLS || sequence], as in InterFormer;
- cross arch, sequence side (U rows): CLS, PMA and recent-event summaries per user;
- target attention (B rows, M-FALCON style): several queries made from each candidate's
  non-sequence tokens attend over the user's encoded history of that layer (keys and
  values are projected once per user and gathered by the index); the history never
  attends to the candidates;
- interaction arch (B rows): a Wukong layer over [non-seq tokens || the user's sequence
  summaries || the candidate's target-attention tokens].

`index` [B] maps each candidate row to its user row; `None` is the identity (U = B),
which is how training calls it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.embedding import SequenceTokens
from model.interformer import Gate, SequenceBlock, SequenceSummary
from model.layers import TokenMix, attention_bias
from model.wukong import WukongLayer


def take(x: Tensor, index: Tensor | None) -> Tensor:
    """Rows of `x` by `index` (a Gather in ONNX); `None` keeps `x`."""
    return x if index is None else x.index_select(0, index)


class TargetAttention(nn.Module):
    """Candidate tokens [B, N, d] -> `target_queries` tokens that read the user's history.

    The keys/values are projected on the user rows (`project`, U times) and gathered to
    the candidate rows; an empty history yields zeros.
    """

    def __init__(self, n_tokens: int, cfg: GEMConfig):
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.heads
        self.head_dim = d // cfg.heads
        self.make_queries = TokenMix(n_tokens, cfg.target_queries)
        self.query_bias = nn.Parameter(torch.randn(cfg.target_queries, d) * 0.02)
        self.q_norm = nn.LayerNorm(d)
        self.kv_norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.gate = Gate(d)
        self.n_tokens = cfg.target_queries

    def _split(self, x: Tensor) -> Tensor:  # [B, L, d] -> [B, h, L, dh]
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def project(self, seq: SequenceTokens) -> Tensor:
        """User side: keys and values of the history, [U, L, 2d]."""
        return self.kv(self.kv_norm(seq.tokens))

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        """x [B, N, d]; kv [B, L, 2d] and mask [B, L]: the candidate's user's history."""
        queries = self.make_queries(x) + self.query_bias
        q = self._split(self.q(self.q_norm(queries)))
        k, v = kv.chunk(2, dim=-1)
        ctx = nn.functional.scaled_dot_product_attention(
            q, self._split(k), self._split(v), attn_mask=attention_bias(mask, q.dtype)
        )
        b, _, lq, _ = ctx.shape
        nonempty = mask.any(dim=1).to(ctx.dtype)[:, None, None]
        return self.gate(self.out(ctx.transpose(1, 2).reshape(b, lq, -1)) * nonempty + queries)


class UserSummary(nn.Module):
    """User-side summary for the personalized FFN: [user tokens || CLS] -> [U, k*d]."""

    def __init__(self, n_user_tokens: int, cfg: GEMConfig):
        super().__init__()
        self.mix = TokenMix(n_user_tokens + cfg.cls_tokens, cfg.pma_queries)
        self.gate = Gate(cfg.d_model)

    def forward(self, user_tokens: Tensor, cls: Tensor) -> Tensor:
        return self.gate(self.mix(torch.cat([user_tokens, cls], dim=1))).flatten(1)


class SharedUserLayer(nn.Module):
    def __init__(self, n_tokens: int, n_user_tokens: int, n_sequences: int, cfg: GEMConfig):
        super().__init__()
        d = cfg.d_model
        self.summaries = nn.ModuleList(SequenceSummary(cfg) for _ in range(n_sequences))
        self.targets = nn.ModuleList(TargetAttention(n_tokens, cfg) for _ in range(n_sequences))
        summary_tokens = sum(s.n_tokens for s in self.summaries) + sum(t.n_tokens for t in self.targets)
        self.interaction = WukongLayer(
            n_tokens + summary_tokens,
            d,
            fm_tokens=n_tokens // 2,
            lcb_tokens=n_tokens - n_tokens // 2,
            rank=cfg.wukong_fm_rank,
            hidden=cfg.wukong_mlp_hidden,
        )
        self.user_summaries = nn.ModuleList(UserSummary(n_user_tokens, cfg) for _ in range(n_sequences))
        self.sequence_blocks = nn.ModuleList(SequenceBlock(cfg, cfg.pma_queries * d) for _ in range(n_sequences))

    def forward(
        self, x: Tensor, user_tokens: Tensor, cls: list[Tensor], seqs: list[SequenceTokens], index: Tensor | None
    ) -> tuple[Tensor, list[Tensor], list[SequenceTokens]]:
        # User side, U rows: summaries of the history and its keys/values.
        summaries = [take(m(c, s), index) for m, c, s in zip(self.summaries, cls, seqs, strict=True)]
        # Candidate side, B rows: target attention, then the interaction arch.
        targets = [
            t(x, take(t.project(s), index), take(s.mask, index)) for t, s in zip(self.targets, seqs, strict=True)
        ]
        x = self.interaction(torch.cat([x, *summaries, *targets], dim=1))
        # User side: the personalized FFN conditioned on the user, then self-attention.
        updated = [
            block(c, s, summary(user_tokens, c))
            for block, summary, c, s in zip(self.sequence_blocks, self.user_summaries, cls, seqs, strict=True)
        ]
        return x, [c for c, _ in updated], [s for _, s in updated]


class SharedUserInterFormer(nn.Module):
    """A stack of shared-user layers; returns [B, n_out, d] like `InterFormer`."""

    def __init__(self, n_tokens: int, n_user_tokens: int, n_sequences: int, cfg: GEMConfig):
        super().__init__()
        self.cls = nn.ParameterList(
            nn.Parameter(torch.randn(cfg.cls_tokens, cfg.d_model) * 0.02) for _ in range(n_sequences)
        )
        self.layers = nn.ModuleList(
            SharedUserLayer(n_tokens, n_user_tokens, n_sequences, cfg) for _ in range(cfg.interformer_layers)
        )
        self.final_summaries = nn.ModuleList(SequenceSummary(cfg) for _ in range(n_sequences))
        self.final_targets = nn.ModuleList(TargetAttention(n_tokens, cfg) for _ in range(n_sequences))
        self.n_out = (
            n_tokens + sum(s.n_tokens for s in self.final_summaries) + sum(t.n_tokens for t in self.final_targets)
        )

    def forward(self, x: Tensor, user_tokens: Tensor, seqs: list[SequenceTokens], index: Tensor | None) -> Tensor:
        """x [B, N, d] candidate tokens; user_tokens [U, Nu, d]; seqs over U rows."""
        cls = [c.expand(user_tokens.shape[0], -1, -1) for c in self.cls]
        for layer in self.layers:
            x, cls, seqs = layer(x, user_tokens, cls, seqs, index)
        summaries = [take(m(c, s), index) for m, c, s in zip(self.final_summaries, cls, seqs, strict=True)]
        targets = [
            t(x, take(t.project(s), index), take(s.mask, index)) for t, s in zip(self.final_targets, seqs, strict=True)
        ]
        return torch.cat([x, *summaries, *targets], dim=1)
