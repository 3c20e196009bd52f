"""The streaming students benchmark (bench/students_stream): the planted-probability
sidecar, a real check of the distillation loss against the planted truth, and the quick
mode end to end at small size with every stage of the default run (the FM stream's
knowledge with the side trainer's lag in both arms included)."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from bench.students_stream.config import StreamConfig
from bench.students_stream.report import report
from bench.students_stream.run import run, scores
from bench.students_stream.student import Run, Settings, stream_student, surfaces_labels
from bench.students_stream.world import PLANTED, student_rows, write_world
from model.data.synth import SynthConfig, planted_path, write_shards
from model.schema import load_schema
from students.config import load_student_config
from students.train import build_student, load_student, save_student
from students.variants import Variant, parse_variant

SCHEMA = load_schema()
STUDENT = replace(load_student_config(), surfaces=("reels",))
# The small world of the quick test: knowledge of shards 4 and 5, the FM frozen after 3.
SMALL = StreamConfig(
    rows=12_000, shards=6, launch=4, freeze=3, users=1_500, ads=600, seeds=2, passes_grid=(1,), batch_grid=(256,),
    quick=True,
)  # fmt: skip


def test_planted_sidecar_changes_no_row_and_pairs_by_example_id(tmp_path):
    cfg = SynthConfig(rows=3_000, shards=2, seed=3, users=300, ads=100, drift=1.0)
    plain = write_shards(cfg, SCHEMA, tmp_path / "plain")
    with_sidecar = write_shards(cfg, SCHEMA, tmp_path / "data", planted_dir=tmp_path / "planted")
    for i, (a, b) in enumerate(zip(plain, with_sidecar, strict=True)):
        assert pq.read_table(a).equals(pq.read_table(b))
        planted = pq.read_table(planted_path(tmp_path / "planted", i))
        assert planted.column("example_id").equals(pq.read_table(b, columns=["example_id"]).column("example_id"))
        click, conversion = (planted.column(f"planted_{t}").to_numpy() for t in ("click", "conversion"))
        assert ((click > 0) & (click < 1)).all() and (conversion <= click).all()
    # The sidecar is beside the data, never in it: a reader of the data folder sees shards only.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [p.name for p in with_sidecar]


@pytest.mark.slow
def test_oracle_kd_beats_hard_and_shuffled_kd_loses_to_hard(tmp_path):
    """The loss code, independently of any FM: distilling the planted probability must
    beat the labels alone, and distilling it shuffled across rows must lose to them."""
    world = write_world(tmp_path, SCHEMA, 60_000, 3, seed=0, users=2_000, ads=1_000, drift=1.0)
    shards = [student_rows(world, i, STUDENT, SCHEMA, None) for i in range(3)]
    labels, _ = surfaces_labels(shards, SCHEMA)
    settings = Settings(passes=1, batch_size=64, lr=2e-3, embedding_lr=0.05)
    ne = {
        run.name: scores(stream_student(run, shards, STUDENT, SCHEMA, settings, seed=0), labels, SCHEMA)
        for run in (
            Run("hard", Variant()),
            Run("oracle", Variant(kd=True), PLANTED),
            Run("shuffled", Variant(kd=True), PLANTED, shuffled=True),
        )
    }
    for task in SCHEMA.task_names:
        assert ne["oracle"][task]["ne"] < ne["hard"][task]["ne"] < ne["shuffled"][task]["ne"], ne


@pytest.mark.slow
def test_quick_mode_runs_every_stage(tmp_path):
    doc = run(replace(SMALL, workdir=tmp_path))
    doc = report(doc, SCHEMA.task_names, "quick", results=tmp_path / "results")
    assert (tmp_path / "results" / "quick.png").stat().st_size > 1000
    written = json.loads((tmp_path / "results" / "quick.json").read_text())
    assert written["config"]["quick"] is True and set(written["seeds"]) == {"0", "1"}
    summary = written["summary"]
    for arm in ("fresh", "frozen"):
        assert set(summary["gain_pct"][arm]) == set(SMALL.variants) - {"hard"} | (
            set(SMALL.controls) if arm == "fresh" else set()
        )
        assert {"raw", "adapted", "planted (NE floor)"} == set(summary["teacher_advantage_pct"][arm])
    assert [t.split(":")[0] for t in summary["targets"]] == ["P0", "T1", "T2", "T3", "T4", "controls"]
    # The side trainer's lag, from the knowledge manifests: the fresh arm's FM is a new
    # version for every labelled shard, the frozen arm's one version; both refit the
    # adapter every cycle; every row of a shard stamped once.
    for seed in written["seeds"].values():
        fresh, frozen = (list(seed["knowledge_versions"][arm].values()) for arm in ("fresh", "frozen"))
        assert fresh[0]["fm_versions"][0] < fresh[1]["fm_versions"][0]
        assert frozen[0]["fm_versions"] == frozen[1]["fm_versions"]
        assert frozen[0]["adapter_versions"][0] < frozen[1]["adapter_versions"][0]
        assert [k["rows_out"] for k in fresh] == [SMALL.rows // SMALL.shards] * 2


def test_the_aux_tower_is_its_own_mlp_on_the_shared_bottom_and_round_trips(tmp_path):
    tower, linear = (parse_variant("aux", aux_head=h) for h in ("tower", "linear"))
    model = build_student(STUDENT, SCHEMA, tower)
    assert hasattr(model, "aux_top") and not hasattr(build_student(STUDENT, SCHEMA, linear), "aux_top")
    world = write_world(tmp_path / "world", SCHEMA, 2_000, 1, seed=0, users=200, ads=100, drift=1.0)
    batch = student_rows(world, 0, STUDENT, SCHEMA, None)
    inputs = {n: torch.from_numpy(batch[n]) for n in model.input_names()}
    model.eval()
    with torch.no_grad():
        before = model(inputs)
    # The serving tower gets no gradient from the auxiliary logits.
    model.train()
    model(inputs)["aux_logits"].sum().backward()
    assert all(p.grad is None for p in model.top.parameters()) and model.aux_top[0][0].weight.grad is not None
    loaded, variant, _ = load_student(save_student(tmp_path / "s", model, tower, {}))
    assert variant.aux_head == "tower"
    with torch.no_grad():
        after = loaded(inputs)
    for name in ("logits", "aux_logits"):
        torch.testing.assert_close(before[name], after[name])
