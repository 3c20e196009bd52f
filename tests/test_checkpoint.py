import hashlib
import json

import pytest
import torch

from model.adapter import StudentAdapter
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.features import LOGITS, input_names, random_batch
from model.gem import GEM
from model.schema import schema_from_yaml
from trainer.train import to_tensors


@pytest.fixture
def saved(tmp_path, schema, tiny):
    torch.manual_seed(0)
    model, adapter = GEM(schema, tiny), StudentAdapter(len(schema.tasks), len(schema.surfaces))
    torch.nn.init.normal_(adapter.mlp[-1].weight)
    path = save_checkpoint(tmp_path / "ckpt", schema, tiny, model, adapter, {"gem": {"x": 1}})
    return path, model.eval(), adapter


def test_round_trip_gives_identical_outputs(saved, schema):
    path, model, adapter = saved
    ckpt = load_checkpoint(path, expect_schema=schema)
    batch = to_tensors(random_batch(schema, 7, 9), input_names(schema))
    with torch.no_grad():
        a, b = model(batch), ckpt.model(batch)
        for k in a:
            assert torch.equal(a[k], b[k])
        s = batch["surface"]
        assert torch.equal(adapter(a[LOGITS], s), ckpt.adapter(b[LOGITS], s))
    assert ckpt.metrics == {"gem": {"x": 1}}
    assert not list(path.parent.glob(".ckpt.*")), "temporary folders left behind"


def test_corrupt_weights_are_detected(saved):
    path, _, _ = saved
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.pt is corrupt \(sha256 does not match"):
        load_checkpoint(path)


def test_truncated_weights_with_a_forged_manifest_still_fail_cleanly(saved):
    path, _, _ = saved
    (path / "model.pt").write_bytes(b"garbage")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"]["model.pt"] = hashlib.sha256(b"garbage").hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.pt cannot be loaded into the model"):
        load_checkpoint(path)


def test_missing_pieces(saved, tmp_path):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope")
    (path / "adapter.pt").unlink()
    with pytest.raises(CheckpointError, match=r"adapter\.pt is missing"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        load_checkpoint(path)


def test_schema_mismatch_names_the_difference(saved, schema):
    path, _, _ = saved
    text = schema.to_yaml().replace("name: user_gender", "name: user_sex")
    other = schema_from_yaml(text)
    with pytest.raises(CheckpointError, match="does not match the schema 'ads_v1': sparse: has 'user_gender'"):
        load_checkpoint(path, expect_schema=other)
