"""Which knowledge a student learns from, by flag: `hard`, `kd`, `aux`, `adapted`,
`repr`, `share` and `all`, combinable (`aux,repr`).

    hard      labels only
    kd        + distillation on GEM's labels, mixed into the serving head
    aux       + distillation through an auxiliary head (ExFM); the serving head sees
              the true labels only. The head is one linear layer on the serving
              tower's last layer (`aux_head="linear"`), or ExFM's auxiliary tower: its
              own MLP on the shared bottom (`aux_head="tower"`)
    adapted   the Student Adapter's labels are the teacher (through the serving head
              unless `aux` is also given)
    repr      GEM's `embedding` and `user_embedding` as input features
    share     GEM's embedding tables for the features in common, from a checkpoint
    all       aux + adapted + repr + share
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NAMES = ("hard", "kd", "aux", "adapted", "repr", "share", "all")
ALL = ("aux", "adapted", "repr", "share")
SHARE_MODES = ("finetune", "frozen")
AUX_HEADS = ("linear", "tower")


@dataclass(frozen=True)
class Variant:
    kd: bool = False
    aux: bool = False
    adapted: bool = False
    repr: bool = False
    share: bool = False
    # Distillation: loss = (1 - w) * hard + w * T^2 * BCE(student / T, teacher / T) on the
    # serving head (kd), or hard + w * T^2 * BCE(...) on the auxiliary head (aux).
    weight: float = 0.5
    temperature: float = 1.0
    share_mode: str = "finetune"
    aux_head: str = "linear"

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0 and self.distills:
            raise ValueError(f"distillation weight must be in (0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.share_mode not in SHARE_MODES:
            raise ValueError(f"share mode must be one of {', '.join(SHARE_MODES)}, got {self.share_mode!r}")
        if self.aux_head not in AUX_HEADS:
            raise ValueError(f"aux head must be one of {', '.join(AUX_HEADS)}, got {self.aux_head!r}")

    @property
    def distills(self) -> bool:
        return self.kd or self.aux or self.adapted

    @property
    def teacher(self) -> str | None:
        """The knowledge column prefix the teacher labels come from."""
        if not self.distills:
            return None
        return "adapted" if self.adapted else "knowledge"

    @property
    def needs_knowledge(self) -> bool:
        return self.distills or self.repr

    @property
    def name(self) -> str:
        flags = [n for n in ("kd", "aux", "adapted", "repr", "share") if getattr(self, n)]
        return ",".join(flags) or "hard"


def parse_variant(text: str, **options) -> Variant:
    """`"aux,repr"` -> Variant(aux=True, repr=True); `options`: weight, temperature,
    share_mode, aux_head."""
    flags: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if part not in NAMES:
            raise ValueError(f"unknown variant {part!r} (known: {', '.join(NAMES)})")
        flags |= set(ALL) if part == "all" else ({part} - {"hard"})
    switches: dict[str, Any] = dict.fromkeys(flags, True)
    return Variant(**switches, **options)
