"""The ledger of processed shards: what makes the side trainer exactly-once.

`<state>/ledger.jsonl` holds one JSON line per event, appended and fsynced:

  {"kind": "shard", "shard": NAME, "size": BYTES, "sha256": HEX, "cycle": N, "state": "trained"|"refused", ...}
  {"kind": "quarantine", "shard": NAME, "reason": TEXT}
  {"kind": "publish", "cycle": N, "fm_version": V | null, "adapter_version": W, ...}

The commit order of a cycle is: train, gate, write the checkpoint (temp folder, then one
rename; its `trainer` record lists every shard it has learned from or refused), then the
`shard` line, then publish, then the `publish` line. A kill between any two steps is
repaired on restart by `reconcile`, with the checkpoint as the truth:

- a shard in the ledger but not in the checkpoint's record (cannot happen in this order,
  but a checkpoint restored by hand can cause it) is dropped from the ledger, so it is
  trained again, once, from the checkpoint;
- a shard in the checkpoint's record but not in the ledger (killed after the rename,
  before the line) gets its line;
- a cycle whose shard line exists but whose publish line does not (killed during the
  publish) is published again from the checkpoint: `pending_publish`.

A torn last line (kill -9 during the append) is dropped when the ledger is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINED = "trained"
REFUSED = "refused"


@dataclass(frozen=True)
class ShardId:
    """A shard by name, with what identifies its content (a rewritten file is noticed)."""

    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> ShardId:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return cls(path.name, path.stat().st_size, h.hexdigest())


@dataclass(frozen=True)
class TrainerRecord:
    """What a checkpoint has learned: stored in its metrics.json under `trainer`."""

    cycle: int = 0
    # shard name -> TRAINED or REFUSED, in processing order.
    processed: dict[str, str] = field(default_factory=dict)
    # The freshest shard the Student Adapter was fitted on.
    adapter_shard: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cycle": self.cycle, "processed": dict(self.processed), "adapter_shard": self.adapter_shard}

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> TrainerRecord:
        raw = raw or {}
        return cls(int(raw.get("cycle", 0)), dict(raw.get("processed", {})), raw.get("adapter_shard"))


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1 :]):
                raise ValueError(f"{path}: line {i + 1} is not JSON (only a torn last line is repaired)") from None
            log.warning("%s: dropping the torn last line (a kill during an append)", path)
    return entries


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = _read_lines(self.path)
        # Rewrite once when a torn line was dropped, so that appends start on a clean line.
        if self.path.exists() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size:
            self._rewrite(self.entries)

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.entries = list(entries)

    def append(self, entry: dict[str, Any]) -> None:
        entry = {"ts": round(time.time(), 3), **entry}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    # -- queries ---------------------------------------------------------------------

    def shard_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("kind") == "shard"]

    def done(self) -> set[str]:
        """Shards the trainer must not take again: processed or quarantined."""
        return {e["shard"] for e in self.entries if e.get("kind") in ("shard", "quarantine")}

    def quarantined(self) -> set[str]:
        return {e["shard"] for e in self.entries if e.get("kind") == "quarantine"}

    def published_cycles(self) -> set[int]:
        return {int(e["cycle"]) for e in self.entries if e.get("kind") == "publish"}

    def pending_publish(self) -> dict[str, Any] | None:
        """The last processed shard's entry when its cycle's publish line is missing."""
        shards = self.shard_entries()
        if shards and int(shards[-1]["cycle"]) not in self.published_cycles():
            return shards[-1]
        return None

    # -- crash repair ---------------------------------------------------------------

    def reconcile(self, record: TrainerRecord, identify: dict[str, ShardId] | None = None) -> list[str]:
        """Makes the ledger agree with the checkpoint's record; returns what it changed."""
        changes = []
        in_ledger = {e["shard"]: e for e in self.shard_entries()}
        extra = [name for name in in_ledger if name not in record.processed]
        if extra:
            kept = [e for e in self.entries if not (e.get("kind") == "shard" and e["shard"] in extra)]
            self._rewrite(kept)
            changes += [f"{name}: in the ledger, not in the checkpoint: will be trained again" for name in extra]
        for cycle, (name, state) in enumerate(record.processed.items(), start=1):
            if name not in in_ledger:
                sid = (identify or {}).get(name)
                self.append(
                    {
                        "kind": "shard", "shard": name, "state": state, "cycle": cycle, "repaired": True,
                        **({"size": sid.size, "sha256": sid.sha256} if sid else {}),
                    }
                )  # fmt: skip
                changes.append(f"{name}: in the checkpoint, not in the ledger: line written")
        return changes
