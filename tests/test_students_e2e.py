"""A tiny end-to-end run with every stage the benchmark's default run has: FM trained on
early shards and frozen, published, the adapter refreshed, `gem embed` (Ray Data) over the
later shards, students trained on them, and the fresh FM trained on through the later
shards: a student that learns from the knowledge beats `hard` on the test slice."""

from __future__ import annotations

import json

import pytest

from bench.students import BenchConfig, report, run


@pytest.mark.slow
@pytest.mark.stack
def test_fm_to_gem_embed_to_student_beats_hard(tmp_path, monkeypatch):
    cfg = BenchConfig(
        rows=36_000, shards=6, early=3, users=2_000, ads=800, variants=("hard", "kd", "all"),
        student_epochs=2, workdir=tmp_path,
    )  # fmt: skip
    result = run(cfg)
    assert set(result.students) == {"hard", "kd", "all"}
    # Every stage of the default run ran, the fresh FM (trained on through the later shards) too.
    assert {"stale FM", "stale FM adapted", "fresh FM"} <= set(result.teachers)
    assert {"user_id", "ad_id", "hist_category_id"} <= set(result.shared)
    for task in ("click", "conversion"):
        assert result.ne("all", task) < result.ne("hard", task), result.students
    monkeypatch.setattr("bench.students.RESULTS", tmp_path / "results")
    doc = report(result, ["click", "conversion"], "tiny")
    assert (tmp_path / "results" / "tiny.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results" / "tiny.json").read_text())["targets"] == json.loads(
        json.dumps(doc["targets"])
    )
