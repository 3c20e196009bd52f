"""`gem embed` on Ray Data: ids one to one, values equal the in-process model, a crash
and rerun give the same output, bad files and bad rows are reported, Triton agrees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch

from jobs.embed import EmbedConfig, run_embed
from jobs.embed.commit import ERRORS, commit, write_part
from jobs.embed.manifest import MANIFEST
from jobs.embed.results import FileResult
from model.checkpoint import load_checkpoint
from model.data.reader import resolve_paths, table_to_batch
from serving.local.ports import free_ports
from serving.local.triton import TritonConfig, TritonServer

# Starts Triton and/or Ray: `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def logged(synth_dir, tmp_path_factory):
    """The synthetic shards, one file with a wrong column type, one with bad rows."""
    folder = tmp_path_factory.mktemp("logged")
    for path in resolve_paths(synth_dir):
        shutil.copy(path, folder / path.name)
    table = pq.read_table(resolve_paths(synth_dir)[0]).slice(0, 500)
    as_text = pc.cast(table["ad_id"], pa.string())
    pq.write_table(
        table.set_column(table.schema.get_field_index("ad_id"), "ad_id", as_text), folder / "wrong-type.parquet"
    )
    surfaces = table["surface"].cast(pa.string()).to_pylist()
    surfaces[3] = "billboard"
    user_id = table["user_id"].to_pylist()
    user_id[7] = None
    bad_rows = table.set_column(table.schema.get_field_index("surface"), "surface", pa.array(surfaces))
    bad_rows = bad_rows.set_column(bad_rows.schema.get_field_index("user_id"), "user_id", pa.array(user_id, pa.int64()))
    pq.write_table(bad_rows, folder / "bad-rows.parquet")
    return folder


def read_out(folder, filesystem=None) -> pa.Table:
    """Sorted by id, surfaces decoded (parts written apart have their own dictionaries);
    `filesystem`: pyarrow's, for a folder elsewhere (S3: tests/test_s3.py)."""
    table = pq.read_table(folder, filesystem=filesystem).sort_by("example_id")
    return table.set_column(table.schema.get_field_index("surface"), "surface", table["surface"].cast(pa.string()))


def assert_same_rows(got: pa.Table, want: pa.Table, name: str) -> None:
    """The same rows, once each; ids, surfaces and versions exactly, the model's floats to
    1e-6 (ONNX Runtime's kernels may round the last bit differently for another batch size,
    and a rerun batches a file's rows its own way)."""
    assert got.column_names == want.column_names and got.num_rows == want.num_rows, name
    for column in got.column_names:
        a, b = got[column].combine_chunks(), want[column].combine_chunks()
        if pa.types.is_floating(a.type) or pa.types.is_fixed_size_list(a.type):
            a, b = (np.asarray(x.flatten() if pa.types.is_fixed_size_list(x.type) else x) for x in (a, b))
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"{name}: {column}")
        else:
            assert a.equals(b), f"{name}: {column}"


@pytest.fixture(scope="module")
def embedded(logged, published_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    summary = run_embed(EmbedConfig(source=str(logged), out=out, repository=published_repo, batch_size=4096))
    return out, summary


def test_every_good_row_out_once_and_bad_ones_reported(embedded, logged):
    out, summary = embedded
    by_name = {f.path.name: f for f in summary.files}
    assert "ad_id" in by_name["wrong-type.parquet"].error and by_name["wrong-type.parquet"].rows_out == 0
    assert not (out / "wrong-type").exists()
    for path in resolve_paths(logged):
        if path.name == "wrong-type.parquet":
            continue
        ids_in = pq.read_table(path, columns=["example_id"])["example_id"].to_numpy()
        result = by_name[path.name]
        assert result.rows_in == len(ids_in) == result.rows_out + result.error_rows
        assert result.users == result.rows_out  # a per-example FM encodes every row's user
        ids_out = read_out(out / path.stem)["example_id"].to_numpy()
        errors = pq.read_table(out / "_errors" / path.stem)["example_id"].to_numpy() if result.error_rows else []
        np.testing.assert_array_equal(np.sort(np.concatenate([ids_out, errors])), np.sort(ids_in))
    bad = pq.read_table(out / "_errors" / "bad-rows")
    assert sorted(bad["error"].to_pylist()) == ["unknown surface", "user_id is null"]


def test_values_equal_the_in_process_model(embedded, synth_dir, tiny_checkpoint, schema):
    out, _ = embedded
    path = resolve_paths(synth_dir)[1]
    table = pq.read_table(path).sort_by("example_id").slice(0, 300)
    ckpt = load_checkpoint(tiny_checkpoint)
    batch = table_to_batch(table, schema, labels=False)
    with torch.no_grad():
        want = ckpt.model({k: torch.from_numpy(np.require(v, requirements="W")) for k, v in batch.items()})
        adapted = ckpt.adapter(want["logits"], torch.from_numpy(batch["surface"]))
    got = read_out(out / path.stem).slice(0, 300)
    assert got["example_id"].to_pylist() == table["example_id"].to_pylist()
    for t, task in enumerate(schema.task_names):
        np.testing.assert_allclose(got[f"knowledge_{task}"], torch.sigmoid(want["logits"][:, t]), atol=1e-4)
        np.testing.assert_allclose(got[f"adapted_{task}"], torch.sigmoid(adapted[:, t]), atol=1e-4)
    embedding = np.stack(got["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(embedding, want["embedding"].numpy(), atol=1e-4)
    assert got.schema.field("user_embedding").type == pa.list_(pa.float32(), want["user_embedding"].shape[1])
    assert set(got["fm_version"].to_pylist()) == {1}


def test_rerun_skips_finished_files(embedded, logged, published_repo):
    out, _ = embedded
    summary = run_embed(EmbedConfig(source=str(logged), out=out, repository=published_repo))
    assert all(f.skipped for f in summary.files if f.path.name != "wrong-type.parquet")


def test_killed_midway_and_rerun_equals_an_uninterrupted_run(gem_bin, embedded, synth_dir, published_repo, tmp_path):
    """One file committed by an earlier run; the job over all files is killed (SIGKILL,
    Ray and all) while parts are being written; the rerun skips the committed file,
    discards the staged parts and ends equal to an uninterrupted run."""
    reference, _ = embedded
    out, first = tmp_path / "out", resolve_paths(synth_dir)[0]
    run_embed(EmbedConfig(source=str(first), out=out, repository=published_repo))
    args = [str(gem_bin), "embed", str(synth_dir), "--out", str(out), "--repo", str(published_repo),
            "--actors", "2", "--batch-size", "256"]  # fmt: skip
    job = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not any(out.glob(".staging/*/*/data/part-*")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    committed = sorted(p.parent.name for p in out.glob("part-*/_manifest.json"))
    assert any(out.glob(".staging/*/*/data/part-*")) and len(committed) < 4, "killed before any part was written"
    rerun = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("skipped (committed before") == len(committed) >= 1
    for path in resolve_paths(synth_dir):
        assert_same_rows(read_out(out / path.stem), read_out(reference / path.stem), path.name)
    assert not (out / ".staging").exists()


def test_triton_backend_gives_the_same_values(published_repo, synth_dir, tmp_path, embedded):
    reference, _ = embedded
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    http, grpc_port, metrics = free_ports(3)
    path = resolve_paths(synth_dir)[2]
    with TritonServer(TritonConfig(repo, tmp_path / "triton", http, grpc_port, metrics)) as server:
        cfg = EmbedConfig(source=str(path), out=tmp_path / "out", backend="triton", triton_url=server.cfg.grpc_url,
                          limit=2000, batch_size=512)  # fmt: skip
        summary = run_embed(cfg)
    assert summary.files[0].rows_out == 2000
    got = read_out(tmp_path / "out" / path.stem)
    want = read_out(reference / path.stem).filter(
        pc.is_in(read_out(reference / path.stem)["example_id"], got["example_id"])
    )
    for column in ("knowledge_click", "adapted_conversion"):
        np.testing.assert_allclose(got[column], want[column], atol=1e-5)


def test_a_dry_run_does_not_stand_for_the_whole_file(published_repo, synth_dir, tmp_path):
    path = resolve_paths(synth_dir)[3]
    cfg = EmbedConfig(source=str(path), out=tmp_path / "out", repository=published_repo, limit=100)
    assert run_embed(cfg).files[0].rows_out == 100
    again = run_embed(cfg)
    assert again.files[0].skipped and again.files[0].rows_out == 100
    full = run_embed(EmbedConfig(source=str(path), out=tmp_path / "out", repository=published_repo))
    assert not full.files[0].skipped and full.files[0].rows_out == pq.read_metadata(path).num_rows
    assert len(read_out(tmp_path / "out" / path.stem)) == full.files[0].rows_out


def test_fail_on_error_refuses_to_start_and_names_the_file(logged, published_repo, tmp_path):
    out = tmp_path / "out"
    cfg = EmbedConfig(source=str(logged), out=out, repository=published_repo, fail_on_error=True)
    summary = run_embed(cfg)
    assert [f.path.name for f in summary.failed_files] == ["wrong-type.parquet"]
    assert summary.rows_out == 0 and not out.exists()


def test_cli_says_what_is_wrong_without_a_traceback(gem_bin, logged, published_repo, tmp_path):
    args = [str(gem_bin), "embed", str(logged), "--out", str(tmp_path / "out"), "--repo", str(published_repo),
            "--fail-on-error"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "wrong-type.parquet" in done.stderr and "ad_id" in done.stderr and "Traceback" not in done.stderr


def test_no_published_model_is_one_line_before_any_work(gem_bin, logged, tmp_path):
    args = [str(gem_bin), "embed", str(logged), "--out", str(tmp_path / "out"), "--repo", str(tmp_path / "empty")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no published model" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# Logged impressions of one request share its user's features; a user-indexed FM encodes
# each request's user once per batch (--group-by, default request_id).
REQUESTS = 300


def _requests_table(synth_dir, schema) -> pa.Table:
    """REQUESTS requests of 2-12 impressions, each request's rows with the user features
    of its first row, shuffled; requests 1 and 2 are request 0's user (same features),
    which only the key keeps apart. Keys are strings (`req-<n>`)."""
    from model.features import input_specs

    rng = np.random.default_rng(13)
    sizes = rng.integers(2, 13, REQUESTS)
    request = np.repeat(np.arange(REQUESTS), sizes)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    source = first[request]
    source[np.isin(request, [1, 2])] = 0
    table = pq.read_table(resolve_paths(synth_dir)[0]).slice(0, len(request))
    for spec in input_specs(schema):
        if spec.side == "user" and spec.kind != "length":
            table = table.set_column(table.schema.get_field_index(spec.name), spec.name, table[spec.name].take(source))
    table = table.append_column("request_id", pa.array([f"req-{r}" for r in request]))
    return table.take(rng.permutation(len(request)))


@pytest.fixture(scope="module")
def requests_files(synth_dir, schema, tmp_path_factory):
    """`requests.parquet`, and `changed.parquet`: the same with one impression of
    request 5 whose history changed (the key's rows disagree)."""
    folder = tmp_path_factory.mktemp("requests")
    table = _requests_table(synth_dir, schema)
    pq.write_table(table, folder / "requests.parquet")
    row = table["request_id"].to_pylist().index("req-5")
    history = table["hist_item_id"].to_pylist()
    history[row] = [item + 1 for item in history[row]] or [7]
    changed = table
    if len(history[row]) == 1 and table["hist_item_id"][row].as_py() == []:  # an empty history gets one event
        for name in ("hist_category_id", "hist_action_type"):
            values = table[name].to_pylist()
            values[row] = [1]
            changed = changed.set_column(
                changed.schema.get_field_index(name), name, pa.array(values, pa.list_(pa.int64()))
            )
    changed = changed.set_column(
        changed.schema.get_field_index("hist_item_id"), "hist_item_id", pa.array(history, pa.list_(pa.int64()))
    )
    pq.write_table(changed, folder / "changed.parquet")
    return folder / "requests.parquet", folder / "changed.parquet"


@pytest.fixture(scope="module")
def ungrouped(requests_files, shared_user_repo, tmp_path_factory):
    """Both files on the user-indexed FM without key grouping (users found by content)."""
    out = tmp_path_factory.mktemp("ungrouped")
    source = str(requests_files[0].parent)
    summary = run_embed(EmbedConfig(source=source, out=out, repository=shared_user_repo[0], batch_size=8192,
                                    group_by=None))  # fmt: skip
    return out, {f.path.name: f for f in summary.files}


def test_grouped_by_request_each_user_is_encoded_once_and_stamps_the_same(
    requests_files, ungrouped, shared_user_repo, schema, tmp_path
):
    path = requests_files[0]
    reference, by_content = ungrouped
    # Requests 1 and 2 have request 0's features: found by content, they are one user.
    assert by_content[path.name].users == REQUESTS - 2
    summary = run_embed(EmbedConfig(source=str(path), out=tmp_path / "out", repository=shared_user_repo[0],
                                    batch_size=4096))  # fmt: skip
    (result,) = summary.files
    rows = pq.read_metadata(path).num_rows
    assert result.rows_out == rows and result.users == summary.users_encoded == REQUESTS
    got = read_out(tmp_path / "out" / path.stem)
    assert "request_id" not in got.column_names
    assert_same_rows(got, read_out(reference / path.stem), "grouped vs ungrouped")
    # And both are the per-example model, row by row.
    table = pq.read_table(path).sort_by("example_id")
    batch = table_to_batch(table, schema, labels=False)
    with torch.no_grad():
        want = shared_user_repo[1]({k: torch.from_numpy(np.require(v, requirements="W")) for k, v in batch.items()})
    for t, task in enumerate(schema.task_names):
        np.testing.assert_allclose(got[f"knowledge_{task}"], torch.sigmoid(want["logits"][:, t]), atol=1e-4)


def test_a_key_whose_rows_disagree_falls_back_to_content_and_stamps_correctly(
    gem, requests_files, ungrouped, shared_user_repo, tmp_path
):
    path = requests_files[1]
    reference, by_content = ungrouped
    done = gem("embed", str(path), "--out", str(tmp_path / "out"), "--repo", str(shared_user_repo[0]),
               "--group-by", "request_id", "--batch-size", "4096")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = pq.read_metadata(path).num_rows
    # The changed impression is a user of its own; requests 0-2 are one user again (by content).
    assert by_content[path.name].users == REQUESTS - 2 + 1
    assert f"users encoded: {REQUESTS - 1:,} for {rows:,} rows" in done.stderr, done.stderr
    assert_same_rows(read_out(tmp_path / "out" / path.stem), read_out(reference / path.stem), "fallback")


def test_triton_gets_pre_indexed_batches_of_a_user_indexed_fm(
    requests_files, ungrouped, shared_user_repo, triton_config, tmp_path
):
    path = requests_files[0]
    reference, _ = ungrouped
    repo = tmp_path / "repo"
    shutil.copytree(shared_user_repo[0], repo)
    with TritonServer(triton_config(repo, tmp_path / "triton")) as server:
        cfg = EmbedConfig(source=str(path), out=tmp_path / "out", backend="triton", triton_url=server.cfg.grpc_url,
                          batch_size=4096)  # fmt: skip
        summary = run_embed(cfg)
    assert summary.files[0].rows_out == pq.read_metadata(path).num_rows and summary.users_encoded == REQUESTS
    got, want = read_out(tmp_path / "out" / path.stem), read_out(reference / path.stem)
    for column in ("knowledge_click", "adapted_conversion"):
        np.testing.assert_allclose(got[column], want[column], atol=1e-5)


def test_the_commit_takes_only_the_parts_the_receipts_named(tmp_path):
    # A part written by an actor whose node died before its receipt came back stands for
    # rows the retried batch wrote again: it is left out.
    run_staging, out, source = tmp_path / "staging" / "run", tmp_path / "out", "/logs/part-7.parquet"
    rows = pa.table({"example_id": [1, 2, 3]})
    named = [write_part(run_staging, source, "data", rows), write_part(run_staging, source, "errors", rows[:1])]
    orphan = write_part(run_staging, source, "data", rows)
    assert None not in named and orphan is not None and orphan not in named
    result = FileResult(Path(source), rows_in=4, rows_out=3, error_rows=1, parts=[p for p in named if p])
    commit(result, out, None, None, run_staging)
    assert sorted(p.name for p in (out / "part-7").glob("*.parquet")) == [named[0].split("/")[1]]
    assert pq.read_table(out / "part-7").num_rows == 3
    assert pq.read_table(out / ERRORS / "part-7").num_rows == 1
    assert json.loads((out / "part-7" / MANIFEST).read_text())["rows_out"] == 3
    assert not (run_staging / "part-7").exists(), "the orphan goes with the staging folder"
