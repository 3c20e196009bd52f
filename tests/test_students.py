"""The reference student: the knowledge join (one to one, missing rows reported), each
variant's loss wired as named (autograd on a tiny batch), sharing by name, the CLI."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from export.contract import FM_MODEL
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository, checkpoint_sources
from gem.cli import app
from model.checkpoint import load_checkpoint
from model.examples import random_batch
from model.outputs import EMBEDDING, USER_EMBEDDING
from model.schema import SURFACE_INPUT
from students.config import StudentConfig, StudentConfigError, load_student_config
from students.knowledge import KnowledgeJoinError, join_knowledge, knowledge_fm_version, matrix, read_knowledge
from students.losses import student_loss
from students.model import AUX, SERVING, Student
from students.share import ShareError, fm_tables, share_tables, shared_fm_version
from students.train import StudentTrainConfig, build_student, load_student, save_student, train_student
from students.variants import parse_variant

# -- the join -----------------------------------------------------------------------------


def knowledge_table(ids, width=3):
    ids = np.asarray(ids, np.int64)
    emb = np.repeat(ids[:, None].astype(np.float32), width, axis=1)
    return pa.table({
        "example_id": ids, "knowledge_click": ids / 100.0, "adapted_click": ids / 200.0,
        EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), width),
    })  # fmt: skip


def test_join_keeps_logged_rows_one_to_one_in_their_order():
    logged = pa.table({"example_id": [5, 3, 9, 1], "label_click": [1, 0, 0, 1]})
    joined = join_knowledge(logged, knowledge_table([7, 1, 9, 3, 5, 11]))
    assert joined.num_rows == logged.num_rows
    assert joined.column("example_id").to_pylist() == [5, 3, 9, 1]
    assert joined.column("label_click").to_pylist() == [1, 0, 0, 1]
    np.testing.assert_allclose(joined.column("knowledge_click").to_numpy(), [0.05, 0.03, 0.09, 0.01])
    np.testing.assert_array_equal(matrix(joined.column(EMBEDDING))[:, 0], [5, 3, 9, 1])


def test_a_missing_knowledge_row_is_reported_never_dropped():
    logged = pa.table({"example_id": [5, 3, 9, 1, 42]})
    with pytest.raises(KnowledgeJoinError, match=r"2 of 5 logged rows have no knowledge row.*\[9, 42\]"):
        join_knowledge(logged, knowledge_table([1, 3, 5]))


def test_a_key_stamped_twice_is_reported():
    with pytest.raises(KnowledgeJoinError, match=r"1 example_id\(s\) have more than one knowledge row.*\[3\]"):
        join_knowledge(pa.table({"example_id": [3]}), knowledge_table([3, 1, 3]))


def test_a_file_without_committed_knowledge_is_named(tmp_path):
    (tmp_path / "part-00000").mkdir()
    with pytest.raises(KnowledgeJoinError, match="no committed knowledge for part-00001"):
        read_knowledge(tmp_path, ["part-00001"])


def test_the_fm_version_of_the_knowledge_is_one_or_an_error(tmp_path):
    for stem, version in (("part-00000", 3), ("part-00001", 3), ("part-00002", 4)):
        (tmp_path / stem).mkdir()
        pq.write_table(
            pa.table({"example_id": [1, 2], "fm_version": [version, version]}), tmp_path / stem / "p.parquet"
        )
        (tmp_path / stem / "_manifest.json").write_text("{}")
    assert knowledge_fm_version(tmp_path, ["part-00000", "part-00001"]) == 3
    with pytest.raises(KnowledgeJoinError, match=r"FM versions \[3, 4\], not one.*--fm-version"):
        knowledge_fm_version(tmp_path, ["part-00000", "part-00002"])


# -- variants and losses ------------------------------------------------------------------


def test_variant_flags_combine_and_all_is_the_best_combination():
    assert parse_variant("hard").name == "hard"
    assert parse_variant("aux,repr").name == "aux,repr"
    v = parse_variant("all")
    assert (v.aux, v.adapted, v.repr, v.share, v.kd) == (True, True, True, True, False)
    assert parse_variant("adapted").teacher == "adapted" and parse_variant("kd").teacher == "knowledge"
    with pytest.raises(ValueError, match="unknown variant 'distill'"):
        parse_variant("kd,distill")


@pytest.fixture(scope="module")
def student_cfg():
    return load_student_config()


def tiny_inputs(schema, student_cfg, n=64, seed=0, widths=(32, 16)):
    batch = random_batch(schema, n, 8, seed=seed)
    rng = np.random.default_rng(seed)
    batch[SURFACE_INPUT] = rng.choice(student_cfg.surface_indices(schema), n)
    batch[EMBEDDING] = rng.normal(size=(n, widths[0])).astype(np.float32)
    batch[USER_EMBEDDING] = rng.normal(size=(n, widths[1])).astype(np.float32)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    labels = torch.from_numpy(rng.integers(0, 2, (n, len(schema.tasks))).astype(np.float32))
    return tensors, labels


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_aux_keeps_the_teacher_out_of_the_serving_head(schema, student_cfg):
    torch.manual_seed(0)
    model = build_student(student_cfg, schema, parse_variant("aux"))
    x, y = tiny_inputs(schema, student_cfg)
    teacher_a, teacher_b = torch.rand_like(y), torch.rand_like(y)
    v = parse_variant("aux")
    g_hard = grads(model, student_loss(model(x), y, None, parse_variant("hard")).total)
    g_a = grads(model, student_loss(model(x), y, teacher_a, v).total)
    g_b = grads(model, student_loss(model(x), y, teacher_b, v).total)
    for name in ("serving_head.weight", "serving_head.bias"):
        # The serving head's gradient is the hard term's alone, whatever the teacher says.
        torch.testing.assert_close(g_a[name], g_hard[name], rtol=0, atol=0)
        torch.testing.assert_close(g_a[name], g_b[name], rtol=0, atol=0)
    # The teacher reaches the auxiliary head and the shared layers.
    assert not torch.allclose(g_a["aux_head.weight"], g_b["aux_head.weight"])
    assert g_hard["aux_head.weight"].abs().sum() == 0
    assert not torch.allclose(g_a["top.0.0.weight"], g_b["top.0.0.weight"])


def test_kd_mixes_the_teacher_into_the_serving_head(schema, student_cfg):
    torch.manual_seed(0)
    model = build_student(student_cfg, schema, parse_variant("kd"))
    x, y = tiny_inputs(schema, student_cfg)
    v = parse_variant("kd", weight=0.3, temperature=2.0)
    out = model(x)
    parts = student_loss(out, y, torch.rand_like(y), v)
    torch.testing.assert_close(parts.total, 0.7 * parts.hard + 0.3 * parts.distill)
    g_a = grads(model, student_loss(model(x), y, torch.rand_like(y), v).total)
    g_b = grads(model, student_loss(model(x), y, torch.rand_like(y), v).total)
    assert not torch.allclose(g_a["serving_head.weight"], g_b["serving_head.weight"])
    assert g_a["aux_head.weight"].abs().sum() == 0
    with pytest.raises(ValueError, match="no teacher labels"):
        student_loss(out, y, None, v)


def test_distillation_is_minimal_at_the_teacher(schema, student_cfg):
    """At any temperature, the KD term's gradient vanishes where the student's logits
    equal the teacher's: the soft targets are the teacher's, softened alike."""
    p = torch.tensor([[0.1, 0.7]])
    logits = torch.logit(p).clone().requires_grad_(True)
    v = parse_variant("aux", temperature=3.0, weight=1.0)
    parts = student_loss({SERVING: logits.detach(), AUX: logits}, torch.zeros_like(p), p, v)
    parts.distill.backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(p), atol=1e-6, rtol=0)


def test_adapted_teaches_from_the_adapted_labels_and_repr_takes_the_embeddings(schema, student_cfg):
    assert parse_variant("adapted").teacher == "adapted"
    assert parse_variant("aux,adapted").aux
    hard = build_student(student_cfg, schema, parse_variant("hard"))
    rep = build_student(student_cfg, schema, parse_variant("repr"), (32, 16))
    assert EMBEDDING not in hard.input_names()
    assert {EMBEDDING, USER_EMBEDDING} <= set(rep.input_names())
    x, _ = tiny_inputs(schema, student_cfg)
    base = rep(x)[SERVING]
    x2 = dict(x, **{EMBEDDING: x[EMBEDDING] + 1.0})
    assert not torch.allclose(base, rep(x2)[SERVING])


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_share_takes_the_fm_tables_by_name(schema, student_cfg, tiny_checkpoint, mode):
    torch.manual_seed(1)
    model = build_student(student_cfg, schema, parse_variant("share"))
    shared = share_tables(model, tiny_checkpoint, mode)
    fm = fm_tables(load_checkpoint(tiny_checkpoint).model.state_dict())
    # Every student feature the FM has a table of the same shape for.
    assert set(shared) == {n for n, m in model.tables.items() if n in fm and fm[n].shape == m.table.weight.shape}
    assert {"user_id", "ad_id", "ad_category", "hist_category_id"} <= set(shared)
    for name in shared:
        torch.testing.assert_close(model.tables[name].table.weight.detach(), fm[name])
    x, y = tiny_inputs(schema, student_cfg)
    before = model.tables["ad_category"].table.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    student_loss(model(x), y, None, parse_variant("hard")).total.backward()
    opt.step()
    changed = not torch.equal(before, model.tables["ad_category"].table.weight.detach())
    assert changed == (mode == "finetune")


def test_a_shared_student_records_the_fm_version_its_tables_came_from(
    tiny_checkpoint, published_repo, synth_dir, tmp_path
):
    source = checkpoint_sources(tiny_checkpoint)[FM_MODEL]
    repo = ModelRepository(tmp_path / "repo")  # published as the side trainer does: with SOURCE
    policy = PublishPolicy(data=synth_dir, sources=checkpoint_sources(tiny_checkpoint))
    publish(load_checkpoint(tiny_checkpoint), repo, policy)
    assert shared_fm_version(tiny_checkpoint, None) == (source, None)
    with pytest.raises(ShareError, match=f"no {FM_MODEL} version published from"):
        shared_fm_version(tiny_checkpoint, published_repo)  # published without saying from what
    cfg = StudentTrainConfig(data=synth_dir, out=tmp_path / "student", variant=parse_variant("share"),
                             share_checkpoint=tiny_checkpoint, repository=repo.root, epochs=1)  # fmt: skip
    metrics = train_student(cfg).metrics
    assert (metrics["share_fm_source"], metrics["share_fm_version"]) == (source, 1)
    assert load_student(cfg.out)[2]["share_fm_version"] == 1


def test_student_checkpoint_round_trip(schema, student_cfg, tmp_path):
    torch.manual_seed(0)
    v = parse_variant("aux,repr")
    model = build_student(student_cfg, schema, v, (32, 16))
    path = save_student(tmp_path / "s", model, v, {"test": {}})
    loaded, lv, _ = load_student(path)
    x, _ = tiny_inputs(schema, student_cfg)
    model.eval()
    torch.testing.assert_close(loaded(x)[SERVING], model(x)[SERVING])
    assert lv == v


def test_config_names_are_checked_against_the_schema(schema, student_cfg):
    bad = replace(student_cfg, sparse=(*student_cfg.sparse, "user_shoe_size"))
    with pytest.raises(StudentConfigError, match="no sparse feature 'user_shoe_size'"):
        bad.check(schema)
    with pytest.raises(StudentConfigError, match="unknown student config key 'layers'"):
        StudentConfig.from_dict({"layers": 3})
    sub = student_cfg.sub_schema(schema)
    assert [f.name for f in sub.sequences[0].fields] == ["hist_category_id", "hist_action_type"]
    assert sub.sequences[0].max_length == student_cfg.sequence_events
    assert isinstance(Student(sub, student_cfg), Student)


# -- the CLI ------------------------------------------------------------------------------


def test_cli_help_lists_the_variants():
    result = CliRunner().invoke(app, ["student", "train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("--data", "--knowledge", "--variant", "aux,repr", "--share-checkpoint", "--temperature"):
        assert word in result.output


def test_cli_trains_hard_and_refuses_knowledge_variants_without_knowledge(gem_bin, synth_dir, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    out = tmp_path / "hard"
    run = subprocess.run(
        [str(gem_bin), "student", "train", "--data", str(synth_dir), "--out", str(out), "--epochs", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training student [hard]" in run.stderr and "click NE" in run.stdout
    assert (out / "student.pt").exists()
    _, _, metrics = load_student(out)
    assert metrics["test_shards"] == ["part-00003.parquet"]
    assert 0.5 < metrics["test"]["click"]["overall"]["auc"] <= 1.0
    refused = subprocess.run(
        [str(gem_bin), "student", "train", "--data", str(synth_dir), "--out", str(tmp_path / "x"), "--variant", "aux"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "give --knowledge" in refused.stderr and "Traceback" not in refused.stderr
