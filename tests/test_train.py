"""End to end: train tiny GEM and its baselines on synthetic data, and the CLI; the
validation/test split, early stopping, dense scaling and progress lines."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import trainer.train as train_module
from model.adapter import StudentAdapter
from model.baselines import LogisticRegression
from model.batch import take
from model.checkpoint import ModelBundle, load_checkpoint, save_checkpoint
from model.data.reader import read_batch, resolve_paths
from model.gem import GEM
from trainer.train import ProgressLog, TrainConfig, fit, labels_of, predict, split_shards, train


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ckpt"
    return train(
        TrainConfig(data=synth_dir, out=out, preset="tiny", epochs=3, patience=1, baselines=True, batch_size=256)
    )


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
    assert m["train_shards"] == ["part-00000.parquet", "part-00001.parquet"]
    assert m["val_shards"] == ["part-00002.parquet"] and m["test_shards"] == ["part-00003.parquet"]
    for task in schema.task_names:
        assert set(m["gem"][task]["by_surface"]) == set(schema.surfaces)
        for key in ("auc", "log_loss", "ne"):
            assert np.isfinite(m["gem"][task]["overall"][key])
    assert trained.examples_per_s > 0
    for name in ("gem", "gem_mean_pool", "pooled_mlp", "logistic"):
        curve = m[name]["curve"]
        assert 1 <= len(curve) == m[name]["epochs_run"] <= 3, name
        # The epoch kept is the one with the best validation NE.
        assert m[name]["best_epoch"] == 1 + int(np.argmin([c["val_ne"] for c in curve])), name
        assert set(curve[0]["val"]) == set(schema.task_names)


def test_checkpoint_is_the_chosen_epoch(trained, synth_dir, schema):
    """The checkpoint's validation NE is the curve's value at the chosen epoch."""
    from trainer.evaluation import evaluate

    ckpt = load_checkpoint(trained.checkpoint)
    val = read_batch(resolve_paths(synth_dir)[2], schema, max_seq_len=ckpt.config.seq_len)
    result = evaluate(schema, predict(ckpt.model, val, schema), labels_of(val, schema), val["surface"])
    best = trained.metrics["gem"]["curve"][trained.metrics["gem"]["best_epoch"] - 1]
    for task in schema.task_names:
        assert result[task]["overall"]["ne"] == pytest.approx(best["val"][task]["ne"], abs=1e-5)


def test_checkpoint_loads_and_predicts(trained, schema):
    ckpt = load_checkpoint(trained.checkpoint, expect_schema=schema)
    assert ckpt.config.d_model == 16
    assert ckpt.metrics["gem"]["click"]["overall"]["auc"] == trained.metrics["gem"]["click"]["overall"]["auc"]


def test_cli_synth_and_train(gem, tmp_path):
    r = gem("data", "synth", "--out", str(tmp_path / "d"), "--rows", "6000", "--shards", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "d").glob("part-*.parquet"))) == 3
    r = gem(
        "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "c"), "--preset", "tiny",
        "--epochs", "2", "--progress-every", "0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "click AUC" in r.stdout and "gem" in r.stdout and "epoch" in r.stdout
    # stderr is a pipe, not a terminal: plain progress lines, no bar.
    lines = [x for x in r.stderr.splitlines() if "examples/s" in x]
    assert len(lines) >= 2, r.stderr
    assert "gem epoch 1/2:" in lines[0] and "loss" in lines[0] and "ETA" in lines[0]
    assert "━" not in r.stderr
    assert (tmp_path / "c" / "manifest.json").exists()


@pytest.fixture
def placeholders(tmp_path, synth_dir, schema, tiny):
    """Paths the error cases below refer to by name."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(schema.to_yaml().replace("buckets: 100000", "buckets: -1", 1))
    corrupt = tmp_path / "corrupt"
    save_checkpoint(corrupt, ModelBundle(schema, tiny, GEM(schema, tiny), StudentAdapter(2, 3)), {})
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


def test_split_holds_out_validation_then_test():
    paths = [Path(f"p{i}") for i in range(4)]
    assert split_shards(paths) == (paths[:2], [paths[2]], [paths[3]])
    with pytest.raises(train_module.DataError, match="need more than 2 shard"):
        split_shards(paths[:2])


def test_early_stopping_keeps_the_best_validation_epoch(synth_dir, schema, monkeypatch):
    data = read_batch(resolve_paths(synth_dir)[0], schema, max_seq_len=8)
    train_rows, val = take(data, slice(0, 1000)), take(data, slice(1000, 1500))
    model = LogisticRegression(schema, 8)
    scripted = iter([0.9, 0.8, 0.85, 0.95, 0.1, 0.1])  # best at 2; 3 and 4 are worse: stop at 4
    states, seen = [], []

    def fake_evaluate(schema_, logits, labels, surfaces):
        seen.append(labels)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        ne = next(scripted)
        return {t: {"overall": {"ne": ne, "auc": 0.5}} for t in schema_.task_names}

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    cfg = TrainConfig(data=synth_dir, out=synth_dir, epochs=6, patience=2, batch_size=256)
    result = fit("logistic", model, [train_rows], val, schema, cfg)
    assert (result.best_epoch, result.epochs_run) == (2, 4)
    assert [c["val_ne"] for c in result.curve] == [0.9, 0.8, 0.85, 0.95]
    assert all(np.array_equal(labels, labels_of(val, schema)) for labels in seen)  # only validation labels
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, states[1][k])  # back at epoch 2
    assert not all(torch.equal(states[1][k], states[3][k]) for k in states[1])


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for i, p in enumerate(resolve_paths(src)):
        pq.write_table(edit(i, pq.read_table(p).slice(0, 3_000)), dst / p.name)
    return dst


def test_the_test_slice_never_chooses_the_epoch(synth_dir, tmp_path):
    """Training on the same shards with the test slice's labels flipped gives the same
    validation curve, epoch and weights: the test slice is only reported."""

    def flip(i, t):
        if i != 3:
            return t
        for c in ("label_click", "label_conversion"):
            t = t.set_column(t.schema.get_field_index(c), c, pc.subtract(1, t.column(c)))
        return t

    same = _rewrite(synth_dir, tmp_path / "same", lambda i, t: t)
    flipped = _rewrite(synth_dir, tmp_path / "flipped", flip)
    runs = [
        train(TrainConfig(data=d, out=tmp_path / f"ckpt-{d.name}", preset="tiny", epochs=3, patience=1,
                          batch_size=256, adapter_epochs=1))
        for d in (same, flipped)
    ]  # fmt: skip
    a, b = (r.metrics["gem"] for r in runs)
    assert [c["val_ne"] for c in a["curve"]] == [c["val_ne"] for c in b["curve"]]
    assert a["best_epoch"] == b["best_epoch"]
    assert a["click"]["overall"]["auc"] == pytest.approx(1 - b["click"]["overall"]["auc"], abs=1e-6)
    sa = load_checkpoint(runs[0].checkpoint).model.state_dict()
    sb = load_checkpoint(runs[1].checkpoint).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_raw_dense_values_train_as_well_as_standardized_ones(synth_dir, schema, tmp_path):
    """Every dense column as values around 1e3-1e6 (an affine copy, like a year or an
    amount in cents) trains GEM and the logistic baseline as well as its standardized
    copy: the model standardizes inside (without that, the logistic baseline's NE
    explodes)."""
    first = pq.read_table(resolve_paths(synth_dir)[0])
    moments = {f.name: (pc.mean(first.column(f.name)).as_py(), pc.stddev(first.column(f.name)).as_py())
               for f in schema.dense}  # fmt: skip

    def scaled(raw: bool):
        def edit(_, t):
            for k, f in enumerate(schema.dense):
                mean, std = moments[f.name]
                z = pc.divide(pc.subtract(pc.cast(t.column(f.name), pa.float64()), mean), std)
                # z in about [-4, 4] -> [1e3, 1e6], offsets and scales that differ by column
                col = pc.add(pc.multiply(z, 1e5 * (k + 1)), 5e5) if raw else z
                t = t.set_column(t.schema.get_field_index(f.name), f.name, col)
            return t

        return edit

    results = {}
    for raw in (False, True):
        d = _rewrite(synth_dir, tmp_path / f"raw-{raw}", scaled(raw))
        if raw:
            values = read_batch(resolve_paths(d)[0], schema)[schema.dense[0].name]
            assert np.median(np.abs(values)) > 1e3 and values.max() > 1e5
        results[raw] = train(TrainConfig(data=d, out=tmp_path / f"ckpt-{raw}", preset="tiny", epochs=1,
                                         batch_size=256, baselines=True, adapter_epochs=1)).metrics  # fmt: skip
    for model in ("gem", "logistic"):
        for task in schema.task_names:
            std, raw = results[False][model][task]["overall"], results[True][model][task]["overall"]
            assert raw["auc"] == pytest.approx(std["auc"], abs=0.01), (model, task)
            assert raw["ne"] == pytest.approx(std["ne"], abs=0.01), (model, task)


def test_progress_lines_are_plain_and_spaced():
    now = [0.0]
    lines: list[str] = []
    log = ProgressLog(lines.append, every_s=10.0, clock=lambda: now[0])
    log.start("gem", 4_000)
    for _ in range(30):
        now[0] += 1.0
        log.advance(100, epoch=1, epochs=4, loss=0.25, rate=200.0)
    assert len(lines) == 3  # at 1 s, 11 s and 21 s
    assert lines[-1] == "gem epoch 1/4: 2,100/4,000 examples, 200 examples/s, loss 0.2500, ETA 10s"
    log.advance(1_000, epoch=1, epochs=4, loss=0.25, rate=200.0)
    assert len(lines) == 4  # the last one always shows
