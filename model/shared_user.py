"""The shared-user sequence arch: the user side runs once per user, not per candidate.

A ranking call is one user and hundreds of candidates. In the per-example InterFormer
the sequence arch's personalized FFN is conditioned on a summary of *all* non-sequence
tokens, ad included, so the whole history is re-encoded for every candidate. Here every
sequence-side computation depends on user-side inputs only:

- sequence arch (U rows): the personalized FFN is conditioned on a user-side summary
  (the user's sparse/dense tokens and the sequence's CLS tokens of the previous layer),
  then masked self-attention over [CLS || sequence], as in InterFormer;
- cross arch, sequence side (U rows): CLS, PMA and recent-event summaries per user;
- interaction arch (B rows): a Wukong layer over [non-seq tokens || the user's sequence
  summaries];
- after the last layer, target attention (B rows, M-FALCON style): `target_queries`
  queries made from each candidate's tokens attend over [a learned sink || the user's
  encoded history] (keys and values projected once per user, gathered by the index);
  the history never attends to the candidates.

Why target attention once, after the stack, with many queries (`target_queries`), and a
learned sink: of the variants measured on the synthetic data it scored best, for less
compute per candidate than 8 queries at every layer; `tiny` takes 4 (bench/README.md,
`bench.shared_user`).

`index` [B] maps each candidate row to its user row; `None` is the identity (U = B),
which is how training calls it.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.embedding import SequenceTokens
from model.interformer import Gate, SequenceBlock, SequenceSummary, interaction_arch, summary_tokens
from model.layers import TokenMix, attention_bias


def take(x: Tensor, index: Tensor | None) -> Tensor:
    """Rows of `x` by `index` (a Gather in ONNX); `None` keeps `x`."""
    return x if index is None else x.index_select(0, index)


class TargetAttention(nn.Module):
    """Candidate tokens [B, N, d] -> `target_queries` tokens that read the user's history.

    The keys/values are projected on the user rows (`project`, U times) and gathered to
    the candidate rows. A learned sink key/value is always attended too: softmax weights
    sum to one, so without it a candidate matching no event would still read a full
    average of the history; with it, how much of the history matches shows in the
    output (InterFormer's CLS tokens play that part in its self-attention). An empty
    history reads the sink alone.
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
        self.sink = nn.Parameter(torch.randn(1, 1, 2 * d) * 0.02)
        self.out = nn.Linear(d, d)
        self.gate = Gate(d)
        self.n_tokens = cfg.target_queries

    def _split(self, x: Tensor) -> Tensor:  # [B, L, d] -> [B, h, L, dh]
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def project(self, seq: SequenceTokens) -> tuple[Tensor, Tensor]:
        """User side, U rows: keys [U, h, dh + 1, 1 + L] and values [U, h, 1 + L, dh] of
        [sink || history].

        Everything that does not depend on the candidate is done here, once per user:
        the head split, the keys' transpose, and the padding mask, which rides as an
        extra key row (0 kept, the lowest float masked) that each query meets with a
        constant 1 (`forward`). The candidate side is then a gather, two batched matmuls
        and a softmax: what ONNX Runtime's profile showed to be the cost of a call of
        many candidates of one user (bench/README.md, `bench.shared_user`).
        """
        kv = self.kv(self.kv_norm(seq.tokens))
        k, v = torch.cat([self.sink.expand(kv.shape[0], -1, -1), kv], dim=1).chunk(2, dim=-1)
        keep = torch.cat([seq.mask.new_ones(seq.mask.shape[0], 1), seq.mask], dim=1)
        mask_row = attention_bias(keep, k.dtype).expand(-1, self.heads, -1, -1)  # [U, h, 1, 1 + L]
        return torch.cat([self._split(k).transpose(2, 3), mask_row], dim=2), self._split(v)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """x [B, N, d]; keys and values (`project`) of each candidate's user, B rows."""
        queries = self.make_queries(x) + self.query_bias
        q = self._split(self.q(self.q_norm(queries))) * self.head_dim**-0.5
        scores = nn.functional.pad(q, (0, 1), value=1.0) @ keys  # + the mask row
        ctx = torch.softmax(scores, dim=-1) @ values
        b, _, lq, _ = ctx.shape
        return self.gate(self.out(ctx.transpose(1, 2).reshape(b, lq, -1)) + queries)


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
        self.interaction = interaction_arch(n_tokens, n_sequences, cfg)
        self.user_summaries = nn.ModuleList(UserSummary(n_user_tokens, cfg) for _ in range(n_sequences))
        self.sequence_blocks = nn.ModuleList(SequenceBlock(cfg, cfg.pma_queries * d) for _ in range(n_sequences))

    def forward(
        self, x: Tensor, user_tokens: Tensor, cls: list[Tensor], seqs: list[SequenceTokens], index: Tensor | None
    ) -> tuple[Tensor, list[Tensor], list[SequenceTokens]]:
        # User side, U rows: summaries of the history, gathered to the candidates' rows.
        summaries = [take(m(c, s), index) for m, c, s in zip(self.summaries, cls, seqs, strict=True)]
        # Candidate side, B rows: the interaction arch.
        x = self.interaction(torch.cat([x, *summaries], dim=1))
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
        self.targets = nn.ModuleList(TargetAttention(n_tokens, cfg) for _ in range(n_sequences))
        self.n_out = n_tokens + n_sequences * (summary_tokens(cfg) + cfg.target_queries)

    def forward(self, x: Tensor, user_tokens: Tensor, seqs: list[SequenceTokens], index: Tensor | None) -> Tensor:
        """x [B, N, d] candidate tokens; user_tokens [U, Nu, d]; seqs over U rows."""
        cls = [c.expand(user_tokens.shape[0], -1, -1) for c in self.cls]
        for layer in self.layers:
            x, cls, seqs = layer(x, user_tokens, cls, seqs, index)
        summaries = [take(m(c, s), index) for m, c, s in zip(self.final_summaries, cls, seqs, strict=True)]
        targets = [
            t(x, *(take(kv, index) for kv in cast(TargetAttention, t).project(s)))
            for t, s in zip(self.targets, seqs, strict=True)
        ]
        return torch.cat([x, *summaries, *targets], dim=1)
