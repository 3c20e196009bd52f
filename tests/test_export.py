"""torch -> ONNX: parity with PyTorch, a TensorRT-friendly graph, the adapter."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.contract import ADAPTER_INPUTS, ADAPTER_OUTPUT
from export.onnx_export import ExportError, export_adapter, export_fm, forbidden_ops
from export.parity import check_fm_parity
from model.adapter import StudentAdapter
from model.config import preset
from model.data.reader import read_batch, resolve_paths
from model.embedding import dense_stats, set_dense_stats
from model.examples import random_batch
from model.features import input_specs, user_indexed_specs
from model.gem import GEM
from model.outputs import FM_OUTPUTS
from model.user_index import graph_feeds


@pytest.fixture(scope="module")
def exported(tmp_path_factory, schema):
    torch.manual_seed(0)
    model = GEM(schema, preset("tiny")).eval()
    path = tmp_path_factory.mktemp("onnx") / "fm.onnx"
    proto = export_fm(model, schema, path)
    return model, path, proto


def test_signature_is_named_from_the_schema(exported, schema):
    model, _, proto = exported
    specs = user_indexed_specs(schema) if model.cfg.user_indexed else input_specs(schema)
    assert [i.name for i in proto.graph.input] == [s.name for s in specs]
    assert [o.name for o in proto.graph.output] == list(FM_OUTPUTS)
    seq = next(i for i in proto.graph.input if i.name == "hist_item_id")
    dims = seq.type.tensor_type.shape.dim
    assert len(dims) == 2 and all(d.dim_param for d in dims), "batch and sequence axes must be dynamic"


def test_parity_on_random_and_real_batches(exported, schema, synth_dir):
    model, path, _ = exported
    real = read_batch(resolve_paths(synth_dir)[-1], schema, max_seq_len=model.cfg.seq_len, labels=False)
    real = {k: v[:300] for k, v in real.items()}
    batches = [random_batch(schema, b, length, seed=b) for b, length in [(1, 1), (5, 7), (64, 32)]]
    parity = check_fm_parity(model, path, [*batches, real])
    assert parity.batches == 4
    assert parity.worst <= 1e-4


def test_parity_check_fails_loudly_on_a_different_model(exported, schema):
    _, path, _ = exported
    torch.manual_seed(99)
    other = GEM(schema, preset("tiny")).eval()
    with pytest.raises(ExportError, match="parity check failed"):
        check_fm_parity(other, path, [random_batch(schema, 8, 8)])


def test_graph_has_no_ops_tensorrt_cannot_run(exported):
    _, _, proto = exported
    ops = {n.op_type for n in proto.graph.node}
    assert forbidden_ops(proto) == []
    assert "MatMul" in ops and "Softmax" in ops  # attention is plain ops


def test_forbidden_ops_are_found_also_in_subgraphs():
    inner = onnx.helper.make_graph([onnx.helper.make_node("NonZero", ["x"], ["y"])], "inner", [], [])
    node = onnx.helper.make_node("If", ["c"], ["z"], then_branch=inner, else_branch=inner)
    proto = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    assert forbidden_ops(proto) == ["If", "NonZero"]


def test_adapter_exports_as_its_own_model(tmp_path, schema):
    torch.manual_seed(0)
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
    torch.nn.init.normal_(adapter.last.weight)
    proto = export_adapter(adapter, tmp_path / "adapter.onnx")
    assert [i.name for i in proto.graph.input] == list(ADAPTER_INPUTS)
    logits = np.random.default_rng(0).normal(size=(33, len(schema.tasks))).astype(np.float32)
    surface = np.arange(33) % len(schema.surfaces)
    session = ort.InferenceSession(str(tmp_path / "adapter.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run([ADAPTER_OUTPUT], {"fm_logits": logits, "surface": surface})
    with torch.no_grad():
        want = adapter(torch.from_numpy(logits), torch.from_numpy(surface)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_after_tasks_stay_below_their_parent_through_onnx(tmp_path, schema, synth_dir):
    """ESMM in the FM and the order-keeping adapter, through ONNX Runtime: with raw
    (unscaled) dense values, normalization statistics baked into the graph, and heads
    and an adapter pushed hard enough that unordered logits would show."""
    torch.manual_seed(1)
    model = GEM(schema, preset("tiny")).eval()
    real = read_batch(resolve_paths(synth_dir)[0], schema, max_seq_len=32, labels=False)
    set_dense_stats(model, dense_stats(schema.dense, [real]))
    for p in model.towers.parameters():
        torch.nn.init.normal_(p, std=2.0)
    fm_path, adapter_path = tmp_path / "fm.onnx", tmp_path / "adapter.onnx"
    export_fm(model, schema, fm_path)
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents).eval()
    torch.nn.init.normal_(adapter.last.weight, std=2.0)
    torch.nn.init.normal_(adapter.last.bias, std=2.0)
    export_adapter(adapter, adapter_path)

    batches = [{k: v[:500] for k, v in real.items()}, random_batch(schema, 300, 16, seed=5)]
    batches[1] = {
        k: (v * 1e5).astype(v.dtype) if k in {f.name for f in schema.dense} else v for k, v in batches[1].items()
    }
    # Heads pushed hard give large logits: the absolute tolerance scales with them.
    assert check_fm_parity(model, fm_path, batches, tolerance=1e-3).worst <= 1e-3
    fm = ort.InferenceSession(str(fm_path), providers=["CPUExecutionProvider"])
    ad = ort.InferenceSession(str(adapter_path), providers=["CPUExecutionProvider"])
    click, conversion = schema.task_names.index("click"), schema.task_names.index("conversion")
    for batch in batches:
        (logits,) = fm.run(["logits"], graph_feeds(batch, fm.get_inputs()))
        (adapted,) = ad.run([ADAPTER_OUTPUT], {"fm_logits": logits, "surface": batch["surface"]})
        for out in (logits, adapted):
            assert np.isfinite(out).all()
            probs = 1.0 / (1.0 + np.exp(-out.astype(np.float64)))
            assert (probs[:, conversion] <= probs[:, click]).all()
    with torch.no_grad():
        torch_adapted = adapter(torch.from_numpy(logits), torch.from_numpy(batch["surface"])).numpy()
    np.testing.assert_allclose(adapted, torch_adapted, rtol=1e-5, atol=1e-4)
