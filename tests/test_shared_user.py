"""The shared-user arch: one user side per user, candidates by index (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.onnx_export import check_fm_parity, export_fm, forbidden_ops
from model.features import (
    USER_INDEX,
    USERS_AXIS,
    expand_users,
    input_names,
    random_batch,
    random_user_batch,
    share_users,
    user_indexed_specs,
    user_input_names,
    zero_batch,
)
from model.gem import GEM

TOL = 1e-5


@pytest.fixture(scope="module")
def shared_cfg():
    from model.config import preset

    return preset("tiny").with_(sequence_arch="shared_user")


def _model(schema, cfg, seed=0):
    torch.manual_seed(seed)
    return GEM(schema, cfg).eval()


def _run(model, batch):
    with torch.no_grad():
        return {k: v.numpy() for k, v in model({k: torch.from_numpy(np.require(v, requirements="W")) for k, v in batch.items()}).items()}


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
    model, path, proto = exported
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
    batches = [random_user_batch(schema, u, b, length, seed=u + b) for u, b, length in [(1, 1, 1), (1, 40, 17), (5, 23, 9), (9, 9, 32)]]
    for batch in batches:
        got = dict(zip(outputs, session.run(outputs, {n: batch[n] for n in names}), strict=True))
        want = _run(model, expand_users(batch, user_input_names(schema)))
        _assert_close(got, want)
    parity = check_fm_parity(model, path, batches)
    assert parity.worst < 1e-5
