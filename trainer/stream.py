"""The stream of logged examples: Parquet shards arriving in a folder over time.

The producers' contract (README, "Side trainer"): a producer (the logging pipeline, or
`gem data stream`) writes each shard under a hidden name (a leading `.` or `_`) or in
another folder of the same file system, and renames it into place as `*.parquet`, so a
visible shard is complete; it never writes into a visible name, never rewrites a shard,
and never reuses the name of a shard the trainer has processed. Shards are taken in name
order (producers name them by time slice: part-00000.parquet, part-00001.parquet, ...).

The stream is a local folder or an `s3://` URL (model/storage.py): on S3 a producer
writes each shard in one PUT (an object is never visible half written) under its final
name, or under a hidden name and copies it.

A shard that cannot be read as the schema is moved to `<stream>/.quarantine/<name>`
with `<name>.reason` beside it, and the trainer goes on, but only once the file has
stayed the same (size and mtime) across two looks a poll apart: a file still being
written under its final name is waited for, not quarantined. A file delivered again
under a quarantined name is new: it is read like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyarrow.fs import FileType

from model.batch import Batch
from model.data.reader import DataError, check_footer, read_batch
from model.data.synth import SynthConfig, World, check_schema_supported, write_shard
from model.schema import SURFACE_INPUT, FeatureSchema
from model.storage import Place, child, exists, info, listing, make_dirs, move, place, write_bytes

log = logging.getLogger(__name__)

QUARANTINE = ".quarantine"


def discover(stream: str | Path | Place, done: set[str]) -> list[Place]:
    """Complete shards not yet processed, oldest first. Hidden names (a producer's
    temporary files: a leading `.` or `_`; the quarantine) are not shards."""
    stream = place(stream)
    shards = (child(stream, e.path) for e in listing(stream) if e.is_file and e.path.endswith(".parquet"))
    return sorted((p for p in shards if p.name[0] not in "._" and p.name not in done), key=lambda p: p.name)


def fingerprint(path: str | Path | Place) -> tuple[int, int] | None:
    """(size, mtime) of a file, or None when it is gone: what must stay the same across
    two looks before an unreadable file counts as bad rather than unfinished."""
    found = info(place(path))
    if found.type != FileType.File:
        return None
    return found.size or 0, found.mtime_ns or 0


def load_shard(path: str | Path | Place, schema: FeatureSchema, max_seq_len: int) -> Batch:
    """The shard's rows with labels; DataError (the reason) if it does not fit the schema."""
    check_footer(path, schema, labels=True)
    batch = read_batch(path, schema, max_seq_len=max_seq_len, labels=True)
    if len(batch[SURFACE_INPUT]) == 0:
        raise DataError("the shard has no rows")
    for task in schema.tasks:
        if not np.isin(batch[task.label_column], (0.0, 1.0)).all():
            raise DataError(f"column {task.label_column!r}: labels must be 0 or 1")
    return batch


def quarantine(path: str | Path | Place, reason: str) -> Place:
    """Moves a bad shard aside with its reason; a later shard of the same name is new."""
    path = place(path)
    folder = path.parent / QUARANTINE
    make_dirs(folder)
    target = folder / path.name
    if exists(target):
        target = folder / f"{path.stem}.{time.time_ns()}.parquet"
    move(path, target)
    write_bytes(folder / f"{target.name}.reason", (reason.strip() + "\n").encode())
    log.error("quarantined %s: %s", path.name, reason)
    return target


# -- the stream player ---------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    out: Path
    shards: int = 10
    rows_per_shard: int = 20_000
    every_s: float = 30.0
    drift: float = 0.5
    seed: int = 0
    # Write shards from this index on (a restarted player resumes; earlier ones exist).
    start: int = 0
    users: int = 20_000
    ads: int = 5_000

    def synth(self) -> SynthConfig:
        # One time range over the whole stream, so drift moves across shards.
        return SynthConfig(
            rows=self.rows_per_shard * self.shards,
            shards=self.shards,
            seed=self.seed,
            drift=self.drift,
            users=self.users,
            ads=self.ads,
            days=float(self.shards),
        )


def play_stream(
    cfg: StreamConfig,
    schema: FeatureSchema,
    on_shard: Callable[[Path], object] = lambda _: None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Path]:
    """Writes shard i of the synthetic stream at start + i * every_s (atomically)."""
    check_schema_supported(schema)
    synth = cfg.synth()
    world = World(synth, len(schema.surfaces))
    begin = time.monotonic()
    paths = []
    for i in range(cfg.start, cfg.shards):
        wait = begin + (i - cfg.start) * cfg.every_s - time.monotonic()
        if wait > 0:
            sleep(wait)
        paths.append(write_shard(synth, schema, world, cfg.out, i))
        on_shard(paths[-1])
    return paths
