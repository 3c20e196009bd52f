"""The side trainer's parts without training: ledger and crash repair, stream discovery and
quarantine, rank splits, the gate's decision, strategies, rollback, adapter-only publish,
metrics."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from model.checkpoint import load_checkpoint
from serving.local.ports import free_ports
from trainer import distributed as D
from trainer.gate import GateConfig, decide, onnx_logits, task_metrics
from trainer.ledger import REFUSED, TRAINED, Ledger, ShardId, TrainerRecord
from trainer.prometheus import TrainerMetrics
from trainer.stream import QUARANTINE, discover, load_shard, quarantine


def test_ledger_drops_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append({"kind": "shard", "shard": "a", "state": TRAINED, "cycle": 1})
    with path.open("a") as f:
        f.write('{"kind": "shard", "shard": "b", "sta')  # kill -9 in the middle of an append
    reopened = Ledger(path)
    assert [e["shard"] for e in reopened.shard_entries()] == ["a"]
    reopened.append({"kind": "publish", "cycle": 1})
    assert [e["kind"] for e in Ledger(path).entries] == ["shard", "publish"]


def test_ledger_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"kind": "shard"}\nnot json\n{"kind": "publish", "cycle": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        Ledger(path)


def test_reconcile_makes_the_ledger_agree_with_the_checkpoint(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append({"kind": "shard", "shard": "p0", "state": TRAINED, "cycle": 1})
    ledger.append({"kind": "publish", "cycle": 1})
    ledger.append({"kind": "shard", "shard": "p9", "state": TRAINED, "cycle": 2})  # not in the checkpoint
    ledger.append({"kind": "quarantine", "shard": "bad", "reason": "x"})
    record = TrainerRecord(3, {"p0": TRAINED, "p1": REFUSED}, None)  # p1: killed before its line
    changes = ledger.reconcile(record)
    assert len(changes) == 2
    reopened = Ledger(tmp_path / "ledger.jsonl")
    assert [(e["shard"], e["state"]) for e in reopened.shard_entries()] == [("p0", TRAINED), ("p1", REFUSED)]
    assert reopened.done() == {"p0", "p1"}, "p9 will be trained again; a quarantined name delivered again is new"
    assert reopened.pending_publish()["shard"] == "p1", "p1's cycle has no publish line yet"
    assert ledger.reconcile(record) == [], "idempotent"


def test_reconcile_writes_the_checkpoints_own_line_back_whole(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append({"kind": "shard", "shard": "p0", "state": TRAINED, "cycle": 1, "checkpoint": 1})
    ledger.append({"kind": "publish", "cycle": 1, "checkpoint": 1})
    # Killed after checkpoint 2 was in place, before its line.
    commit = {"kind": "shard", "shard": "p1", "size": 10, "sha256": "ab", "cycle": 2, "checkpoint": 2,
              "state": TRAINED, "loss": 0.25}  # fmt: skip
    record = TrainerRecord(2, {"p0": TRAINED, "p1": TRAINED}, None)
    assert ledger.reconcile(record, commit) == ["p1: committed by checkpoint 2: its line written"]
    line = Ledger(tmp_path / "ledger.jsonl").shard_entries()[-1]
    assert {k: line[k] for k in commit} == commit and line["repaired"] is True, "size, sha256 and loss are kept"
    assert ledger.pending_publish()["checkpoint"] == 2
    # Then an adapter-only refresh, killed after its checkpoint: committed, then published.
    adapter = {"kind": "adapter", "shard": "p2", "size": 5, "sha256": "cd", "cycle": 2, "checkpoint": 3}
    ledger.append({"kind": "publish", "cycle": 2, "checkpoint": 2})
    assert ledger.reconcile(TrainerRecord(2, record.processed, "p2"), adapter) != []
    assert ledger.pending_publish()["kind"] == "adapter", "an adapter-only commit is published like an FM one"
    assert ledger.done() == {"p0", "p1"}


def test_reading_the_ledger_never_writes(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"kind": "shard", "shard": "a", "state": "trained", "cycle": 1}\n{"kind": "sh')
    before = path.read_bytes()
    assert [e["shard"] for e in Ledger(path).shard_entries()] == ["a"]
    assert path.read_bytes() == before, "a torn last line is skipped, not repaired, by a reader"


def test_record_round_trips():
    record = TrainerRecord(4, {"a": TRAINED, "b": REFUSED}, "c")
    assert TrainerRecord.from_dict(record.to_dict()) == record
    assert TrainerRecord.from_dict(None) == TrainerRecord()


def test_discover_takes_complete_shards_in_name_order(tmp_path):
    for name in ("part-00002.parquet", "part-00000.parquet", ".part-00003.parquet.tmp-1", "part-00001.parquet"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / QUARANTINE).mkdir()
    (tmp_path / QUARANTINE / "part-00009.parquet").write_bytes(b"x")
    assert [p.name for p in discover(tmp_path, {"part-00001.parquet"})] == ["part-00000.parquet", "part-00002.parquet"]
    assert discover(tmp_path / "missing", set()) == []


def test_bad_shards_are_refused_with_a_reason_and_quarantined(tmp_path, synth_dir, schema):
    import pyarrow.parquet as pq

    garbage = tmp_path / "part-00000.parquet"
    garbage.write_bytes(b"PAR1 not really")
    table = pq.read_table(next(synth_dir.glob("*.parquet")))
    missing = tmp_path / "part-00001.parquet"
    pq.write_table(table.drop_columns(["label_click"]), missing)
    bad_labels = tmp_path / "part-00002.parquet"
    halves = np.full(table.num_rows, 0.5, dtype=np.float32)
    pq.write_table(table.set_column(table.schema.get_field_index("label_click"), "label_click", [halves]), bad_labels)
    reasons = {}
    for path in (garbage, missing, bad_labels):
        with pytest.raises(Exception) as e:
            load_shard(path, schema, 32)
        reasons[path.name] = str(e.value)
        moved = Path(quarantine(path, str(e.value)).path)  # a Place: local or S3
        assert moved.exists() and not path.exists()
        assert moved.with_name(moved.name + ".reason").read_text().strip() == str(e.value)
    assert "not a readable Parquet file" in reasons["part-00000.parquet"]
    assert "label_click" in reasons["part-00001.parquet"]
    assert "0 or 1" in reasons["part-00002.parquet"]
    assert discover(tmp_path, set()) == []


def test_shard_id_changes_with_content(tmp_path):
    p = tmp_path / "s.parquet"
    p.write_bytes(b"one")
    a = ShardId.of(p)
    p.write_bytes(b"two")
    assert ShardId.of(p) != a and a.name == "s.parquet" and a.size == 3


@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 2), (5121, 2), (7, 3), (1, 2)])
def test_rank_rows_are_disjoint_and_equal_in_count(n, world):
    parts = [D.rank_rows(n, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1, "every rank takes the same number of steps"
    together = np.concatenate(parts)
    assert len(set(together.tolist())) == len(together) and len(together) > n - world


def test_fsdp2_and_hsdp_are_refused_on_cpu_with_a_clear_message():
    D.check_strategy("ddp", cuda=False)
    D.check_strategy("hsdp", cuda=True)
    for strategy in ("fsdp2", "hsdp"):
        with pytest.raises(D.DistributedError, match=r"needs CUDA GPUs.*--strategy ddp"):
            D.check_strategy(strategy, cuda=False)
    with pytest.raises(D.DistributedError, match="unknown strategy"):
        D.check_strategy("zero3", cuda=True)


def test_gate_refuses_a_regression_beyond_the_tolerance():
    served = {"click": {"ne": 0.80}, "conversion": {"ne": 0.90}}
    cfg = GateConfig(tolerance=0.01)
    assert decide({"click": {"ne": 0.805}, "conversion": {"ne": 0.85}}, served, cfg)[0]
    ok, reason = decide({"click": {"ne": 0.85}, "conversion": {"ne": 0.85}}, served, cfg)
    assert not ok and "click NE 0.8500 vs served 0.8000" in reason and "conversion" not in reason
    assert not decide({"click": {"ne": float("nan")}, "conversion": {"ne": 0.85}}, served, cfg)[0]
    assert decide({"click": {"ne": 5.0}}, None, cfg) == (True, "nothing is served yet")


def test_task_metrics_and_the_served_versions_logits(published_repo, tiny_checkpoint, synth_dir, schema):
    from trainer.train import predict

    ckpt = load_checkpoint(tiny_checkpoint)
    batch = load_shard(sorted(synth_dir.glob("*.parquet"))[0], schema, ckpt.config.seq_len)
    batch = {k: v[:700] for k, v in batch.items()}
    served = onnx_logits(published_repo / FM_MODEL / "1" / "model.onnx", batch, schema)
    np.testing.assert_allclose(served, predict(ckpt.model, batch, schema), atol=1e-4)
    m = task_metrics(schema, served, batch)
    assert set(m) == {"click", "conversion"} and all(v["ne"] > 0.0 and 0 <= v["auc"] <= 1 for v in m.values())


def test_adapter_alone_is_published_and_rollback_moves_newer_versions_aside(published_repo, tiny_checkpoint, tmp_path):
    repo_root = tmp_path / "repo"
    shutil.copytree(published_repo, repo_root)
    ckpt = load_checkpoint(tiny_checkpoint)
    repo = ModelRepository(repo_root)
    report = publish(ckpt, repo, PublishPolicy(keep_versions=3, with_fm=False))
    assert report.adapter.version == 2 and report.adapter_parity.worst < 1e-4 and report.fm is None
    assert repo.versions(ADAPTER_MODEL) == [1, 2] and repo.versions(FM_MODEL) == [1], "the FM is untouched"
    assert repo.rollback(ADAPTER_MODEL, 1) == [2]
    assert repo.versions(ADAPTER_MODEL) == [1]
    assert "rolled back to version 1" in (repo_root / ADAPTER_MODEL / ".rejected" / "2" / "REASON").read_text()
    again = publish(ckpt, repo, PublishPolicy(with_fm=False)).adapter
    assert again.version == 3, "a rolled-back number is not reused"
    with pytest.raises(Exception, match="no version 7"):
        repo.rollback(FM_MODEL, 7)


def test_what_a_kill_left_in_the_repository_is_cleaned_and_pruning_sets_aside_first(published_repo, tmp_path):
    repo_root = tmp_path / "repo"
    shutil.copytree(published_repo, repo_root)
    stale = repo_root / FM_MODEL / ".staging-2-999"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    pruned = repo_root / ADAPTER_MODEL / ".pruned-0"
    pruned.mkdir()
    (pruned / "model.onnx").write_bytes(b"half deleted")
    config_tmp = repo_root / FM_MODEL / ".config.pbtxt.tmp-999"
    config_tmp.write_text("half")
    repo = ModelRepository(repo_root)
    assert sorted(repo.clean()) == sorted([stale, pruned, config_tmp])
    assert not stale.exists() and not pruned.exists() and not config_tmp.exists()
    assert repo.versions(FM_MODEL) == [1] and repo.clean() == []


def test_metrics_endpoint_serves_the_trainer_metrics():
    m = TrainerMetrics.create()
    (port,) = free_ports(1)
    m.serve(port, addr="127.0.0.1")
    m.examples.inc(100)
    m.last_ne.labels("click").set(0.81)
    m.serving_version.labels("gem_fm").set(4)
    m.failures.labels("gate").inc()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in (
        "gem_trainer_examples_total 100.0",
        'gem_trainer_last_ne{task="click"} 0.81',
        'gem_trainer_serving_version{model="gem_fm"} 4.0',
        'gem_trainer_failures_total{stage="gate"} 1.0',
    ):
        assert line in body, line


def test_resuming_with_the_optimizer_state_of_the_checkpoint_is_bit_identical(synth_dir, schema, tmp_path):
    """What a restart does (trainer/loop.py): weights and optimizer state from the
    checkpoint, the same shuffling; it ends where the uninterrupted run ends, bit for bit."""
    from model.adapter import StudentAdapter
    from model.checkpoint import CheckpointStore, ModelBundle
    from model.config import preset
    from model.gem import GEM
    from trainer.train import make_optimizers, train_steps

    tiny, rt = preset("tiny"), D.Runtime()
    shard = load_shard(sorted(synth_dir.glob("*.parquet"))[0], schema, tiny.seq_len)
    a, b = ({k: v[s] for k, v in shard.items()} for s in (slice(0, 600), slice(600, 1200)))

    def fresh():
        torch.manual_seed(0)
        model = GEM(schema, tiny)
        return model, make_optimizers(model, 2e-3, 0.05)

    def cycle(model, optimizers, batch, n):
        train_steps(model, optimizers, batch, schema, 128, np.random.default_rng([0, n, 0]))

    model, optimizers = fresh()
    cycle(model, optimizers, a, 1)
    cycle(model, optimizers, b, 2)
    uninterrupted = model.state_dict()

    model, optimizers = fresh()
    cycle(model, optimizers, a, 1)
    store = CheckpointStore(tmp_path)
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces))
    store.save(1, ModelBundle(schema, tiny, model, adapter), {}, D.full_optimizer_state(model, optimizers, rt))
    del model, optimizers  # killed

    results = {}
    for with_state in (True, False):
        ckpt = load_checkpoint(store.pointer)
        optimizers = make_optimizers(ckpt.model, 2e-3, 0.05)
        if with_state:
            D.load_optimizer_state(ckpt.model, optimizers, ckpt.optimizer, rt)
        cycle(ckpt.model, optimizers, b, 2)
        results[with_state] = ckpt.model.state_dict()
    assert all(torch.equal(uninterrupted[k], v) for k, v in results[True].items()), "bit-identical"
    assert not all(torch.equal(uninterrupted[k], v) for k, v in results[False].items()), "fresh optimizers differ"
