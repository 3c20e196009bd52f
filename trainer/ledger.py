"""The ledger of processed shards: what makes the side trainer exactly-once.

`<state>/ledger.jsonl` holds one JSON line per event, appended and fsynced:

  {"kind": "shard", "shard": NAME, "size": BYTES, "sha256": HEX, "cycle": N, "checkpoint": C,
   "state": "trained"|"refused", "loss": L, "knowledge": {...}, ...}  an FM cycle's commit
  {"kind": "adapter", "shard": NAME, "size": BYTES, "sha256": HEX, "checkpoint": C, ...}
                                                                      an adapter-only commit
  {"kind": "quarantine", "shard": NAME, "size": BYTES, "sha256": HEX, "reason": TEXT}
  {"kind": "publish", "cycle": N, "checkpoint": C, "gem_fm": V | null, "student_adapter": W | null,
   "missed": {TRITON: WHY}, ...}                  "missed": only when a Triton was not reached
                                                  (the versions are published: it loads them
                                                  at its start); null: not published or refused

The commit order of a cycle (FM or adapter-only) is: train, gate, write checkpoint C
(`model.checkpoint.CheckpointStore`: its `trainer` record lists every shard it has
learned from or refused, and `commit` holds the ledger line below), then that commit
line, then publish (the versions say which checkpoint they came from), then the
`publish` line. A kill between any two steps is repaired on restart by `reconcile`, with
the checkpoint as the truth:

- a shard in the ledger but not in the checkpoint's record (cannot happen in this order,
  but a checkpoint restored by hand can cause it) is dropped from the ledger, so it is
  trained again, once, from the checkpoint;
- the checkpoint's commit line missing (killed after the checkpoint, before the line) is
  written from the checkpoint, as the cycle would have written it (size, sha256, loss);
- a commit whose publish line is missing (killed during the publish) is published
  again from the checkpoint: `pending_publish`; versions already published from it
  are kept, not published twice.

The stages write typed lines (`ShardCommit`, `AdapterCommit`, `QuarantineLine`,
`PublishLine`); the ledger keeps and reads them as the JSON objects they are.

A torn last line (kill -9 during the append) is skipped when the ledger is read, and cut
off before the next append: reading never writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyarrow.fs import FileType

from model.files import write_text_atomic
from model.storage import Place, info, place, sha256

log = logging.getLogger(__name__)

TRAINED = "trained"
REFUSED = "refused"
# The lines that commit a checkpoint.
COMMITS = ("shard", "adapter")


@dataclass(frozen=True)
class ShardId:
    """A shard by name, with what identifies its content (a rewritten file is noticed)."""

    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, path: str | Path | Place) -> ShardId:
        """A shard's identity: its name, size and content (local or s3://)."""
        where = place(path)
        return cls(where.name, info(where).size or 0, sha256(where))

    def fields(self) -> dict[str, Any]:
        return {"shard": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ShardCommit:
    """An FM cycle's commit line: the shard trained on (or refused) and its gate."""

    shard: ShardId
    cycle: int
    state: str  # TRAINED or REFUSED
    eval_shard: str
    reason: str
    loss: float
    examples: int
    examples_per_s: float
    # Task -> metric -> value, of the candidate and of the served version (None: none served).
    candidate: dict[str, dict[str, float]]
    serving: dict[str, dict[str, float]] | None
    serving_version: int | None
    # The knowledge committed for eval_shard (trainer/knowledge.py `summary`); None: none
    # asked, or nothing served to score it.
    knowledge: dict[str, Any] | None = None

    def line(self) -> dict[str, Any]:
        return {
            "kind": "shard", **self.shard.fields(), "cycle": self.cycle, "state": self.state,
            "eval_shard": self.eval_shard, "reason": self.reason, "loss": self.loss, "examples": self.examples,
            "examples_per_s": self.examples_per_s, "candidate": self.candidate, "serving": self.serving,
            "serving_version": self.serving_version, **({"knowledge": self.knowledge} if self.knowledge else {}),
        }  # fmt: skip


@dataclass(frozen=True)
class AdapterCommit:
    """An adapter-only cycle's commit line: the shard the adapter was refitted on."""

    shard: ShardId
    cycle: int

    def line(self) -> dict[str, Any]:
        return {"kind": "adapter", **self.shard.fields(), "cycle": self.cycle}


@dataclass(frozen=True)
class QuarantineLine:
    """A shard moved out of the stream because it does not fit the schema, and why."""

    shard: ShardId
    reason: str

    @classmethod
    def of(cls, path: str | Path | Place, reason: str) -> QuarantineLine:
        """Read before the shard is moved: its identity is its content where it was."""
        return cls(ShardId.of(path), reason)

    def line(self) -> dict[str, Any]:
        return {"kind": "quarantine", **self.shard.fields(), "reason": self.reason}


@dataclass(frozen=True)
class Committed:
    """A commit line as the publish stage reads it (written now, or found pending at start)."""

    kind: str  # "shard" or "adapter"
    shard: str
    # None in a line written before checkpoints were numbered.
    checkpoint: int | None
    cycle: int | None
    state: str | None = None

    @classmethod
    def of(cls, line: dict[str, Any]) -> Committed:
        return cls(line["kind"], line["shard"], line.get("checkpoint"), line.get("cycle"), line.get("state"))


@dataclass(frozen=True)
class PublishLine:
    cycle: int | None
    checkpoint: int | None
    error: str | None
    # Model -> the version published and served (None: not).
    versions: dict[str, int | None]
    # The Tritons that could not be reached (address -> why): they load the versions
    # when they start again, or at the next publish.
    missed: dict[str, str] = field(default_factory=dict)

    def line(self) -> dict[str, Any]:
        return {"kind": "publish", "cycle": self.cycle, "checkpoint": self.checkpoint, "error": self.error,
                **self.versions, **({"missed": self.missed} if self.missed else {})}  # fmt: skip


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


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The entries, and the length of the file up to the end of the last whole line."""
    if not path.exists():
        return [], 0
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
            log.warning("%s: skipping the torn last line (a kill during an append)", path)
    return entries, raw.rfind(b"\n") + 1


class Ledger:
    """The ledger, read at construction (never written until `append`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries, self._whole = _read_lines(self.path)

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        write_text_atomic(self.path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries), fsync=True)
        self.entries = list(entries)
        self._whole = self.path.stat().st_size

    def append(self, entry: dict[str, Any]) -> None:
        entry = {"ts": round(time.time(), 3), **entry}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            if f.tell() != self._whole:  # a torn last line: cut it off first
                f.truncate(self._whole)
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
            self._whole = f.tell()
        self.entries.append(entry)

    # -- queries ---------------------------------------------------------------------

    def shard_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("kind") == "shard"]

    def commits(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("kind") in COMMITS]

    def done(self) -> set[str]:
        """Shards the trainer must not take again: those an FM cycle trained on or refused.
        (A quarantined shard was moved out of the stream: a file delivered again under
        its name is new, and is read.)"""
        return {e["shard"] for e in self.shard_entries()}

    def quarantined(self) -> set[str]:
        return {e["shard"] for e in self.entries if e.get("kind") == "quarantine"}

    def pending_publish(self) -> dict[str, Any] | None:
        """The last commit line when its publish line is missing."""
        commits = self.commits()
        if not commits:
            return None
        last = commits[-1]
        if "checkpoint" not in last:  # written before checkpoints were numbered
            if last["kind"] != "shard":
                return None  # the old adapter line was written after its publish
            key = "cycle"
        else:
            key = "checkpoint"
        published = {e.get(key) for e in self.entries if e.get("kind") == "publish"}
        return None if last[key] in published else last

    # -- crash repair ---------------------------------------------------------------

    def reconcile(
        self, record: TrainerRecord, commit: dict[str, Any] | None = None, stream: Place | None = None
    ) -> list[str]:
        """Makes the ledger agree with the checkpoint: its `record` and its `commit` line.
        Returns what it changed."""
        changes = []
        in_ledger = {e["shard"]: e for e in self.shard_entries()}
        extra = [name for name in in_ledger if name not in record.processed]
        if extra:
            kept = [e for e in self.entries if not (e.get("kind") == "shard" and e["shard"] in extra)]
            self._rewrite(kept)
            changes += [f"{name}: in the ledger, not in the checkpoint: will be trained again" for name in extra]
        committed = {e.get("checkpoint") for e in self.commits()}
        own = commit["shard"] if commit is not None and commit["kind"] == "shard" else None
        for cycle, (name, state) in enumerate(record.processed.items(), start=1):
            if name not in in_ledger and name != own:
                # Not this checkpoint's own cycle: a ledger lost or edited by hand.
                path = stream / name if stream is not None else None
                sid = (
                    ShardId.of(path).fields()
                    if path is not None and info(path).type == FileType.File
                    else {"shard": name}
                )
                self.append({"kind": "shard", **sid, "state": state, "cycle": cycle, "repaired": True})
                changes.append(f"{name}: in the checkpoint, not in the ledger: line written")
        if commit is not None and commit.get("checkpoint") not in committed:
            self.append({**commit, "repaired": True})
            changes.append(f"{commit['shard']}: committed by checkpoint {commit['checkpoint']}: its line written")
        return changes
