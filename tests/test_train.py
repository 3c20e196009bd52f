"""End to end: train tiny GEM and its baselines on synthetic data, and the CLI."""

import numpy as np
import pytest

from model.adapter import StudentAdapter
from model.checkpoint import load_checkpoint, save_checkpoint
from model.gem import GEM
from trainer.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ckpt"
    return train(TrainConfig(data=synth_dir, out=out, preset="tiny", epochs=1, baselines=True, batch_size=256))


def test_gem_beats_logistic_regression(trained):
    m = trained.metrics
    for task in ("click", "conversion"):
        gem, lr = m["gem"][task]["overall"], m["logistic"][task]["overall"]
        assert gem["auc"] > lr["auc"], task
        assert gem["ne"] < lr["ne"], task
        assert gem["ne"] < 1.0, f"{task}: GEM knows less than the base rate"


def test_metrics_cover_tasks_surfaces_and_models(trained, schema):
    m = trained.metrics
    assert set(m) >= {"gem", "gem_adapted", "gem_mean_pool", "pooled_mlp", "logistic"}
    assert m["eval_shards"] == ["part-00003.parquet"]
    for task in schema.task_names:
        assert set(m["gem"][task]["by_surface"]) == set(schema.surfaces)
        for key in ("auc", "log_loss", "ne"):
            assert np.isfinite(m["gem"][task]["overall"][key])
    assert trained.examples_per_s > 0


def test_checkpoint_loads_and_predicts(trained, schema):
    ckpt = load_checkpoint(trained.checkpoint, expect_schema=schema)
    assert ckpt.config.d_model == 16
    assert ckpt.metrics["gem"]["click"]["overall"]["auc"] == trained.metrics["gem"]["click"]["overall"]["auc"]


def test_cli_synth_and_train(gem, tmp_path):
    r = gem("data", "synth", "--out", str(tmp_path / "d"), "--rows", "6000", "--shards", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "d").glob("part-*.parquet"))) == 3
    r = gem("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "c"), "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    assert "click AUC" in r.stdout and "gem" in r.stdout
    assert (tmp_path / "c" / "manifest.json").exists()


@pytest.fixture
def placeholders(tmp_path, synth_dir, schema, tiny):
    """Paths the error cases below refer to by name."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(schema.to_yaml().replace("buckets: 100000", "buckets: -1", 1))
    corrupt = tmp_path / "corrupt"
    save_checkpoint(corrupt, schema, tiny, GEM(schema, tiny), StudentAdapter(2, 3), {})
    (corrupt / "model.pt").write_bytes(b"x")
    return {"synth": synth_dir, "bad_schema": bad, "tmp": tmp_path, "corrupt": corrupt}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/nonexistent/data"], "no Parquet files at /nonexistent/data"),
        (["train", "--preset", "huge", "--data", "{synth}"], "unknown preset 'huge'"),
        (["schema", "check", "{bad_schema}"], "sparse[0].buckets: must be a positive integer"),
        (
            ["data", "synth", "--rows", "10", "--shards", "20", "--out", "{tmp}/x"],
            "shards (20) cannot exceed rows (10)",
        ),
        # An empty repository of its own: `gem up` must export, and so load the checkpoint.
        (["up", "--checkpoint", "{corrupt}", "--repo", "{tmp}/empty-repo"], "model.pt is corrupt"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(gem, args, message, placeholders):
    r = gem(*(a.format(**placeholders) for a in args))
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.stderr
