"""User-indexed batches: refused with the input named when they do not hold together
(index out of range, no users for some candidates, rows that disagree), everywhere a
pre-indexed batch enters a graph (ONNX Runtime, the Triton client); expanded for a
per-example graph; users grouped by a request / user key."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from model.batch import concat
from model.examples import random_batch, random_user_batch
from model.features import USER_INDEX, user_input_names
from model.outputs import LOGITS
from model.user_index import (
    UserIndexError,
    candidate_rows,
    check_user_indexed,
    concat_batches,
    expand_users,
    graph_feeds,
    share_users,
)

TOL = 1e-5
USERS, CANDIDATES = 3, 10


def good(schema) -> dict[str, np.ndarray]:
    return random_user_batch(schema, USERS, CANDIDATES, 4, seed=11)


def _with(batch, **replace):
    return {**batch, **replace}


def bad_batch(schema, case: str) -> tuple[dict[str, np.ndarray], str, str]:
    """(batch, the input the error must name, a fragment of its message)."""
    b = good(schema)
    index = b[USER_INDEX]
    users = user_input_names(schema)
    negative, too_big = index.copy(), index.copy()
    negative[4], too_big[2] = -1, USERS
    return {
        "index not int64": (_with(b, user_index=index.astype(np.int32)), USER_INDEX, "int64"),
        "index not rank 1": (_with(b, user_index=index[:, None]), USER_INDEX, "shape"),
        "index not B rows": (_with(b, user_index=index[:-1]), USER_INDEX, f"{CANDIDATES - 1} rows"),
        "index negative": (_with(b, user_index=negative), USER_INDEX, f"outside [0, {USERS})"),
        "index >= U": (_with(b, user_index=too_big), USER_INDEX, f"first {USERS} at candidate 2"),
        "U = 0 with B > 0": ({**b, **{n: b[n][:0] for n in users}}, users[0], "0 rows"),
        "a sequence's user rows disagree": (_with(b, hist_item_id=b["hist_item_id"][:2]), "hist_item_id", "2 rows"),
        "a dense user input's rows disagree": (
            _with(b, user_ctr_7d=np.concatenate([b["user_ctr_7d"], b["user_ctr_7d"][:1]])),
            "user_ctr_7d",
            f"{USERS + 1} rows",
        ),
        "a candidate input's rows differ from B": (_with(b, ad_id=b["ad_id"][:-1]), "ad_id", f"{CANDIDATES - 1} rows"),
    }[case]


BAD = (
    "index not int64", "index not rank 1", "index not B rows", "index negative", "index >= U", "U = 0 with B > 0",
    "a sequence's user rows disagree", "a dense user input's rows disagree", "a candidate input's rows differ from B",
)  # fmt: skip


def test_a_good_batch_gives_its_users(schema):
    assert check_user_indexed(good(schema), user_input_names(schema)) == USERS
    empty = {k: v[:0] for k, v in good(schema).items()}
    assert check_user_indexed(empty, user_input_names(schema)) == 0


@pytest.mark.parametrize("case", BAD)
def test_each_bad_batch_is_refused_naming_the_input(schema, case):
    batch, named, fragment = bad_batch(schema, case)
    with pytest.raises(UserIndexError) as e:
        check_user_indexed(batch, user_input_names(schema))
    assert isinstance(e.value, ValueError) and e.value.name == named
    assert repr(named) in str(e.value) and fragment in str(e.value), str(e.value)


def test_share_users_by_key_keeps_requests_apart_and_falls_back_when_a_key_disagrees(schema):
    users = user_input_names(schema)
    a, b = random_batch(schema, 1, 9, seed=1), random_batch(schema, 1, 9, seed=2)
    rows = random_batch(schema, 6, 9, seed=3)
    owner = np.array([0, 1, 0, 0, 1, 0])
    for n in users:
        rows[n] = np.concatenate([a[n], b[n]])[owner]
    # Requests 10 and 12 are the same user (same features): a key keeps them apart.
    requests = np.array([10, 11, 12, 10, 11, 12])
    by_content, by_key = share_users(rows, users), share_users(rows, users, keys=requests)
    assert len(by_content["user_id"]) == 2 and len(by_key["user_id"]) == 3
    # One key for every row although they are two users: the key is not trusted.
    fallback = share_users(rows, users, keys=np.zeros(6, np.int64))
    assert len(fallback["user_id"]) == 2
    for shared in (by_content, by_key, fallback):
        assert check_user_indexed(shared, users) == len(shared["user_id"])
        back = expand_users(shared, users)
        for n in rows:
            np.testing.assert_array_equal(back[n], rows[n], err_msg=n)
    with pytest.raises(ValueError, match="keys"):
        share_users(rows, users, keys=requests[:5])


def test_concat_batches_of_both_forms_is_their_per_example_concat(schema):
    users = user_input_names(schema)
    indexed = good(schema)
    narrow = random_user_batch(schema, 1, 4, 2, seed=12)  # shorter histories: padded on merge
    per_example = random_batch(schema, 5, 3, seed=13)
    parts = [indexed, per_example, narrow]
    merged = concat_batches(parts, users)
    assert check_user_indexed(merged, users) == USERS + len(share_users(per_example, users)[users[0]]) + 1
    want = concat([expand_users(b, users) for b in parts])
    got = expand_users(merged, users)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Per-example batches alone stay per-example.
    assert USER_INDEX not in concat_batches([per_example, per_example], users)


def test_candidate_rows_are_user_indexed_batches_of_their_own(schema):
    users = user_input_names(schema)
    batch = random_user_batch(schema, 5, 23, 6, seed=4)
    whole = expand_users(batch, users)
    for start in range(0, 23, 7):
        part = candidate_rows(batch, users, start, start + 7)
        assert check_user_indexed(part, users) == len(np.unique(batch[USER_INDEX][start : start + 7]))
        for n, v in expand_users(part, users).items():
            np.testing.assert_array_equal(v, whole[n][start : start + 7], err_msg=n)


def test_a_per_example_graph_cannot_guess_the_users_when_u_equals_b(schema):
    """Without the schema's user names, only row counts tell users from candidates."""

    class Input:
        def __init__(self, name):
            self.name, self.shape = name, ["batch"]

    inputs = [Input(n) for n in random_batch(schema, 1, 1)]
    batch = random_user_batch(schema, 4, 4, 3, seed=5)
    batch[USER_INDEX] = np.array([1, 0, 3, 3], np.int64)
    with pytest.raises(UserIndexError, match="cannot be told"):
        graph_feeds(batch, inputs)
    feeds = graph_feeds(batch, inputs, user_input_names(schema))
    want = expand_users(batch, user_input_names(schema))
    assert feeds.keys() == want.keys()
    for n in feeds:
        np.testing.assert_array_equal(feeds[n], want[n])


def _torch(model, batch):
    tensors = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in batch.items()}
    with torch.no_grad():
        return model(tensors)[LOGITS].numpy()


@pytest.mark.parametrize("case", BAD)
def test_onnx_runtime_backend_refuses_bad_pre_indexed_batches(shared_user_repo, per_example_repo, schema, case):
    from serving.backends.onnx import OnnxBackend

    batch, named, fragment = bad_batch(schema, case)
    per_example = OnnxBackend(per_example_repo, user_names=user_input_names(schema))
    for backend in (OnnxBackend(shared_user_repo[0]), per_example):
        with pytest.raises(UserIndexError) as e:
            backend.run(batch, [LOGITS])
        assert e.value.name == named and fragment in str(e.value), str(e.value)


def test_good_pre_indexed_batches_equal_the_per_example_result(shared_user_repo, per_example_repo, schema):
    from model.checkpoint import load_checkpoint
    from serving.backends.onnx import OnnxBackend

    users = user_input_names(schema)
    batches = [
        random_user_batch(schema, u, b, length, seed=u + b) for u, b, length in ((1, 7, 5), (4, 19, 9), (6, 6, 3))
    ]
    per_example = OnnxBackend(per_example_repo)
    named = OnnxBackend(per_example_repo, user_names=users)
    indexed = OnnxBackend(shared_user_repo[0])
    assert asyncio.run(per_example.fm_user_inputs()) is None
    assert set(asyncio.run(indexed.fm_user_inputs()) or ()) == set(users)
    tiny = load_checkpoint(per_example_repo.parent / "ckpt").model
    for batch in batches:
        rows = expand_users(batch, users)
        for backend, model in ((named, tiny), (indexed, shared_user_repo[1])):
            got = backend.run(batch, [LOGITS, "adapted_logits"]).outputs
            want = backend.run(rows, [LOGITS, "adapted_logits"]).outputs
            for k in got:
                np.testing.assert_allclose(got[k], want[k], atol=TOL, rtol=0, err_msg=k)
            np.testing.assert_allclose(got[LOGITS], _torch(model, rows), atol=1e-4, rtol=0)
        if len(batch["user_id"]) != len(batch[USER_INDEX]):  # row counts tell the users apart
            got = per_example.run(batch, [LOGITS]).outputs[LOGITS]
            np.testing.assert_array_equal(got, named.run(batch, [LOGITS]).outputs[LOGITS])


def _client(users: tuple[str, ...] | None, user_names=None):
    """A Triton client that knows the model's form without asking a server."""
    from serving.backends.triton_client import TritonClient

    client = TritonClient("127.0.0.1:1", user_names=user_names)
    client._forms[client.model] = users
    return client


@pytest.mark.parametrize("case", BAD)
def test_triton_client_refuses_bad_pre_indexed_batches_before_sending(schema, case):
    batch, named, fragment = bad_batch(schema, case)
    users = user_input_names(schema)

    async def call(form):
        client = _client(form, user_names=users)
        try:
            return await client.infer(batch)
        finally:
            await client.close()

    for form in (users, None):  # a user-indexed model, a per-example one
        with pytest.raises(UserIndexError) as e:
            asyncio.run(call(form))
        assert e.value.name == named and fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("form", ["user-indexed", "per-example"])
def test_triton_client_sends_each_model_its_form_in_chunks(schema, form):
    users = user_input_names(schema)
    batch = random_user_batch(schema, 5, 23, 6, seed=6)
    sent = []

    async def call():
        client = _client(users if form == "user-indexed" else None, user_names=users)

        async def fake_infer(part, outputs, version, model, timeout_s):
            sent.append(part)
            rows = expand_users(part, users)
            return {"user_id": rows["user_id"], "ad_id": rows["ad_id"]}

        client._infer = fake_infer
        try:
            return await client.infer(batch, outputs=["user_id", "ad_id"], chunk=7)
        finally:
            await client.close()

    got = asyncio.run(call())
    whole = expand_users(batch, users)
    assert len(sent) == 4
    for part in sent:
        assert (USER_INDEX in part) == (form == "user-indexed")
        if form == "user-indexed":
            check_user_indexed(part, users)
    for n in got:
        np.testing.assert_array_equal(got[n], whole[n], err_msg=n)


def test_front_end_maps_value_errors_to_invalid_argument():
    from serving.backends.errors import status_of

    code, message = status_of(UserIndexError("input 'user_index': 1 value(s) outside [0, 3)", USER_INDEX), 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'user_index'" in message
    assert status_of(ValueError("anything"), 1)[0] == grpc.StatusCode.INVALID_ARGUMENT
