"""InterFormer layers (arXiv 2411.09852): sequence and non-sequence features learn
from each other in every layer, and the full sequence is kept across layers.

Each layer interleaves three archs:

- cross arch: summarizes both sides. The sequence side is summarized by its CLS
  tokens (which attend over the sequence), pooling by multi-head attention with
  learned queries (PMA), and the most recent events, gated; the non-sequence side
  by a gated linear compression of its tokens.
- interaction arch: a Wukong layer over [non-seq tokens || sequence summary], so
  non-sequence features see the behavior history.
- sequence arch: a personalized FFN whose input is modulated per example by the
  non-sequence summary (a scale/shift form of InterFormer's f(X_sum) S), then masked
  multi-head self-attention over [CLS || sequence].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import GEMConfig
from model.embedding import SequenceTokens
from model.layers import MLP, MultiHeadAttention, TokenMix
from model.wukong import WukongLayer


class Gate(nn.Module):
    """Element-wise sigmoid gate: x * sigmoid(W x)."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.proj(x))


def summary_tokens(cfg: GEMConfig) -> int:
    """Tokens of one sequence's summary (`SequenceSummary`): CLS, PMA and recent events."""
    return cfg.cls_tokens + cfg.pma_queries + cfg.recent_events


def interaction_arch(n_tokens: int, n_sequences: int, cfg: GEMConfig) -> WukongLayer:
    """The interaction arch of a layer: a Wukong layer over [non-seq tokens || every
    sequence's summary] back to `n_tokens` tokens (half FM block, half linear compression),
    so the layers stack."""
    return WukongLayer(
        n_tokens + n_sequences * summary_tokens(cfg),
        cfg.d_model,
        fm_tokens=n_tokens // 2,
        lcb_tokens=n_tokens - n_tokens // 2,
        rank=cfg.wukong_fm_rank,
        hidden=cfg.wukong_mlp_hidden,
    )


class SequenceSummary(nn.Module):
    """Cross arch, sequence side: [B, L, d] -> [B, cls + pma + recent, d]."""

    def __init__(self, cfg: GEMConfig):
        super().__init__()
        self.recent = cfg.recent_events
        self.queries = nn.Parameter(torch.randn(cfg.pma_queries, cfg.d_model) * 0.02)
        self.pma = MultiHeadAttention(cfg.d_model, cfg.heads)
        self.gate = Gate(cfg.d_model)
        self.n_tokens = summary_tokens(cfg)

    def forward(self, cls: Tensor, seq: SequenceTokens) -> Tensor:
        b, _, d = seq.tokens.shape
        nonempty = seq.mask.any(dim=1).to(seq.tokens.dtype)[:, None, None]
        # An empty sequence attends over padding only; its pooled tokens are zeroed.
        pooled = self.pma(self.queries.expand(b, -1, -1), seq.tokens, seq.mask) * nonempty
        # Padding rows of `tokens` are already zero; appending zeros makes the slice
        # valid for sequences shorter than `recent` without a data-dependent branch.
        padded = torch.cat([seq.tokens, seq.tokens.new_zeros(b, self.recent, d)], dim=1)
        recent = padded[:, : self.recent]
        return self.gate(torch.cat([cls, pooled, recent], dim=1))


class SequenceBlock(nn.Module):
    """Sequence arch: personalized FFN, then masked self-attention with CLS tokens."""

    def __init__(self, cfg: GEMConfig, summary_dim: int):
        super().__init__()
        d = cfg.d_model
        self.film = nn.Linear(summary_dim, 2 * d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = MLP([d, 2 * d, d])
        self.attn_norm = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, cfg.heads)

    def forward(self, cls: Tensor, seq: SequenceTokens, summary: Tensor) -> tuple[Tensor, SequenceTokens]:
        scale, shift = self.film(summary).unsqueeze(1).chunk(2, dim=-1)
        h = self.ffn_norm(seq.tokens) * (1 + scale) + shift
        tokens = seq.tokens + self.ffn(h)
        n_cls = cls.shape[1]
        x = torch.cat([cls, tokens], dim=1)
        keep = torch.cat([seq.mask.new_ones(seq.mask.shape[0], n_cls), seq.mask], dim=1)
        x = x + self.attn(self.attn_norm(x), self.attn_norm(x), keep)
        valid = seq.mask.unsqueeze(-1).to(x.dtype)
        return x[:, :n_cls], SequenceTokens(x[:, n_cls:] * valid, seq.mask)


class InterFormerLayer(nn.Module):
    """One layer over the non-seq tokens and every behavior sequence of the schema."""

    def __init__(self, n_tokens: int, n_sequences: int, cfg: GEMConfig):
        super().__init__()
        d = cfg.d_model
        self.summaries = nn.ModuleList(SequenceSummary(cfg) for _ in range(n_sequences))
        self.x_summary = TokenMix(n_tokens, cfg.pma_queries)
        self.x_gate = Gate(d)
        self.interaction = interaction_arch(n_tokens, n_sequences, cfg)
        self.sequence_blocks = nn.ModuleList(SequenceBlock(cfg, cfg.pma_queries * d) for _ in range(n_sequences))

    def forward(
        self, x: Tensor, cls: list[Tensor], seqs: list[SequenceTokens]
    ) -> tuple[Tensor, list[Tensor], list[SequenceTokens]]:
        seq_summaries = [m(c, s) for m, c, s in zip(self.summaries, cls, seqs, strict=True)]
        x_summary = self.x_gate(self.x_summary(x)).flatten(1)
        x = self.interaction(torch.cat([x, *seq_summaries], dim=1))
        updated = [m(c, s, x_summary) for m, c, s in zip(self.sequence_blocks, cls, seqs, strict=True)]
        return x, [c for c, _ in updated], [s for _, s in updated]


class InterFormer(nn.Module):
    """A stack of InterFormer layers.

    Returns the final non-seq tokens and the final summary of every sequence,
    concatenated along the token axis.
    """

    def __init__(self, n_tokens: int, n_sequences: int, cfg: GEMConfig):
        super().__init__()
        self.cls = nn.ParameterList(
            nn.Parameter(torch.randn(cfg.cls_tokens, cfg.d_model) * 0.02) for _ in range(n_sequences)
        )
        self.layers = nn.ModuleList(InterFormerLayer(n_tokens, n_sequences, cfg) for _ in range(cfg.interformer_layers))
        self.final_summaries = nn.ModuleList(SequenceSummary(cfg) for _ in range(n_sequences))
        self.n_out = n_tokens + n_sequences * summary_tokens(cfg)

    def forward(self, x: Tensor, seqs: list[SequenceTokens]) -> Tensor:
        cls = [c.expand(x.shape[0], -1, -1) for c in self.cls]
        for layer in self.layers:
            x, cls, seqs = layer(x, cls, seqs)
        summaries = [m(c, s) for m, c, s in zip(self.final_summaries, cls, seqs, strict=True)]
        return torch.cat([x, *summaries], dim=1)
