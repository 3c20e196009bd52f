"""GEM model configuration: one dataclass, presets from CPU-test size to GPU size.

Scaling the model (layers, widths, heads, sequence length) is a config change, never a
code change: every module reads its sizes from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

# shared_user (the presets' default): the sequence side depends on user-side inputs only
#   and runs once per user; candidates meet the history through target attention
#   (M-FALCON) and the interaction arch. Takes user-indexed batches
#   (model.features.share_users). 9.75x the examples/s of interformer for a ranker's
#   call of one user (bench/README.md); on `small`, five seeds each, its mean test AUC
#   is 0.002 / 0.004 above interformer's (click / conversion).
# interformer: per-example InterFormer (every candidate runs the whole sequence arch),
#   what GEM was before; with nothing shared (every row its own user) both run at the
#   same speed.
# mean_pool: the ablation (each sequence mean-pooled into one token).
SequenceArch = Literal["interformer", "shared_user", "mean_pool"]
SEQUENCE_ARCHS = ("interformer", "shared_user", "mean_pool")


@dataclass(frozen=True)
class GEMConfig:
    d_model: int = 32
    # Dense features -> MLP -> this many tokens.
    dense_tokens: int = 2
    # Wukong stack over the non-sequence tokens.
    wukong_layers: int = 2
    wukong_fm_rank: int = 8  # k in the optimized FM block X (X^T Y), Y: [N, k]
    wukong_fm_tokens: int = 8  # tokens out of the FM block
    wukong_lcb_tokens: int = 8  # tokens out of the linear compression block
    wukong_mlp_hidden: int = 128
    # InterFormer: sequence/cross/interaction layers.
    sequence_arch: SequenceArch = "shared_user"
    interformer_layers: int = 2
    heads: int = 4
    seq_len: int = 128  # newest events the model reads (prefix of the sequence)
    cls_tokens: int = 2
    pma_queries: int = 2  # pooling by multi-head attention, learned queries
    recent_events: int = 4
    # shared_user: candidate queries of the target attention over each sequence's final
    # states (the experiments that chose 16, and 4 for `tiny`: model/shared_user.py).
    target_queries: int = 16
    # Shared trunk and heads.
    trunk_hidden: int = 256
    embedding_dim: int = 64  # the `embedding` output
    user_embedding_dim: int = 32  # the `user_embedding` output
    tower_hidden: int = 64
    # Tasks with `after: T` in the schema: True predicts P(task | T) and outputs
    # P(task) = P(T) * P(task | T) (ESMM); False gives every task an independent head.
    esmm: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.sequence_arch not in SEQUENCE_ARCHS:
            raise ValueError(f"sequence_arch must be one of {', '.join(SEQUENCE_ARCHS)}, got {self.sequence_arch!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
                raise ValueError(f"{f.name} must be positive, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GEMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown model config key {unknown[0]!r}")
        return cls(**raw)

    def with_(self, **changes: Any) -> GEMConfig:
        return replace(self, **changes)

    @property
    def user_indexed(self) -> bool:
        """Whether the model's exported graph takes user-indexed batches."""
        return self.sequence_arch == "shared_user"


PRESETS: dict[str, GEMConfig] = {
    # Seconds on a CPU: unit tests.
    "tiny": GEMConfig(
        d_model=16,
        dense_tokens=1,
        wukong_layers=1,
        wukong_fm_rank=4,
        wukong_fm_tokens=4,
        wukong_lcb_tokens=4,
        wukong_mlp_hidden=32,
        interformer_layers=1,
        heads=2,
        seq_len=32,
        cls_tokens=1,
        pma_queries=1,
        recent_events=2,
        target_queries=4,
        trunk_hidden=64,
        embedding_dim=32,
        user_embedding_dim=16,
        tower_hidden=32,
    ),
    # The local demo: minutes to train on 2 cores.
    "small": GEMConfig(),
    # GPU sizes.
    "medium": GEMConfig(
        d_model=128,
        dense_tokens=4,
        wukong_layers=4,
        wukong_fm_rank=24,
        wukong_fm_tokens=16,
        wukong_lcb_tokens=16,
        wukong_mlp_hidden=1024,
        interformer_layers=4,
        heads=8,
        seq_len=256,
        cls_tokens=4,
        pma_queries=4,
        recent_events=8,
        trunk_hidden=1024,
        embedding_dim=256,
        user_embedding_dim=128,
        tower_hidden=256,
    ),
    "large": GEMConfig(
        d_model=512,
        dense_tokens=8,
        wukong_layers=8,
        wukong_fm_rank=64,
        wukong_fm_tokens=32,
        wukong_lcb_tokens=32,
        wukong_mlp_hidden=4096,
        interformer_layers=6,
        heads=16,
        seq_len=256,
        cls_tokens=8,
        pma_queries=8,
        recent_events=16,
        trunk_hidden=4096,
        embedding_dim=512,
        user_embedding_dim=256,
        tower_hidden=1024,
    ),
}


def preset(name: str) -> GEMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
