"""What a streaming run is. Every weight, the temperature and the FM's settings are
fixed here, before any result was seen (issue 24: "never tune after seeing results");
only the hard baseline's passes and batch size are tuned, once, on a validation world.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.schema import DEFAULT_SCHEMA_PATH
from students.config import REFERENCE_CONFIG

# Student variants per arm ("aux" is ExFM's auxiliary tower; "aux-linear" today's head).
VARIANTS = ("hard", "kd", "aux", "aux-linear", "adapted", "aux,adapted", "repr", "share", "all")
# Controls of the losses, independent of the FM: the planted probability as the teacher,
# and the fresh FM's labels shuffled across the shard's rows.
CONTROLS = ("kd-oracle", "kd-shuffled", "aux-shuffled")
ARMS = ("fresh", "frozen")
# The hard baseline's grid (tuned once, on the validation world only): a shard of one
# vertical is ~5k rows, so small batches and several passes are in it (hard must not
# lose because it took too few steps).
PASSES_GRID = (1, 2, 4)
BATCH_GRID = (64, 128, 256, 512)


@dataclass(frozen=True)
class StreamConfig:
    rows: int = 240_000
    shards: int = 12
    users: int = 8_000
    ads: int = 3_000
    drift: float = 1.0
    seeds: int = 5
    # The student launches here (trains on it, then scores and trains each later shard).
    # At its last score the FM teaching it trained through shards [0, shards - 2): 10
    # shards of all surfaces against the student's 4 of one surface (~10x its rows).
    launch: int = 7
    # The frozen arm's FM stops after shards [0, freeze): mid-stream.
    freeze: int = 6
    # The FM: `tiny` (the budget: 5 seeds in 20 minutes on 2 cores), one pass per shard
    # at the side trainer's batch size and rates (`small`'s TRAINING_DEFAULTS: one pass
    # over fresh rows has nothing to memorize).
    preset: str = "tiny"
    fm_batch_size: int = 512
    fm_lr: float = 2e-3
    fm_embedding_lr: float = 0.05
    adapter_epochs: int = 3
    # The student: the reference features, on one vertical.
    surface: str = "reels"
    student_lr: float = 2e-3
    student_embedding_lr: float = 0.05
    # Distillation, fixed up front: an even mix for kd, the aux tower's loss at the same
    # weight, no softening (binary labels: T = 1 keeps the teacher's probability).
    kd_weight: float = 0.5
    temperature: float = 1.0
    variants: tuple[str, ...] = VARIANTS
    controls: tuple[str, ...] = CONTROLS
    passes_grid: tuple[int, ...] = PASSES_GRID
    batch_grid: tuple[int, ...] = BATCH_GRID
    # Seeds of the test worlds are 0..seeds-1; the validation world is its own.
    validation_seed: int = 1_000
    quick: bool = False
    config_path: Path = REFERENCE_CONFIG
    schema_path: Path = DEFAULT_SCHEMA_PATH
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.freeze <= self.launch - 1 or self.launch > self.shards - 2:
            raise ValueError("need 2 <= freeze < launch <= shards - 2 (a launch shard and at least one scored one)")
        if self.seeds < 2:
            raise ValueError("need at least 2 seeds for an interval")
        if "hard" not in self.variants:
            raise ValueError("the variants must include hard (every gain is over it)")
