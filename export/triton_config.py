"""Triton model configurations, derived from the ONNX graphs they serve.

Every model of the repository has one `config.pbtxt` per runtime flavour, all built
from the same ONNX file:

  onnxruntime  `config.pbtxt`            native ONNX Runtime backend (the NGC Triton image)
  python       `configs/python.pbtxt`    python backend running ONNX Runtime (the local
                                         server of the nvidia-pytriton wheel has only it)
  tensorrt     `configs/tensorrt.pbtxt`  a TensorRT plan built inside the serving container

Triton picks one with `--model-config-name` and falls back to `config.pbtxt`, so the
ensemble needs only the default file. Shapes come from the graph: a rank-1 input [B] is
declared `dims: [1]` reshaped to `[]` (Triton wants a non-batch dim), a ragged sequence
axis is `-1`.

A user-indexed FM graph (a `shared_user` GEM: user inputs [U, ...], candidate inputs
[B, ...], `user_index` [B]) has no common batch axis, which Triton's dynamic batcher
needs: its models (and the ensemble, and the adapter beside it) are configured without
Triton batching (`max_batch_size: 0`, full shapes, no dynamic batcher). Concurrent calls
are merged before Triton, in the front end's `@serve.batch` (N merged calls are one
request with U = N users), and the config names the user inputs in its `user_inputs`
parameter so that a client can build the user-indexed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.contract import (
    DEFAULT_FLAVOUR,
    FLAVOURS,
    LOADED_VERSIONS,
    MAX_BATCH_EXAMPLES,
    ONNX_FILENAME,
    PLAN_FILENAME,
    USER_INPUTS_PARAMETER,
)
from model.features import USER_INDEX, USERS_AXIS

_TRITON_DTYPES: dict[int, int] = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
}


@dataclass(frozen=True)
class ServingConfig:
    """How Triton batches and runs the models (all flavours)."""

    # Rows per model execution; the front end splits larger calls.
    max_batch_size: int = MAX_BATCH_EXAMPLES
    # How long the dynamic batcher may hold a request to fill a batch.
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = (512, 2048)
    instances: int = 1
    # FM versions loaded at once (and never pruned): callers may pin any of them.
    loaded_versions: int = LOADED_VERSIONS
    # ONNX Runtime threads per instance in the python flavour (0: one per core).
    intra_op_threads: int = 0
    warmup_batch_size: int = 64
    warmup_seq_len: int = 32


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: int
    # Non-batch dims as Triton declares them; -1 is dynamic.
    dims: tuple[int, ...]
    # True for a [B] tensor that Triton declares as [1] and reshapes to [].
    scalar: bool = False


def user_indexed(proto: onnx.ModelProto) -> bool:
    """Whether the graph takes the user-indexed form (no common batch axis)."""
    return any(i.name == USER_INDEX for i in proto.graph.input)


def user_inputs(proto: onnx.ModelProto) -> tuple[str, ...]:
    """The inputs on the graph's user axis (empty for a per-example graph)."""
    return tuple(
        i.name
        for i in proto.graph.input
        if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param == USERS_AXIS
    )


def graph_io(proto: onnx.ModelProto, batched: bool = True) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The graph's inputs and outputs as Triton tensors: without the first axis (the
    batch) when `batched`, else with every axis (-1 where dynamic)."""

    def convert(value: onnx.ValueInfoProto) -> Tensor:
        t = value.type.tensor_type
        if t.elem_type not in _TRITON_DTYPES:
            raise ValueError(f"{value.name}: ONNX type {onnx.TensorProto.DataType.Name(t.elem_type)} is not served")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim[0 if not batched else 1 :])
        if not dims:
            return Tensor(value.name, _TRITON_DTYPES[t.elem_type], (1,), scalar=True)
        return Tensor(value.name, _TRITON_DTYPES[t.elem_type], dims)

    return tuple(map(convert, proto.graph.input)), tuple(map(convert, proto.graph.output))


def config_io(config: mc.ModelConfig) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The inputs and outputs a written model config declares (the inverse of `_base`)."""

    def convert(entries) -> tuple[Tensor, ...]:
        return tuple(Tensor(e.name, e.data_type, tuple(e.dims), scalar=e.HasField("reshape")) for e in entries)

    return convert(config.input), convert(config.output)


def _add_tensors(field, tensors: tuple[Tensor, ...], reshape: bool) -> None:
    for t in tensors:
        entry = field.add(name=t.name, data_type=t.data_type, dims=list(t.dims))
        if reshape and t.scalar:
            entry.reshape.SetInParent()


def _base(
    name: str,
    inputs: tuple[Tensor, ...],
    outputs: tuple[Tensor, ...],
    cfg: ServingConfig,
    reshape: bool = True,
    batched: bool = True,
) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, max_batch_size=cfg.max_batch_size if batched else 0)
    _add_tensors(config.input, inputs, reshape)
    _add_tensors(config.output, outputs, reshape)
    config.version_policy.latest.num_versions = cfg.loaded_versions
    return config


def _warmup(config: mc.ModelConfig, inputs: tuple[Tensor, ...], cfg: ServingConfig) -> None:
    # Zeros are valid for every input (surface 0, empty sequences, user 0 of one) and
    # load every kernel. Without Triton batching the first axis is one row (U = B = 1).
    batched = config.max_batch_size > 0
    warmup = config.model_warmup.add(name="zeros", batch_size=cfg.warmup_batch_size if batched else 1)
    for t in inputs:
        w = warmup.inputs[t.name]
        w.data_type = t.data_type
        dims = [cfg.warmup_seq_len if d == -1 else d for d in t.dims]
        if not batched:
            dims[0] = 1
        w.dims[:] = dims
        w.zero_data = True


def model_config(
    name: str, proto: onnx.ModelProto, flavour: str, cfg: ServingConfig, batched: bool | None = None
) -> mc.ModelConfig:
    """The config of one ONNX-backed model (the FM or the adapter) in one flavour.
    `batched` (Triton batching and the dynamic batcher) defaults to: unless the graph
    is user-indexed."""
    if batched is None:
        batched = not user_indexed(proto)
    inputs, outputs = graph_io(proto, batched)
    config = _base(name, inputs, outputs, cfg, batched=batched)
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
        sizes = [b for b in cfg.preferred_batch_sizes if b <= cfg.max_batch_size]
        config.dynamic_batching.preferred_batch_size[:] = sizes
    if user_indexed(proto):
        config.parameters[USER_INPUTS_PARAMETER].string_value = ",".join(user_inputs(proto))
    group = config.instance_group.add(count=cfg.instances)
    if flavour == "onnxruntime":
        config.backend = "onnxruntime"
        config.default_model_filename = ONNX_FILENAME
    elif flavour == "python":
        config.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        config.parameters["onnx_file"].string_value = ONNX_FILENAME
        config.parameters["intra_op_threads"].string_value = str(cfg.intra_op_threads)
    elif flavour == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = PLAN_FILENAME
        group.kind = mc.ModelInstanceGroup.KIND_GPU
    else:
        raise ValueError(f"unknown flavour {flavour!r}; one of {', '.join(FLAVOURS)}")
    _warmup(config, inputs, cfg)
    return config


@dataclass(frozen=True)
class Step:
    """One model of an ensemble: ensemble tensor names by the model's own names."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def ensemble_config(
    name: str,
    inputs: tuple[Tensor, ...],
    outputs: tuple[Tensor, ...],
    steps: tuple[Step, ...],
    cfg: ServingConfig,
    user_inputs: tuple[str, ...] = (),
) -> mc.ModelConfig:
    """With `user_inputs` (a user-indexed FM) the ensemble is not batched by Triton and
    its tensors have full shapes."""
    # The ensemble passes tensors as they come ([B, 1]); its models do the reshape.
    config = _base(name, inputs, outputs, cfg, reshape=False, batched=not user_inputs)
    if user_inputs:
        config.parameters[USER_INPUTS_PARAMETER].string_value = ",".join(user_inputs)
    config.platform = "ensemble"
    for step in steps:
        # -1: the latest ready version of each composing model.
        entry = config.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        for k, v in step.inputs.items():
            entry.input_map[k] = v
        for k, v in step.outputs.items():
            entry.output_map[k] = v
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def from_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def config_filename(flavour: str) -> str:
    return "config.pbtxt" if flavour == DEFAULT_FLAVOUR else f"configs/{flavour}.pbtxt"
