"""The model repository's contract: the names `gem export` writes and everything that
serves or reads the repository relies on (the Triton launcher and client, the front
end's backends, `gem embed`, the side trainer's gate).

Plain strings and a directory listing only: importing this module loads neither torch
nor onnx, so the front end and `gem health` stay light.

  model_repo/
    gem_fm/            config.pbtxt, configs/<flavour>.pbtxt, <version>/{model.onnx, model.py}
    student_adapter/   same
    gem_knowledge/     config.pbtxt (ensemble: gem_fm -> student_adapter), 1/
"""

from __future__ import annotations

from pathlib import Path

from model.outputs import FM_OUTPUTS
from model.schema import SURFACE_INPUT

FM_MODEL = "gem_fm"
ADAPTER_MODEL = "student_adapter"
ENSEMBLE_MODEL = "gem_knowledge"
# Load order: the ensemble's members first.
MODELS = (FM_MODEL, ADAPTER_MODEL, ENSEMBLE_MODEL)

# The Student Adapter's signature: FM logits and the surface in, calibrated logits out.
ADAPTER_INPUTS = ("fm_logits", SURFACE_INPUT)
ADAPTER_OUTPUT = "adapted_logits"
# A parameter of the unbatched FM's (and the ensemble's) Triton config: the comma-separated
# inputs with one row per user ([U, ...]); the others have one row per candidate.
USER_INPUTS_PARAMETER = "user_inputs"
# Each published graph's extra output: a constant holding its version number.
FM_VERSION = "fm_version"
ADAPTER_VERSION = "adapter_version"
VERSION_OUTPUTS = {FM_MODEL: FM_VERSION, ADAPTER_MODEL: ADAPTER_VERSION}
# What one call to the ensemble returns.
KNOWLEDGE_OUTPUTS = (*FM_OUTPUTS, ADAPTER_OUTPUT, FM_VERSION, ADAPTER_VERSION)

# Files of a version folder.
ONNX_FILENAME = "model.onnx"
FP16_FILENAME = "model.fp16.onnx"
PLAN_FILENAME = "model.plan"
PYTHON_MODEL_FILENAME = "model.py"
# Runtime flavours: one config per flavour (`configs/<flavour>.pbtxt`), the default
# one also as `config.pbtxt`; Triton picks one with `--model-config-name`.
FLAVOURS = ("onnxruntime", "python", "tensorrt")
DEFAULT_FLAVOUR = "onnxruntime"
# Where the containers (compose, the TensorRT build) mount the repository.
CONTAINER_REPOSITORY = Path("/models")
# The most examples one Triton batch, one front-end batch and one call may hold (the
# Triton configs' max_batch_size and the front end's defaults).
MAX_BATCH_EXAMPLES = 4096
# Where the local Triton serves gRPC (the stack, the front end and `gem embed` default).
TRITON_GRPC_URL = "127.0.0.1:8001"
# Versions Triton refused, moved aside with the reason; their numbers are not reused.
REJECTED = ".rejected"


def published_versions(root: Path, model: str) -> list[int]:
    """The complete versions of `model`, oldest first (staging folders are hidden)."""
    folder = Path(root) / model
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(root: Path, model: str) -> int | None:
    versions = published_versions(root, model)
    return versions[-1] if versions else None
