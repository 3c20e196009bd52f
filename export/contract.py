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
# In an adapter version folder: the FM version it was published for. A pinned call to
# FM version V runs the newest adapter published for V: an adapter-only refresh is fitted
# on the latest FM's logits, so it serves that FM only, and an older FM keeps its own.
PAIRED_FM_FILENAME = "FM_VERSION"
# A parameter of the adapter's Triton config: "fm:adapter,..." for every loaded FM
# version, so that a front end without the repository knows which adapter a pin runs.
FM_ADAPTERS_PARAMETER = "fm_adapters"
# FM versions kept loaded (and never pruned) so that callers may pin one (serving config).
LOADED_VERSIONS = 2
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


def paired_fm(root: Path, adapter_version: int) -> int | None:
    """The FM version an adapter version was published for (None: not recorded)."""
    path = Path(root) / ADAPTER_MODEL / str(adapter_version) / PAIRED_FM_FILENAME
    return int(path.read_text()) if path.is_file() else None


def paired_adapter(root: Path, fm_version: int) -> int | None:
    """The adapter a call pinned to `fm_version` runs: the newest one published for it.
    A repository written before adapters recorded their FM pairs its latest FM with
    its latest adapter."""
    adapters = published_versions(root, ADAPTER_MODEL)
    paired = [a for a in adapters if paired_fm(root, a) == fm_version]
    if paired:
        return paired[-1]
    unrecorded = adapters and all(paired_fm(root, a) is None for a in adapters)
    return adapters[-1] if unrecorded and fm_version == latest_version(root, FM_MODEL) else None


def loaded_pairs(root: Path, count: int) -> list[tuple[int, int]]:
    """(FM version, its adapter) of the newest `count` FM versions that have an adapter,
    newest first: what a server keeps loaded for pinned calls."""
    pairs = []
    for fm in reversed(published_versions(root, FM_MODEL)[-count:] if count > 0 else []):
        adapter = paired_adapter(root, fm)
        if adapter is not None:
            pairs.append((fm, adapter))
    return pairs


def format_pairs(pairs: list[tuple[int, int]]) -> str:
    """(FM, adapter) pairs as the `fm_adapters` parameter holds them."""
    return ",".join(f"{fm}:{adapter}" for fm, adapter in pairs)


def parse_pairs(text: str) -> dict[int, int]:
    """The `fm_adapters` parameter: FM version -> its adapter version."""
    pairs = (item.split(":") for item in text.split(",") if item)
    return {int(fm): int(adapter) for fm, adapter in pairs}
