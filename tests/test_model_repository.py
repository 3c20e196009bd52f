"""The Triton model repository: configs from the graphs, atomic versions, stamping,
rejection and pruning, TensorRT profiles. No server here (see test_triton_server)."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.contract import ADAPTER_MODEL, ENSEMBLE_MODEL, FLAVOURS, FM_MODEL, FM_VERSION, FP16_FILENAME
from export.onnx_export import forbidden_ops
from export.parity import FP16_PARITY_TOLERANCE
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository, RepositoryError, stamp_version
from export.tensorrt import (
    ProfileConfig,
    TensorRTUnavailable,
    build_plan,
    container_command,
    profiles,
    trtexec_command,
)
from export.triton_config import config_filename, from_pbtxt
from model.checkpoint import load_checkpoint
from model.examples import random_batch
from model.features import input_specs
from model.outputs import FM_OUTPUTS
from model.user_index import graph_feeds


def read_config(path) -> mc.ModelConfig:
    return from_pbtxt(path.read_text())


@pytest.fixture
def repo(published_repo, tmp_path):
    shutil.copytree(published_repo, tmp_path / "repo")
    return ModelRepository(tmp_path / "repo")


def test_every_flavour_is_configured_from_the_same_onnx(per_example_repo, schema):
    # A per-example FM: one batch axis, so Triton batches it (a user-indexed FM's configs:
    # tests/test_shared_user.py).
    specs = {s.name: s for s in input_specs(schema)}
    for flavour in FLAVOURS:
        config = read_config(per_example_repo / FM_MODEL / config_filename(flavour))
        assert [i.name for i in config.input] == list(specs)
        for entry in config.input:
            # [B] inputs are [1] reshaped to []; sequences have a ragged axis.
            assert list(entry.dims) == ([-1] if specs[entry.name].rank == 2 else [1])
            assert entry.HasField("reshape") == (specs[entry.name].rank == 1)
        assert [o.name for o in config.output] == [*FM_OUTPUTS, FM_VERSION]
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        assert config.version_policy.latest.num_versions >= 1
        assert config.model_warmup and config.instance_group
    assert read_config(per_example_repo / FM_MODEL / "config.pbtxt").backend == "onnxruntime"
    assert read_config(per_example_repo / FM_MODEL / "configs/python.pbtxt").backend == "python"
    assert read_config(per_example_repo / FM_MODEL / "configs/tensorrt.pbtxt").platform == "tensorrt_plan"


def test_ensemble_feeds_fm_logits_through_the_adapter(repo):
    config = read_config(repo.root / ENSEMBLE_MODEL / "config.pbtxt")
    assert config.platform == "ensemble"
    fm, adapter = config.ensemble_scheduling.step
    assert (fm.model_name, adapter.model_name) == (FM_MODEL, ADAPTER_MODEL)
    assert adapter.input_map["fm_logits"] == fm.output_map["logits"]
    assert {o.name for o in config.output} >= {"logits", "adapted_logits", "embedding", "fm_version"}
    assert (repo.root / ENSEMBLE_MODEL / "1").is_dir()


def test_stamped_graph_reports_its_version_per_row(published_repo, schema):
    session = ort.InferenceSession(str(published_repo / FM_MODEL / "1" / "model.onnx"))
    batch = graph_feeds(random_batch(schema, 9, 4), session.get_inputs())
    (versions,) = session.run([FM_VERSION], batch)
    assert versions.shape == (9, 1) and (versions == 1).all()


def test_stamp_does_not_change_the_other_outputs(published_repo, schema):
    proto = onnx.load(str(published_repo / FM_MODEL / "1" / "model.onnx"))
    restamped = stamp_version(proto, "again", 7)
    session = ort.InferenceSession(proto.SerializeToString())
    batch = graph_feeds(random_batch(schema, 5, 3), session.get_inputs())
    before = session.run(list(FM_OUTPUTS), batch)
    *after, again = ort.InferenceSession(restamped.SerializeToString()).run([*FM_OUTPUTS, "again"], batch)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (again == 7).all()


def test_versions_grow_and_no_staging_folder_is_left(repo):
    source = repo.root / FM_MODEL / "1" / "model.onnx"
    published = repo.publish(FM_MODEL, source)
    assert published.version == 2 and repo.versions(FM_MODEL) == [1, 2]
    assert not [p for p in (repo.root / FM_MODEL).iterdir() if p.name.startswith(".staging")]
    stamped = onnx.load(str(published.path / "model.onnx"))
    assert [o.name for o in stamped.graph.output].count(FM_VERSION) == 1, "the old stamp must not be kept"


def test_rejected_version_numbers_are_not_reused(repo):
    source = repo.root / FM_MODEL / "1" / "model.onnx"
    repo.publish(FM_MODEL, source)
    moved = repo.reject(FM_MODEL, 2, "corrupt")
    assert (moved / "REASON").read_text().strip() == "corrupt"
    assert repo.versions(FM_MODEL) == [1]
    assert repo.publish(FM_MODEL, source).version == 3


def test_prune_keeps_the_newest(repo):
    source = repo.root / FM_MODEL / "1" / "model.onnx"
    for _ in range(3):
        repo.publish(FM_MODEL, source)
    assert repo.prune(FM_MODEL, keep=2) == [1, 2]
    assert repo.versions(FM_MODEL) == [3, 4]


def test_unreadable_onnx_and_unknown_model_are_refused(repo, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RepositoryError, match="not a readable ONNX model"):
        repo.publish(FM_MODEL, bad)
    with pytest.raises(RepositoryError, match="unknown model"):
        repo.publish("nope", bad)
    assert repo.versions(FM_MODEL) == [1]


def test_tensorrt_profiles_cover_batch_and_sequence(per_example_repo, schema):
    # One batch axis (a user-indexed FM's two axes: tests/test_shared_user.py).
    proto = onnx.load(str(per_example_repo / FM_MODEL / "1" / "model.onnx"))
    cfg = ProfileConfig(opt_batch=256, max_batch=2048, opt_seq=64, max_seq=256)
    by_name = {p.name: p for p in profiles(proto, cfg)}
    assert set(by_name) == {s.name for s in input_specs(schema)}
    assert (by_name["user_id"].min, by_name["user_id"].opt, by_name["user_id"].max) == ((1,), (256,), (2048,))
    seq = by_name["hist_item_id"]
    assert (seq.min, seq.opt, seq.max) == ((1, 1), (256, 64), (2048, 256))
    command = trtexec_command(per_example_repo / "m.onnx", per_example_repo / "m.plan", tuple(by_name.values()))
    assert "--stronglyTyped" in command
    assert any(a.startswith("--maxShapes=") and "hist_item_id:2048x256" in a for a in command)


def test_tensorrt_profile_rejects_inverted_bounds():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ProfileConfig(opt_batch=8192, max_batch=4096)


def test_tensorrt_build_says_where_to_run_when_absent(published_repo, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    if shutil.which("trtexec", path="/usr/src/tensorrt/bin"):
        pytest.skip("trtexec is installed here; the missing-TensorRT message cannot be seen")
    with pytest.raises(TensorRTUnavailable, match="docker run --rm --gpus all") as e:
        build_plan(published_repo / FM_MODEL / "1", ProfileConfig())
    # The command builds into the mounted version folder and renames the plan into place.
    assert "--onnx=/models/gem_fm/1/model.onnx" in str(e.value)
    assert "mv /models/gem_fm/1/.model.plan.tmp /models/gem_fm/1/model.plan" in str(e.value)


def test_fp16_graph_is_published_beside_the_fp32_one(tiny_checkpoint, tmp_path, schema):
    report = publish(load_checkpoint(tiny_checkpoint), ModelRepository(tmp_path / "repo"), PublishPolicy(fp16=True))
    assert 1e-6 < report.fp16_parity.worst <= FP16_PARITY_TOLERANCE, "a half graph differs, but only a little"
    half = onnx.load(str(report.fm.path / FP16_FILENAME))
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in half.graph.initializer}, "weights are half precision"
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [
        i.type.tensor_type.elem_type for i in onnx.load(str(report.fm.path / "model.onnx")).graph.input
    ], "the serving signature is unchanged"
    session = ort.InferenceSession(str(report.fm.path / FP16_FILENAME))
    (versions,) = session.run([FM_VERSION], graph_feeds(random_batch(schema, 3, 2), session.get_inputs()))
    assert (versions == 1).all()
    assert forbidden_ops(half) == []
    command = container_command(tmp_path / "repo", report.fm.path, ProfileConfig(), fp16=True)
    assert "--onnx=/models/gem_fm/1/model.fp16.onnx" in command
