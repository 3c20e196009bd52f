"""`gem trainer status`: what the side trainer has done, read from its ledger (never written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from trainer.config import LEDGER
from trainer.ledger import REFUSED, TRAINED, Ledger


def status(state_dir: Path, repository: Path) -> dict[str, Any]:
    ledger = Ledger(state_dir / LEDGER)
    shards = ledger.shard_entries()
    publishes = [e for e in ledger.entries if e.get("kind") == "publish"]
    repo = ModelRepository(repository)
    return {
        "cycles": max((int(e["cycle"]) for e in shards), default=0),
        "trained": sum(e["state"] == TRAINED for e in shards),
        "refused": sum(e["state"] == REFUSED for e in shards),
        "quarantined": sorted(ledger.quarantined()),
        "last_shard": shards[-1] if shards else None,
        "last_publish": publishes[-1] if publishes else None,
        "versions": {m: repo.versions(m) for m in (FM_MODEL, ADAPTER_MODEL)},
    }
