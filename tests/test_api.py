"""The public API: generated code is current, tensors survive the wire, validation."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.wire import WireError, decode, encode

from model.examples import random_batch
from model.features import input_specs
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


def test_shared_columns_are_broadcast_without_copies(schema):
    user = {s.name for s in input_specs(schema) if s.side == "user"}
    one, ads = random_batch(schema, 1, 7, seed=1), random_batch(schema, 5, 7, seed=2)
    batch = assemble(
        schema, {k: v for k, v in ads.items() if k not in user}, {k: v for k, v in one.items() if k in user}, Limits()
    )
    assert batch["hist_item_id"].shape == (5, 7) and batch["hist_item_id"].strides[0] == 0
    np.testing.assert_array_equal(batch["ad_id"], ads["ad_id"])


def test_a_feature_given_twice_is_refused(schema):
    b = random_batch(schema, 2, 2)
    with pytest.raises(RequestError, match="'user_id' is given both"):
        assemble(schema, b, {"user_id": b["user_id"][:1]}, Limits())
