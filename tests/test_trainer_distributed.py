"""Two gloo processes train for real: the loss falls and the replicas stay identical; and
the whole trainer under `--procs 2`, with bad shards in the stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from model.checkpoint import load_checkpoint
from model.config import preset
from model.gem import GEM
from model.schema import SURFACE_INPUT, load_schema
from tests.trainer_support import gem, make_stream, shard_lines
from trainer import distributed as D
from trainer.stream import QUARANTINE, load_shard
from trainer.train import make_optimizers, train_steps

# Starts the side trainer's processes (and Triton): `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack


def _train_worker(shard: str, out: str) -> None:
    """One rank: DDP over gloo, three passes over its rows of the shard."""
    rt = D.init("ddp")
    try:
        schema = load_schema()
        torch.manual_seed(rt.rank)  # different initial weights per rank: DDP must sync them
        model = D.wrap(GEM(schema, preset("tiny")), rt)
        optimizers = make_optimizers(model, 2e-3, 0.05)
        batch = load_shard(Path(shard), schema, 32)
        mine = {k: v[D.rank_rows(len(batch[SURFACE_INPUT]), rt.rank, rt.world_size)] for k, v in batch.items()}
        rng = np.random.default_rng(rt.rank)
        losses: list[float] = []
        for _ in range(3):
            train_steps(model, optimizers, mine, schema, 256, rng, lambda _n, loss: losses.append(loss))
        state = D.full_state_dict(model, rt)
        torch.save({"losses": losses, "state": state, "world": rt.world_size, "rows": len(mine[SURFACE_INPUT])},
                   Path(out) / f"rank{rt.rank}.pt")  # fmt: skip
    finally:
        D.shutdown(rt)


def test_two_gloo_processes_train_for_real_and_stay_identical(synth_dir, tmp_path):
    shard = sorted(synth_dir.glob("*.parquet"))[0]
    D.spawn(_train_worker, 2, str(shard), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["rows"] == r1["rows"] == 5_000, "each rank trains on its half of the shard"
    for r in (r0, r1):
        first, last = np.mean(r["losses"][:5]), np.mean(r["losses"][-5:])
        assert last < first - 0.02, f"loss did not fall: {first:.4f} -> {last:.4f}"
    assert r0["losses"] != r1["losses"], "the ranks saw different rows"
    assert r0["state"].keys() == r1["state"].keys()
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), f"{name} differs between the ranks"
    # And they did move away from the initial weights of rank 0.
    torch.manual_seed(0)
    initial = GEM(load_schema(), preset("tiny")).state_dict()
    assert any(not torch.equal(initial[k], r0["state"][k]) for k in initial)


def test_gem_trainer_with_two_processes_quarantines_bad_shards_and_publishes(schema, tmp_path):
    stream = tmp_path / "stream"
    make_stream(stream, schema, shards=4, rows=3_000)
    (stream / "part-00001.parquet").write_bytes(b"this is no parquet file")
    table = pq.read_table(stream / "part-00003.parquet")
    pq.write_table(table.drop_columns(["ad_id"]), stream / "part-00003.parquet")
    state, repo = tmp_path / "state", tmp_path / "repo"

    result = gem(
        "trainer", "run", "--stream", str(stream), "--repo", str(repo), "--state", str(state), "--preset", "tiny",
        "--procs", "2", "--exit-when-idle", "--batch-size", "256", "--tolerance", "0.05", "--poll-s", "0.5",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    log = " ".join((result.stdout + result.stderr).split())
    assert [(e["shard"], e["eval_shard"]) for e in shard_lines(state)] == [
        ("part-00000.parquet", "part-00002.parquet")
    ], "bad shards are skipped, good ones taken in order, each once"
    for name, why in (("part-00001.parquet", "not a readable Parquet file"), ("part-00003.parquet", "'ad_id'")):
        assert (stream / QUARANTINE / name).exists() and not (stream / name).exists()
        assert why in (stream / QUARANTINE / f"{name}.reason").read_text()
        assert name in log, "the quarantine is logged"
    assert "cycle 1 part-00000.parquet -> eval part-00002.parquet" in log, "one compact line per cycle"
    assert log.count("publishing gem_fm and student_adapter") == 1 and log.count("published gem_fm v1") == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) < 60, "one line as a publish starts and one as it ends, no ONNX exporter noise without -v"
    r = ModelRepository(repo)
    published = [e for e in shard_lines(state) if e["state"] == "trained"]
    assert r.versions(FM_MODEL)[-1] == len(published) and r.latest(ADAPTER_MODEL) >= len(published)
    ckpt = load_checkpoint(state / "checkpoint", expect_schema=schema)
    assert ckpt.metrics["trainer"] == {
        "cycle": 1,
        "processed": {"part-00000.parquet": "trained"},
        "adapter_shard": "part-00002.parquet",  # the freshest good shard
    }
