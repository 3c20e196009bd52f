"""The side trainer's configuration and the layout of its state folder.

<state>/
  checkpoint -> checkpoints/<n>   the newest checkpoint (model.checkpoint.CheckpointStore)
  checkpoints/<n>/                weights, adapter, optimizer state, record of shards
  ledger.jsonl                    one line per commit, publish, quarantine (trainer/ledger.py)
  tmp/                            the exports' working files (emptied at every start)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.schema import DEFAULT_SCHEMA_PATH
from model.storage import Place, place
from trainer import distributed as D

LEDGER = "ledger.jsonl"


@dataclass(frozen=True)
class TrainerConfig:
    # A local folder or an s3:// URL (model/storage.py): `source` is its Place.
    stream: str | Path
    repository: Path
    # The trainer's own checkpoints and ledger.
    state_dir: Path = Path("artifacts/trainer")
    # The FM to start from when state_dir has no checkpoint yet; None: a fresh `preset`.
    checkpoint: Path | None = None
    preset: str = "small"
    schema_path: Path = DEFAULT_SCHEMA_PATH
    procs: int = 1
    strategy: str = "ddp"
    # Every Triton the new versions are loaded on (gRPC addresses); none: published only.
    triton_urls: tuple[str, ...] = ()
    keep: int = 3
    tolerance: float = 0.01
    metrics_port: int | None = None
    poll_s: float = 5.0
    max_cycles: int | None = None
    exit_when_idle: bool = False
    batch_size: int = 512
    lr: float = 2e-3
    embedding_lr: float = 0.05
    adapter_epochs: int = 3
    seed: int = 0
    # Where the served versions' knowledge of every shard the gate scores goes, as
    # `gem embed` writes it (trainer/knowledge.py); None: not written.
    knowledge_out: str | Path | None = None

    def __post_init__(self) -> None:
        if self.procs < 1:
            raise ValueError(f"--procs must be at least 1, got {self.procs}")
        if self.keep < 1:
            raise ValueError(f"--keep must be at least 1, got {self.keep}")
        if self.tolerance < 0:
            raise ValueError(f"--tolerance must be >= 0, got {self.tolerance}")
        D.check_strategy(self.strategy)

    @property
    def source(self) -> Place:
        """The stream's place (local or S3)."""
        return place(self.stream)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "tmp"
