"""The side trainer's commit stage (rank 0): a cycle made durable.

A commit is a new numbered checkpoint (weights, adapter, optimizer state, the record of
shards and its own ledger line, `model.checkpoint.CheckpointStore`), then that line in
the ledger (trainer/ledger.py says how a kill between the two is repaired).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.checkpoint import Checkpoint, CheckpointStore, ModelBundle
from trainer.ledger import AdapterCommit, Ledger, ShardCommit, TrainerRecord


class Committer:
    """The current checkpoint: its path, its record, its commit line, its optimizer state."""

    def __init__(self, store: CheckpointStore, ledger: Ledger, ckpt: Checkpoint, resumed: bool):
        self.store, self.ledger = store, ledger
        self.record = TrainerRecord.from_dict(ckpt.metrics.get("trainer")) if resumed else TrainerRecord()
        self.checkpoint: Path | None = ckpt.path if resumed else None
        self.line: dict[str, Any] | None = ckpt.metrics.get("commit") if resumed else None
        self.optimizer_state = ckpt.optimizer if resumed else None

    def commit(
        self, record: TrainerRecord, entry: ShardCommit | AdapterCommit, extra: dict[str, Any], bundle: ModelBundle,
        optimizer_state: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:  # fmt: skip
        """A new checkpoint holding `record` and its ledger line, then the line; returns the line."""
        number = self.store.next_number()
        line = {**entry.line(), "checkpoint": number}
        metrics = {"trainer": record.to_dict(), "commit": line, **extra}
        self.checkpoint = self.store.save(number, bundle, metrics, optimizer_state)
        self.record, self.line, self.optimizer_state = record, line, optimizer_state
        self._record_commit(line)
        return line

    # Its own step: the fault-injection tests kill the trainer just before it.
    def _record_commit(self, line: dict[str, Any]) -> None:
        self.ledger.append(line)
