"""The side trainer killed at every commit point of a cycle (SIGKILL of its process
group, at deterministic hold points: tests/conftest.py's `hold_env`), then restarted: it
ends exactly where an uninterrupted run does (ledger, versions and what they were
exported from, weights, adapter and optimizer state, the knowledge of each gated shard
(--knowledge-out), bit for bit) and leaves no temporary behind.

The stream arrives in three phases, each run until idle (`--exit-when-idle`):
  A: part-00000 alone  -> an adapter-only cycle (the FM waits for a shard to validate on)
  B: + part-00001      -> FM cycle 1 (train 0, validate on 1)
  C: + part-00002      -> FM cycle 2 (train 1, validate on 2; from cycle 1's optimizer state)
One uninterrupted reference run (module fixture) keeps a copy after each phase. A
scenario starts from the reference's copy before its phase and chains kills: each kill
is followed by a restart that is itself held (and killed) at the next point, until a
last restart runs to the end. A restart from a point after the checkpoint's rename
resumes from that checkpoint and only publishes, so the swap's later points each get a
scenario of their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from jobs.embed.manifest import MANIFEST
from model.checkpoint import load_checkpoint
from tests.trainer_support import gem, kill_group, ledger, make_stream, start_gem, wait_for

# Starts the side trainer's processes (and Triton): `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack

MODELS = (FM_MODEL, ADAPTER_MODEL)
SHARDS = 3
# Ledger fields that differ between any two runs (wall-clock time and speed).
VOLATILE = {"ts", "examples_per_s", "repaired"}

TRAIN = "trainer.loop:train_steps:after:1"
CKPT_STAGED = "model.checkpoint:CheckpointStore._install:before:1"
CKPT_RENAMED = "model.checkpoint:CheckpointStore._install:after:1"
CKPT_POINTED = "model.checkpoint:CheckpointStore._point:after:1"
CKPT_OLD_ASIDE = "model.checkpoint:CheckpointStore._set_aside:after:1"
COMMIT_LINE = "trainer.commit:Committer._record_commit:before:1"
PUBLISH_LINE = "trainer.publish:Publisher._record_publish:before:1"
KNOWLEDGE_STAGED = "trainer.knowledge:KnowledgeWriter._commit:before:1"
KNOWLEDGE_COMMITTED = "trainer.knowledge:KnowledgeWriter._commit:after:1"


def repo_install(when: str, n: int) -> str:
    return f"export.repository:ModelRepository._install:{when}:{n}"


PRUNE_ASIDE = "export.repository:ModelRepository._set_aside:after:1"


def _args(root: Path, procs: int, first: bool) -> list[str]:
    return [
        "trainer", "run", "--stream", str(root / "stream"), "--repo", str(root / "repo"), "--state",
        str(root / "state"), "--preset", "tiny", "--batch-size", "128", "--tolerance", "10", "--poll-s", "0.2",
        "--keep", "1", "--procs", str(procs), "--exit-when-idle", "--knowledge-out", str(root / "knowledge"),
        *(["--checkpoint", str(root / "start")] if first else []),
    ]  # fmt: skip


def _deliver(source: Path, root: Path, phase: str) -> None:
    """The phase's shard, renamed into the stream as producers must."""
    index = "ABC".index(phase)
    shard = source / f"part-{index:05d}.parquet"
    (root / "stream").mkdir(exist_ok=True)
    shutil.copy(shard, root / "stream" / f".{shard.name}")
    (root / "stream" / f".{shard.name}").rename(root / "stream" / shard.name)


def _run(root: Path, procs: int, first: bool) -> str:
    result = gem(*_args(root, procs, first), cwd=root, env={"TMPDIR": str(root / "tmp")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _knowledge(root: Path) -> dict:
    """Every entry of the knowledge folder: a committed shard's rows (by id) and manifest."""
    out = root / "knowledge"
    found = {}
    for folder in sorted(p for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["source"] = Path(manifest["source"]).name  # under this run's root
        manifest["parts"] = len(manifest["parts"])  # part names are random per run
        found[folder.name] = {"manifest": manifest, "rows": pq.read_table(folder).sort_by("example_id").to_pydict()}
    return found


def _outcome(root: Path) -> dict:
    state, repo = root / "state", ModelRepository(root / "repo")
    ckpt = load_checkpoint(state / "checkpoint")
    return {
        "ledger": [{k: v for k, v in e.items() if k not in VOLATILE} for e in ledger(state)],
        "versions": {m: repo.versions(m) for m in MODELS},
        "sources": {m: [repo.source(m, v) for v in repo.versions(m)] for m in MODELS},
        "record": ckpt.metrics["trainer"],
        "checkpoints": sorted(p.name for p in (state / "checkpoints").iterdir()),
        "weights": {**ckpt.model.state_dict(), **{f"adapter.{k}": v for k, v in ckpt.adapter.state_dict().items()}},
        "optimizer": ckpt.optimizer,
        "knowledge": _knowledge(root),
    }


def _same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_nothing_left(root: Path) -> None:
    state, repo = root / "state", root / "repo"
    left = [
        *(state / "checkpoints").glob(".*"), *state.glob(".checkpoint*"), *repo.glob("*/.staging-*"),
        *repo.glob("*/.pruned-*"), *repo.glob("*/.*.tmp"), *(root / "tmp").glob("gem-export-*"),
        *(p for p in (root / "tmp").iterdir() if p.is_dir()),
        *((state / "tmp").glob("*") if (state / "tmp").exists() else []), *(root / "knowledge").glob(".*"),
    ]  # fmt: skip
    assert left == [], f"temporaries left behind: {left}"
    for model in MODELS:
        for v in ModelRepository(repo).versions(model):
            assert (repo / model / str(v) / "model.py").exists() and (repo / model / str(v) / "model.onnx").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def shards(schema, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    make_stream(out, schema, shards=SHARDS, rows=1_000)
    return out


@pytest.fixture(scope="module")
def reference(shards, published_repo, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run: a copy of its folders before each phase, and after C."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(published_repo, root / "repo")
    shutil.copytree(tiny_checkpoint, root / "start")
    (root / "tmp").mkdir()
    copies = {}
    for phase in "ABC":
        copies[f"before {phase}"] = _copy(root, tmp_path_factory.mktemp(f"before_{phase}") / "root")
        _deliver(shards, root, phase)
        _run(root, procs=1, first=phase == "A")
        copies[f"after {phase}"] = _copy(root, tmp_path_factory.mktemp(f"after_{phase}") / "root")
    return copies


def _chain(root: Path, shards: Path, phase: str, points: list[str], hold_env, procs: int = 1) -> list[str]:
    """Delivers the phase's shard, then runs the trainer killed at each point in turn
    (each a restart of the previous), then once to the end. Returns the logs."""
    _deliver(shards, root, phase)
    logs = []
    for i, point in enumerate(points):
        held = root / f"held-{i}"
        log = root / f"run-{i}.log"
        env = {**hold_env(point, held), "TMPDIR": str(root / "tmp")}
        proc = start_gem(*_args(root, procs, first=phase == "A"), cwd=root, env=env, log=log)
        wait_for(held.exists, 600, f"the trainer to hold at {point}", proc, log)
        kill_group(proc)
        held.unlink()
        logs.append(log.read_text())
    logs.append(_run(root, procs, first=phase == "A"))
    return logs


# Each scenario: (phase, --procs, the kill points in order).
SCENARIOS = {
    # The adapter-only cycle: its checkpoint, its line, its version, its prune, its publish line.
    "adapter-only": ("A", 1, [CKPT_STAGED, COMMIT_LINE, repo_install("after", 1), PRUNE_ASIDE, PUBLISH_LINE]),
    # An FM cycle: killed in training, with the checkpoint staged, then renamed (restart:
    # publish) and inside that publish: the FM version staged, then renamed.
    "fm-train-swap-publish": ("C", 1, [TRAIN, CKPT_STAGED, CKPT_RENAMED, repo_install("before", 1),
                                      repo_install("after", 1)]),
    # The pointer moved, old checkpoint still there; then the adapter's version renamed
    # (FM renamed too); then the prune's first rename.
    "fm-pointer-adapter-prune": ("C", 1, [CKPT_POINTED, repo_install("after", 2), PRUNE_ASIDE]),
    # The old checkpoint renamed aside, not deleted; then just before the publish line.
    "fm-old-aside-publish-line": ("C", 1, [CKPT_OLD_ASIDE, PUBLISH_LINE]),
    # The checkpoint complete, its ledger line not written.
    "fm-commit-line": ("C", 1, [COMMIT_LINE]),
    # The gated shard's knowledge staged, then committed (the checkpoint not yet written):
    # the rerun cycle keeps what was committed.
    "fm-knowledge": ("C", 1, [KNOWLEDGE_STAGED, KNOWLEDGE_COMMITTED]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_at_each_commit_point_then_restarted_ends_as_the_uninterrupted_run(
    name, reference, shards, hold_env, tmp_path
):
    phase, procs, points = SCENARIOS[name]
    root = _copy(reference[f"before {phase}"], tmp_path / "root")
    logs = _chain(root, shards, phase, points, hold_env, procs)
    _same(_outcome(reference[f"after {phase}"]), _outcome(root), name)
    _assert_nothing_left(root)
    assert "Traceback" not in logs[-1], logs[-1][-3000:]


@pytest.fixture(scope="module")
def reference_two_procs(reference, shards, tmp_path_factory) -> Path:
    """Phase C uninterrupted under --procs 2 (gloo), from the reference before C."""
    root = _copy(reference["before C"], tmp_path_factory.mktemp("reference2") / "root")
    _deliver(shards, root, "C")
    _run(root, procs=2, first=False)
    return root


def test_two_gloo_processes_killed_in_training_in_the_swap_and_in_the_publish_end_as_uninterrupted(
    reference, reference_two_procs, shards, hold_env, tmp_path
):
    root = _copy(reference["before C"], tmp_path / "root")
    _chain(root, shards, "C", [TRAIN, CKPT_RENAMED, repo_install("after", 1)], hold_env, procs=2)
    _same(_outcome(reference_two_procs), _outcome(root), "procs 2")
    _assert_nothing_left(root)


def test_the_ledger_line_written_back_by_recovery_is_whole(reference):
    """The reference's lines carry what identifies the shard and what was learned."""
    lines = [e for e in ledger(reference["after C"] / "state") if e["kind"] in ("shard", "adapter")]
    assert [(e["kind"], e["shard"], e["checkpoint"]) for e in lines] == [
        ("adapter", "part-00000.parquet", 1),
        ("shard", "part-00000.parquet", 2),
        ("shard", "part-00001.parquet", 3),
    ]
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in lines)
    assert all(isinstance(e["loss"], float) for e in lines if e["kind"] == "shard")
    record = json.loads((reference["after C"] / "state" / "checkpoint" / "metrics.json").read_text())
    assert record["commit"]["shard"] == "part-00001.parquet" and "loss" in record["commit"]


def test_each_gated_shard_has_its_knowledge_once_from_the_version_served_then(reference):
    """Cycle 1 gates part-00001 with v1, cycle 2 part-00002 with cycle 1's publish (v2)."""
    knowledge = _knowledge(reference["after C"])
    assert sorted(knowledge) == ["part-00001", "part-00002"]
    for stem, fm in (("part-00001", 1), ("part-00002", 2)):
        rows = knowledge[stem]["rows"]
        assert len(set(rows["example_id"])) == len(rows["example_id"]) == 1_000
        assert set(rows["fm_version"]) == {fm} and knowledge[stem]["manifest"]["fm_versions"] == [fm]
    lines = [e for e in ledger(reference["after C"] / "state") if e["kind"] == "shard"]
    assert [e["knowledge"]["shard"] for e in lines] == ["part-00001.parquet", "part-00002.parquet"]
