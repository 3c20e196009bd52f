"""torch -> ONNX for the FM and the Student Adapter (their parity: `export.parity`).

The FM's ONNX inputs are named and ordered by `model.features.input_specs(schema)`,
with a dynamic batch axis and a dynamic sequence axis; its outputs are `logits`,
`embedding` and `user_embedding`. A `shared_user` FM (`GEMConfig.user_indexed`) takes
the user-indexed form instead (`user_indexed_specs`): the user-side inputs on their own
dynamic axis `users` [U, ...], the others on `batch` [B, ...], and `user_index` [B].
The graph must stay runnable by TensorRT: `forbidden_ops` lists what a graph must not
contain, and export refuses such a graph.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from export.contract import ADAPTER_INPUTS, ADAPTER_OUTPUT
from model.adapter import StudentAdapter
from model.examples import random_batch, random_user_batch
from model.features import BATCH_AXIS, USERS_AXIS, input_specs, user_indexed_specs, user_input_names
from model.files import atomic_path
from model.gem import GEM
from model.outputs import FM_OUTPUTS
from model.schema import FeatureSchema

log = logging.getLogger(__name__)

# Opset 18 keeps attention as MatMul/Softmax (no fused Attention op) for TensorRT.
OPSET = 18
# Ops TensorRT's ONNX parser cannot run, or that hide per-row control flow.
TENSORRT_UNSUPPORTED = frozenset(
    {"EmbeddingBag", "Loop", "Scan", "If", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
     "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceErase", "Unique", "NonZero"}
)  # fmt: skip


class ExportError(RuntimeError):
    """Export produced a graph that must not be served (parity, checker, ops)."""


class _PositionalFM(nn.Module):
    """GEM with positional inputs in schema order and a tuple of outputs, as ONNX wants.

    With `dtype=float16` the weights and the computation are half precision while the
    graph's inputs and outputs stay float32 (casts at the edges), so the serving
    signature does not change: that graph is what a strongly typed TensorRT network
    builds an FP16 plan from."""

    def __init__(self, model: GEM, names: tuple[str, ...], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model.to(dtype)
        self.names = names
        self.dtype = dtype

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        inputs = tuple(x.to(self.dtype) if x.is_floating_point() else x for x in inputs)
        out = self.model(dict(zip(self.names, inputs, strict=True)))
        return tuple(out[k].float() for k in FM_OUTPUTS)


def _rename(proto: onnx.ModelProto, old: str, new: str) -> None:
    g = proto.graph
    for node in g.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for v in [*g.input, *g.output, *g.value_info]:
        if v.name == old:
            v.name = new


def _name_outputs(proto: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    """Gives the graph outputs their contract names.

    The exporter names intermediate values after their ops (the output of
    aten.embedding is called `embedding`), which would clash with the output of the
    same name; such intermediates are renamed first.
    """
    used = {x for node in proto.graph.node for x in (*node.input, *node.output)}
    outputs = [o.name for o in proto.graph.output]
    for name in names:
        if name in used and name not in outputs:
            _rename(proto, name, f"{name}__internal")
    for old, new in zip(outputs, names, strict=True):
        _rename(proto, old, new)
    return proto


def _atomic_save(proto: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)


# Largest batch the exported graphs accept; the batch axis is dynamic below it.
MAX_BATCH = 1 << 16


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_shapes: dict[str, Any] | tuple[Any, ...],
    what: str,
    path: Path,
) -> onnx.ModelProto:
    """Exports, names the outputs, validates (checker + TensorRT ops), saves atomically."""
    module.eval()
    # The exporter warns about optional packages (torchvision) and axis renames that
    # do not concern these graphs; what matters is checked below.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    # onnx_ir's passes log each deduplicated initializer at INFO (~220 lines per export);
    # shown with `gem -v` (root at DEBUG) only.
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(input_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    # The dynamo exporter returns a program or raises (None is the TorchScript path's).
    assert program is not None
    proto = _name_outputs(program.model_proto, output_names)
    _validate(proto, what)
    _atomic_save(proto, path)
    return proto


def export_fm(model: GEM, schema: FeatureSchema, path: Path, fp16: bool = False) -> onnx.ModelProto:
    """The FM as ONNX; `fp16` exports a half-precision copy (the model is not changed)."""
    seq_len = min(8, model.cfg.seq_len)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    users = batch
    if model.cfg.user_indexed:
        specs = user_indexed_specs(schema)
        # Different U and B in the example, so the exporter keeps the two axes apart.
        example = random_user_batch(schema, users=3, candidates=5, seq_len=seq_len)
        users = torch.export.Dim(USERS_AXIS, min=1, max=MAX_BATCH)
    else:
        specs = input_specs(schema)
        example = random_batch(schema, batch_size=4, seq_len=seq_len)
    names = tuple(s.name for s in specs)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    seq = torch.export.Dim("seq_len", min=1, max=max(s.max_length for s in schema.sequences) if schema.sequences else 1)
    user_side = set(user_input_names(schema))
    shapes = tuple({0: users if s.name in user_side else batch, **({1: seq} if s.rank == 2 else {})} for s in specs)
    module = _PositionalFM(copy.deepcopy(model), names, torch.float16) if fp16 else _PositionalFM(model, names)
    # `inputs` is the varargs of _PositionalFM.forward.
    return _export(module, args, names, FM_OUTPUTS, {"inputs": shapes}, "FM fp16" if fp16 else "FM", path)


def export_adapter(adapter: StudentAdapter, path: Path) -> onnx.ModelProto:
    args = (torch.zeros(4, adapter.n_tasks), torch.zeros(4, dtype=torch.int64))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = ({0: batch}, {0: batch})
    return _export(adapter, args, ADAPTER_INPUTS, (ADAPTER_OUTPUT,), shapes, "Student Adapter", path)


def forbidden_ops(proto: onnx.ModelProto) -> list[str]:
    """Op types in the graph (and its subgraphs and functions) that TensorRT cannot run."""
    found: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in TENSORRT_UNSUPPORTED:
                found.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    for fn in proto.functions:
        found |= {n.op_type for n in fn.node if n.op_type in TENSORRT_UNSUPPORTED}
    return sorted(found)


def _validate(proto: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{what}: onnx.checker rejects the graph: {e}") from None
    bad = forbidden_ops(proto)
    if bad:
        raise ExportError(f"{what}: graph contains ops TensorRT cannot run: {', '.join(bad)}")
