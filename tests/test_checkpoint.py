import hashlib
import json
import shutil

import pytest
import torch

from model.adapter import StudentAdapter
from model.checkpoint import CheckpointError, CheckpointStore, ModelBundle, load_checkpoint, save_checkpoint
from model.examples import random_batch
from model.features import input_names
from model.gem import GEM
from model.outputs import LOGITS
from model.schema import schema_from_yaml
from trainer.train import to_tensors


@pytest.fixture
def saved(tmp_path, schema, tiny):
    torch.manual_seed(0)
    model, adapter = GEM(schema, tiny), StudentAdapter(len(schema.tasks), len(schema.surfaces))
    torch.nn.init.normal_(adapter.last.weight)
    path = save_checkpoint(tmp_path / "ckpt", ModelBundle(schema, tiny, model, adapter), {"gem": {"x": 1}})
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


def test_the_store_always_has_a_complete_checkpoint_and_tidies_what_a_kill_left(tmp_path, schema, tiny):
    torch.manual_seed(0)
    model, adapter = GEM(schema, tiny), StudentAdapter(len(schema.tasks), len(schema.surfaces))
    store = CheckpointStore(tmp_path)
    assert store.newest() is None and store.next_number() == 1
    first = store.save(
        1, ModelBundle(schema, tiny, model, adapter), {"n": 1}, optimizer=[{"state": {}, "param_groups": []}]
    )
    assert store.pointer.resolve() == first.resolve() and load_checkpoint(store.pointer).metrics == {"n": 1}
    assert load_checkpoint(first).optimizer == [{"state": {}, "param_groups": []}]
    second = store.save(2, ModelBundle(schema, tiny, model, adapter), {"n": 2})
    assert store.numbers() == [2] and store.pointer.resolve() == second.resolve()
    assert load_checkpoint(second).optimizer is None
    # A kill after the rename, before the pointer moved (and an older one not yet retired,
    # and a staged one never renamed): the newest complete one is the truth.
    third = tmp_path / "checkpoints" / "3"
    shutil.copytree(second, third)
    shutil.copytree(second, tmp_path / "checkpoints" / ".tmp-4")
    shutil.copytree(second, tmp_path / "checkpoints" / ".old-1")
    assert store.newest() == third
    removed = store.tidy()
    assert {p.name for p in removed} == {"2", ".tmp-4", ".old-1"}
    assert store.numbers() == [3] and store.pointer.resolve() == third.resolve()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


def test_the_store_adopts_a_checkpoint_of_the_old_layout_killed_between_its_renames(tmp_path, schema, tiny):
    model, adapter = GEM(schema, tiny), StudentAdapter(len(schema.tasks), len(schema.surfaces))
    # The old save moved `checkpoint` aside and was killed before renaming the new one in.
    save_checkpoint(tmp_path / ".checkpoint.tmp-77", ModelBundle(schema, tiny, model, adapter), {"new": True})
    save_checkpoint(tmp_path / ".checkpoint.old-77", ModelBundle(schema, tiny, model, adapter), {"new": False})
    store = CheckpointStore(tmp_path)
    store.tidy()
    assert load_checkpoint(store.pointer).metrics == {"new": True}
    assert not list(tmp_path.glob(".checkpoint*")) and store.numbers() == [1]
