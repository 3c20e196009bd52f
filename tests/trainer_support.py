"""Helpers of the side trainer's tests: small streams, bad shards, the ledger, `gem`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from model.schema import FeatureSchema
from trainer.stream import StreamConfig, play_stream

GEM_BIN = Path(sys.executable).with_name("gem")
# The synthetic world of tests/conftest.py's synth_dir (seed 7, 3,000 users, 1,000 ads).
WORLD = {"seed": 7, "users": 3_000, "ads": 1_000}


def make_stream(
    out: Path, schema: FeatureSchema, shards: int, rows: int = 3_000, drift: float = 0.0, start: int = 0
) -> list[Path]:
    """Shards start..shards-1 of a stream of the test world, all at once."""
    cfg = StreamConfig(out=out, shards=shards, rows_per_shard=rows, every_s=0.0, drift=drift, start=start, **WORLD)
    return play_stream(cfg, schema)


def shuffle_labels(path: Path, schema: FeatureSchema, seed: int = 0) -> None:
    """Rewrites the shard with its labels permuted: features and labels no longer agree."""
    table = pq.read_table(path)
    rng = np.random.default_rng(seed)
    order = rng.permutation(table.num_rows)
    for task in schema.tasks:
        i = table.schema.get_field_index(task.label_column)
        table = table.set_column(i, task.label_column, table.column(task.label_column).take(order))
    pq.write_table(table, path)


def ledger(state: Path) -> list[dict]:
    path = state / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def shard_lines(state: Path) -> list[dict]:
    return [e for e in ledger(state) if e["kind"] == "shard"]


def gem(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(GEM_BIN), *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout)


def start_gem(*args: str, cwd: Path, env: dict | None = None, log: Path) -> subprocess.Popen:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    with log.open("w") as out:
        return subprocess.Popen(
            [str(GEM_BIN), *args], cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 of the trainer and every process it started."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
