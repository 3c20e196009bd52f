"""The side trainer's plan stage (rank 0): what the next cycle does.

The oldest unprocessed shard n to train the FM on and the next one, n + 1, to validate
on (progressive validation: an FM cycle needs both), and the freshest shard for the
adapter; with only one new shard, the adapter alone is refreshed on it. A shard that
does not fit the schema is quarantined once it has stopped changing, and skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from export.contract import FM_MODEL
from export.repository import ModelRepository
from model.batch import Batch
from model.data.reader import DataError
from model.schema import FeatureSchema
from model.storage import Place
from trainer.config import TrainerConfig
from trainer.ledger import Ledger, QuarantineLine, TrainerRecord
from trainer.prometheus import TrainerMetrics
from trainer.stream import discover, fingerprint, load_shard, quarantine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    kind: str  # "fm", "adapter", "idle", "stop"
    # The FM cycle's number: every rank seeds its shuffling with it.
    cycle: int = 0
    train: str | None = None
    eval: str | None = None
    adapter: str | None = None


class Planner:
    """Reads the pending shards (each once, kept until processed) and plans the next cycle."""

    def __init__(
        self, cfg: TrainerConfig, schema: FeatureSchema, seq_len: int, ledger: Ledger, repo: ModelRepository,
        metrics: TrainerMetrics,
    ):  # fmt: skip
        self.cfg, self.schema, self.seq_len = cfg, schema, seq_len
        self.ledger, self.repo, self.metrics = ledger, repo, metrics
        self.batches: dict[str, Batch] = {}
        # Unreadable shards seen once: name -> (size, mtime) then.
        self.unsettled: dict[str, tuple[int, int]] = {}

    def _shard(self, path: Place) -> Batch | bool | None:
        """The shard's rows; None after quarantining it (or when it is gone); False when
        it cannot be read yet but may still be being written (look again after a poll)."""
        if path.name in self.batches:
            return self.batches[path.name]
        try:
            batch = load_shard(path, self.schema, self.seq_len)
        except DataError as e:
            seen = fingerprint(path)
            if seen is None:
                return None
            if self.unsettled.get(path.name) != seen:
                self.unsettled[path.name] = seen
                log.info("%s cannot be read (yet?): looking again in %.1fs", path.name, self.cfg.poll_s)
                return False
            del self.unsettled[path.name]
            line = QuarantineLine.of(path, str(e))
            quarantine(path, str(e))
            self.ledger.append(line.line())
            self.metrics.quarantined.inc()
            self.metrics.failures.labels("data").inc()
            return None
        self.unsettled.pop(path.name, None)
        self.batches[path.name] = batch
        return batch

    def plan(self, record: TrainerRecord, fm_cycles: int) -> Plan:
        """The next cycle after `record` (the current checkpoint's), `fm_cycles` FM
        cycles into this run."""
        if self.cfg.max_cycles is not None and fm_cycles >= self.cfg.max_cycles:
            return Plan("stop")
        pending = discover(self.cfg.source, self.ledger.done())
        self.metrics.pending_shards.set(len(pending))
        good: list[Place] = []
        for path in pending:
            got = self._shard(path)
            if got is False:
                return Plan("idle")  # the shards are taken in order: wait for this one
            if got is not None:
                good.append(path)
                if len(good) == 2:
                    break
        # The freshest shard that reads cleanly, for the adapter.
        fresh = next((p for p in reversed(pending) if p in good or isinstance(self._shard(p), dict)), None)
        names = {p.name for p in pending}
        self.batches = {k: v for k, v in self.batches.items() if k in names}  # keep only what is still pending
        if len(good) == 2:
            return Plan("fm", record.cycle + 1, good[0].name, good[1].name, fresh.name if fresh else None)
        if fresh is not None and fresh.name != record.adapter_shard and self.repo.latest(FM_MODEL) is not None:
            return Plan("adapter", adapter=fresh.name)
        return Plan("stop" if self.cfg.exit_when_idle else "idle")
