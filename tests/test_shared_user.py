"""The shared-user arch: one user side per user, candidates by index (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.onnx_export import export_fm, forbidden_ops
from export.parity import check_fm_parity
from model.examples import random_batch, random_user_batch, zero_batch
from model.features import USER_INDEX, USERS_AXIS, input_names, user_indexed_specs, user_input_names
from model.gem import GEM
from model.user_index import expand_users, share_users

TOL = 1e-5


@pytest.fixture(scope="module")
def shared_cfg():
    from model.config import preset

    return preset("tiny").with_(sequence_arch="shared_user")


def _model(schema, cfg, seed=0):
    torch.manual_seed(seed)
    return GEM(schema, cfg).eval()


def _run(model, batch):
    tensors = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in batch.items()}
    with torch.no_grad():
        return {k: v.numpy() for k, v in model(tensors).items()}


def _assert_close(a, b, tol=TOL):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=0, err_msg=k)


@pytest.mark.parametrize("users,candidates", [(1, 1), (1, 9), (3, 11), (7, 7)])
def test_user_indexed_forward_equals_per_example_on_broadcast_rows(schema, shared_cfg, users, candidates):
    model = _model(schema, shared_cfg)
    indexed = random_user_batch(schema, users, candidates, 6, seed=users * 10 + candidates)
    per_example = expand_users(indexed, user_input_names(schema))
    assert set(per_example) == set(input_names(schema))
    _assert_close(_run(model, indexed), _run(model, per_example))


def test_identity_index_is_the_per_example_model(schema, shared_cfg):
    model = _model(schema, shared_cfg)
    batch = random_batch(schema, 5, 7, seed=3)
    indexed = share_users(batch, user_input_names(schema), dedup=False)
    assert indexed[USER_INDEX].tolist() == list(range(5))
    _assert_close(_run(model, indexed), _run(model, batch))


def test_share_users_merges_identical_users_and_keeps_others_apart(schema):
    users = user_input_names(schema)
    a = random_batch(schema, 1, 9, seed=1)
    b = random_batch(schema, 1, 9, seed=2)
    rows = random_batch(schema, 6, 9, seed=3)
    owner = np.array([0, 1, 0, 0, 1, 0])
    for n in users:
        rows[n] = np.concatenate([a[n], b[n]])[owner]
    shared = share_users(rows, users)
    assert len(shared[users[0]]) == 2
    assert len(shared[USER_INDEX]) == 6
    back = expand_users(shared, users)
    for n in rows:
        np.testing.assert_array_equal(back[n], rows[n])
    # Rows that differ only in one byte of one user input stay separate users.
    rows[users[-1]] = rows[users[-1]].copy()
    rows[users[-1]][3] += 1
    assert len(share_users(rows, users)[users[0]]) == 3


def test_share_users_on_all_distinct_rows_is_the_identity(schema):
    batch = random_batch(schema, 8, 4, seed=9)
    shared = share_users(batch, user_input_names(schema))
    assert len(shared[user_input_names(schema)[0]]) == 8
    for n in batch:
        np.testing.assert_array_equal(expand_users(shared, user_input_names(schema))[n], batch[n])


def test_per_example_arch_takes_user_indexed_batches_too(schema, tiny):
    model = _model(schema, tiny)
    indexed = random_user_batch(schema, 2, 6, 5, seed=4)
    _assert_close(_run(model, indexed), _run(model, expand_users(indexed, user_input_names(schema))))


def test_shared_user_trains(schema, shared_cfg):
    model = _model(schema, shared_cfg).train()
    batch = {k: torch.from_numpy(v) for k, v in random_batch(schema, 16, 12).items()}
    model(batch)["logits"].sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_empty_histories_are_finite(schema, shared_cfg):
    model = _model(schema, shared_cfg)
    out = _run(model, zero_batch(schema, user_indexed=True))
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, schema, shared_cfg):
    model = _model(schema, shared_cfg, seed=1)
    path = tmp_path_factory.mktemp("shared") / "fm.onnx"
    return model, path, export_fm(model, schema, path)


def test_export_takes_users_candidates_and_the_index(exported, schema):
    _, _, proto = exported
    assert [i.name for i in proto.graph.input] == [s.name for s in user_indexed_specs(schema)]
    users = set(user_input_names(schema))
    for value in proto.graph.input:
        axis0 = value.type.tensor_type.shape.dim[0].dim_param
        assert (axis0 == USERS_AXIS) == (value.name in users), value.name
    assert forbidden_ops(proto) == []


def test_onnx_runtime_user_indexed_equals_per_example(exported, schema):
    import onnxruntime as ort

    model, path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    shapes = [(1, 1, 1), (1, 40, 17), (5, 23, 9), (9, 9, 32)]
    batches = [random_user_batch(schema, u, b, length, seed=u + b) for u, b, length in shapes]
    for batch in batches:
        got = dict(zip(outputs, session.run(outputs, {n: batch[n] for n in names}), strict=True))
        want = _run(model, expand_users(batch, user_input_names(schema)))
        _assert_close(got, want)
    parity = check_fm_parity(model, path, batches)
    assert parity.worst < 1e-5


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory, schema, shared_cfg, synth_dir):
    """A repository with a user-indexed FM and its adapter (read-only)."""
    from export.publish import PublishPolicy, publish
    from export.repository import ModelRepository
    from model.adapter import StudentAdapter
    from model.checkpoint import ModelBundle, load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("shared-repo")
    model = _model(schema, shared_cfg, seed=2)
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
    ckpt = save_checkpoint(root / "ckpt", ModelBundle(schema, shared_cfg, model, adapter), metrics={})
    report = publish(load_checkpoint(ckpt), ModelRepository(root / "repo"), PublishPolicy(data=synth_dir))
    assert report.fm_parity.worst < 1e-4
    return root / "repo", model


def test_triton_configs_of_a_user_indexed_fm_are_unbatched_with_full_shapes(shared_repo, schema):
    from export.contract import ADAPTER_MODEL, ENSEMBLE_MODEL, FLAVOURS, FM_MODEL, USER_INPUTS_PARAMETER
    from export.triton_config import config_filename, from_pbtxt

    root, _ = shared_repo
    users = set(user_input_names(schema))
    specs = {s.name: s for s in user_indexed_specs(schema)}
    for flavour in FLAVOURS:
        config = from_pbtxt((root / FM_MODEL / config_filename(flavour)).read_text())
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert [i.name for i in config.input] == list(specs)
        for entry in config.input:
            assert list(entry.dims) == [-1] * specs[entry.name].rank and not entry.HasField("reshape")
        assert set(config.parameters[USER_INPUTS_PARAMETER].string_value.split(",")) == users
        (warmup,) = config.model_warmup
        assert warmup.batch_size == 1 and all(w.dims[0] == 1 for w in warmup.inputs.values())
        adapter = from_pbtxt((root / ADAPTER_MODEL / config_filename(flavour)).read_text())
        assert adapter.max_batch_size == 0 and not adapter.HasField("dynamic_batching")
    ensemble = from_pbtxt((root / ENSEMBLE_MODEL / "config.pbtxt").read_text())
    assert ensemble.max_batch_size == 0
    assert set(ensemble.parameters[USER_INPUTS_PARAMETER].string_value.split(",")) == users
    assert all(o.dims[0] == -1 and len(o.dims) == 2 for o in ensemble.output)


def test_tensorrt_profiles_cover_both_axes(shared_repo, schema):
    import onnx

    from export.contract import FM_MODEL
    from export.tensorrt import ProfileConfig, profiles

    root, _ = shared_repo
    proto = onnx.load(str(root / FM_MODEL / "1" / "model.onnx"), load_external_data=False)
    cfg = ProfileConfig(min_batch=1, opt_batch=256, max_batch=2048, min_users=1, opt_users=2, max_users=64)
    users = set(user_input_names(schema))
    for p in profiles(proto, cfg):
        assert (p.min[0], p.opt[0], p.max[0]) == ((1, 2, 64) if p.name in users else (1, 256, 2048)), p


def test_embedded_backend_and_gate_take_per_example_batches(shared_repo, schema):
    from export.contract import FM_MODEL
    from model.outputs import LOGITS
    from serving.backends.onnx import OnnxBackend
    from trainer.gate import onnx_logits

    root, model = shared_repo
    one_user = random_user_batch(schema, 1, 30, 12, seed=5)
    rows = expand_users(one_user, user_input_names(schema))  # the shared form, broadcast
    mixed = random_batch(schema, 9, 12, seed=6)
    backend = OnnxBackend(root)
    for batch in (rows, mixed, zero_batch(schema)):
        got = backend.run(batch, [LOGITS]).outputs[LOGITS]
        np.testing.assert_allclose(got, _run(model, batch)[LOGITS], atol=TOL, rtol=0)
    logits = onnx_logits(root / FM_MODEL / "1" / "model.onnx", mixed, schema)
    np.testing.assert_allclose(logits, _run(model, mixed)[LOGITS], atol=TOL, rtol=0)


def test_triton_serves_the_user_indexed_ensemble(shared_repo, schema, tmp_path):
    """The real tritonserver loads the unbatched FM/adapter/ensemble and the client sends
    per-example batches (one user repeated, and mixed users) in the user-indexed form."""
    import asyncio
    import shutil

    from model.outputs import LOGITS
    from serving.backends.triton_client import TritonClient
    from serving.local.ports import free_ports
    from serving.local.triton import TritonConfig, TritonServer

    root, model = shared_repo
    repo = tmp_path / "repo"
    shutil.copytree(root, repo)
    http, grpc, metrics = free_ports(3)
    cfg = TritonConfig(
        repository=repo, work_dir=tmp_path / "triton", http_port=http, grpc_port=grpc, metrics_port=metrics
    )
    one_user = expand_users(random_user_batch(schema, 1, 40, 10, seed=8), user_input_names(schema))
    mixed = random_batch(schema, 7, 10, seed=9)

    async def calls(url):
        async with TritonClient(url) as client:
            return await asyncio.gather(*(client.infer(b) for b in (one_user, mixed, one_user)))

    with TritonServer(cfg) as server:
        results = asyncio.run(calls(server.cfg.grpc_url))
    for batch, out in zip((one_user, mixed, one_user), results, strict=True):
        want = _run(model, batch)
        for name in want:
            np.testing.assert_allclose(out[name], want[name], atol=1e-4, rtol=0, err_msg=name)
        assert out["adapted_logits"].shape == want[LOGITS].shape and (out["fm_version"] == 1).all()
