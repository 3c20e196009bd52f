"""The public API: generated code is current, tensors survive the wire, validation."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.wire import WireError, decode, encode

from model.examples import random_batch
from model.features import USER_INDEX, user_input_names
from model.user_index import expand_users
from serving.validation import Limits, RequestError, assemble

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for fresh in generate.generate(tmp_path):
        committed = ROOT / "client" / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make protos`"


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.int64).reshape(2, 3), np.linspace(0, 1, 5, dtype=np.float32)])
def test_tensors_round_trip(array):
    np.testing.assert_array_equal(decode("x", encode(array)), array)


def test_wire_errors_name_the_tensor():
    with pytest.raises(WireError, match="hist_item_id: shape \\[2, 3\\]"):
        decode("hist_item_id", pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2, 3], data=b"\x00" * 8))
    with pytest.raises(WireError, match="ad_id: dtype"):
        decode("ad_id", pb.Tensor(dtype=0, shape=[1], data=b"\x00" * 8))
    with pytest.raises(WireError, match="cannot be sent"):
        encode(np.zeros(2, np.float64))


def test_a_shared_user_is_handed_over_user_indexed_and_other_shared_columns_broadcast(schema):
    user = set(user_input_names(schema))
    one, ads = random_batch(schema, 1, 7, seed=1), random_batch(schema, 5, 7, seed=2)
    ad_side = {k: v for k, v in ads.items() if k not in user}
    batch = assemble(schema, ad_side, {k: v for k, v in one.items() if k in user}, Limits())
    # Every user input shared: one user row and an index, nothing repeated per candidate.
    assert batch[USER_INDEX].tolist() == [0] * 5 and batch["hist_item_id"].shape == (1, 7)
    np.testing.assert_array_equal(expand_users(batch, user)["hist_item_id"], np.repeat(one["hist_item_id"], 5, 0))
    np.testing.assert_array_equal(batch["ad_id"], ads["ad_id"])
    # Only part of the user shared: per-example form, shared columns broadcast as views.
    partly = assemble(schema, {**ad_side, "user_id": ads["user_id"]},
                      {k: v for k, v in one.items() if k in user - {"user_id"}}, Limits())  # fmt: skip
    assert USER_INDEX not in partly
    assert partly["hist_item_id"].shape == (5, 7) and partly["hist_item_id"].strides[0] == 0


def test_a_feature_given_twice_is_refused(schema):
    b = random_batch(schema, 2, 2)
    with pytest.raises(RequestError, match="'user_id' is given both"):
        assemble(schema, b, {"user_id": b["user_id"][:1]}, Limits())
