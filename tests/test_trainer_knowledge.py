"""Knowledge from the side trainer's own passes (`gem trainer run --knowledge-out`): the
gate's one pass over a shard gives both its metrics and the knowledge, which equals
`gem embed` run with the same versions on the same shard (rows, values, manifest) and
which students/ reads unchanged; a quarantined shard gets none. (Exactly once across a
SIGKILL at each commit point: tests/test_trainer_faults.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from export.contract import ADAPTER_OUTPUT, FM_MODEL
from export.repository import ModelRepository
from jobs.embed import MODEL_OUTPUTS, EmbedConfig, run_embed
from jobs.embed.manifest import MANIFEST
from model.checkpoint import load_checkpoint
from model.outputs import LOGITS
from serving.backends.onnx import OnnxBackend
from students.knowledge import join_knowledge, read_knowledge, teacher_probs
from tests.test_embed import assert_same_rows, read_out
from tests.trainer_support import gem, ledger, make_stream, shard_lines
from trainer import gate as gate_module
from trainer.gate import GateConfig, gate, onnx_logits
from trainer.stream import load_shard

STAMPED = "part-00002"


def test_the_gates_one_pass_gives_its_metrics_and_the_knowledge(published_repo, tiny_checkpoint, synth_dir, schema,
                                                                monkeypatch):  # fmt: skip
    """One FM pass per gate, with or without knowledge; the same metrics either way; the
    knowledge is what the embedded backend (gem embed's) computes."""
    ckpt = load_checkpoint(tiny_checkpoint)
    path = sorted(synth_dir.glob("*.parquet"))[0]
    batch = {k: v[:700] for k, v in load_shard(path, schema, ckpt.config.seq_len).items()}
    repo = ModelRepository(published_repo)
    passes = []
    real = gate_module.onnx_outputs
    monkeypatch.setattr(gate_module, "onnx_outputs", lambda *a, **k: passes.append(1) or real(*a, **k))
    candidate = onnx_logits(published_repo / FM_MODEL / "1" / "model.onnx", batch, schema)
    passes.clear()
    plain = gate(schema, candidate, batch, path.name, repo, GateConfig())
    assert len(passes) == 1 and plain.served is not None and set(plain.served.outputs) == {LOGITS}
    full = gate(schema, candidate, batch, path.name, repo, GateConfig(), MODEL_OUTPUTS)
    assert len(passes) == 2 and full.served is not None
    assert (full.passed, full.candidate, full.serving) == (plain.passed, plain.candidate, plain.serving)
    want = OnnxBackend(published_repo).run(batch, MODEL_OUTPUTS)
    assert (full.served.fm_version, full.served.adapter_version) == (want.fm_version, want.adapter_version) == (1, 1)
    for name in MODEL_OUTPUTS:
        np.testing.assert_allclose(full.served.outputs[name], want.outputs[name], rtol=0, atol=1e-5, err_msg=name)
    assert not np.allclose(full.served.outputs[ADAPTER_OUTPUT], full.served.outputs[LOGITS])


@pytest.fixture(scope="module")
def trained(schema, published_repo, tiny_checkpoint, tmp_path_factory) -> Path:
    """A trainer run with --knowledge-out over part-00000, a corrupt part-00001 and
    part-00002 (one FM cycle: train 0, gate on 2); and `gem embed` of part-00002 with the
    versions the gate scored (the repository before the run)."""
    root = tmp_path_factory.mktemp("trainer_knowledge")
    shutil.copytree(published_repo, root / "repo")
    make_stream(root / "stream", schema, shards=3, rows=1_000)
    (root / "stream" / "part-00001.parquet").write_bytes(b"not a Parquet file")
    args = [
        "trainer", "run", "--stream", str(root / "stream"), "--repo", str(root / "repo"), "--state",
        str(root / "state"), "--checkpoint", str(tiny_checkpoint), "--preset", "tiny", "--batch-size", "128",
        "--tolerance", "10", "--poll-s", "0.2", "--exit-when-idle", "--knowledge-out", str(root / "knowledge"),
    ]  # fmt: skip
    result = gem(*args, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    try:
        source = root / "stream" / f"{STAMPED}.parquet"
        summary = run_embed(EmbedConfig(source=str(source), out=root / "embed", repository=published_repo))
        assert not summary.failed_files, summary.failed_files
    finally:
        ray.shutdown()
    return root


# The tests below start the side trainer's process and Ray.
@pytest.mark.stack
def test_the_trainers_knowledge_equals_gem_embed_of_the_served_versions(trained):
    got, want = trained / "knowledge" / STAMPED, trained / "embed" / STAMPED
    assert_same_rows(read_out(got), read_out(want), STAMPED)
    assert read_out(got).num_rows == 1_000
    manifest, embedded = (json.loads((folder / MANIFEST).read_text()) for folder in (got, want))
    # The parts each names are its own (random names), one per shard here.
    assert len(manifest.pop("parts")) == len(embedded.pop("parts")) == 1
    assert manifest == embedded
    assert (manifest["fm_versions"], manifest["adapter_versions"]) == ([1], [1])


@pytest.mark.stack
def test_students_read_it_unchanged(trained, schema):
    logged = pq.read_table(trained / "stream" / f"{STAMPED}.parquet")
    joined = join_knowledge(logged, read_knowledge(trained / "knowledge", [STAMPED]))
    assert joined.num_rows == logged.num_rows
    for prefix in ("knowledge", "adapted"):
        probs = teacher_probs(joined, prefix, schema.task_names)
        assert probs.shape == (logged.num_rows, len(schema.tasks)) and ((probs > 0) & (probs < 1)).all()


@pytest.mark.stack
def test_a_corrupt_shard_is_quarantined_with_no_knowledge_and_the_commit_line_says_what_was_written(trained):
    assert (trained / "stream" / ".quarantine" / "part-00001.parquet").exists()
    assert [e["shard"] for e in ledger(trained / "state") if e["kind"] == "quarantine"] == ["part-00001.parquet"]
    # part-00000 was trained on, never gated: only the gated shard has knowledge.
    assert sorted(p.name for p in (trained / "knowledge").iterdir()) == [STAMPED]
    (line,) = shard_lines(trained / "state")
    assert (line["shard"], line["eval_shard"]) == ("part-00000.parquet", f"{STAMPED}.parquet")
    assert line["knowledge"] == {
        "shard": f"{STAMPED}.parquet", "rows": 1_000, "fm_versions": [1], "adapter_versions": [1],
    }  # fmt: skip
