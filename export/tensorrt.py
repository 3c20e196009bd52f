"""TensorRT plans for the FM: optimization profiles and the build.

A plan only loads in the TensorRT version and GPU family that built it, so it is built
where it is served: by `gem export --tensorrt` where `trtexec` is, or, where it is not,
by the `docker run` of the NGC Triton image that its error message spells out, or by the
script `gem tensorrt-script` writes for docker-compose.yml's `tensorrt-build` service;
either way into the version folder next to `model.onnx`, where `configs/tensorrt.pbtxt`
expects it.

The profile gives every input its min/opt/max shape: the batch axis from 1 to the
serving max batch, the sequence axis from 1 to the schema's max length, optimized for a
typical call. A user-indexed graph's user inputs ([U, ...]) get their own range,
users 1 to the serving max batch, optimized for a few users per merged call.
Precision comes from the graph (TensorRT 11 dropped the FP16 builder
flag; networks are strongly typed), so `--stronglyTyped` is always passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import onnx

from export.contract import (
    ADAPTER_MODEL,
    CONTAINER_REPOSITORY,
    FM_MODEL,
    FP16_FILENAME,
    MAX_BATCH_EXAMPLES,
    ONNX_FILENAME,
    PLAN_FILENAME,
)
from export.repository import ModelRepository, RepositoryError
from model.features import USERS_AXIS
from model.files import atomic_path
from model.schema import FeatureSchema


class TensorRTUnavailable(RuntimeError):
    """trtexec is not here (no GPU build environment)."""


# The NGC image of the Triton release the local server runs (2.51), with TensorRT inside.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# Where that image keeps trtexec (outside PATH).
CONTAINER_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
# Every model that gets a `configs/tensorrt.pbtxt`, so needs a plan (the ensemble has none).
PLAN_MODELS = (FM_MODEL, ADAPTER_MODEL)


@dataclass(frozen=True)
class ProfileConfig:
    min_batch: int = 1
    opt_batch: int = 512
    max_batch: int = MAX_BATCH_EXAMPLES
    min_seq: int = 1
    opt_seq: int = 128
    max_seq: int = 256
    # The user axis of a user-indexed graph (a shared_user FM): U users per call.
    min_users: int = 1
    opt_users: int = 4
    # At most one user per example.
    max_users: int = MAX_BATCH_EXAMPLES

    def __post_init__(self) -> None:
        if not (1 <= self.min_users <= self.opt_users <= self.max_users):
            raise ValueError(f"user profile must satisfy 1 <= min <= opt <= max, got {self}")
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self}")
        if not (1 <= self.min_seq <= self.opt_seq <= self.max_seq):
            raise ValueError(f"sequence profile must satisfy 1 <= min <= opt <= max, got {self}")


def serving_profile(schema: FeatureSchema, max_batch: int) -> ProfileConfig:
    """Batch 1 to the serving max batch, sequence 1 to the schema's longest."""
    seq = max((q.max_length for q in schema.sequences), default=1)
    return ProfileConfig(
        max_batch=max_batch, max_seq=seq, opt_seq=min(128, seq), max_users=max_batch, opt_users=min(4, max_batch)
    )


Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputProfile:
    name: str
    min: Shape
    opt: Shape
    max: Shape


def profiles(proto: onnx.ModelProto, cfg: ProfileConfig) -> tuple[InputProfile, ...]:
    """Min/opt/max shapes of every graph input: axis 0 is the batch (the user axis for
    a user-indexed graph's user inputs), a dynamic axis after it is the sequence, a
    static one keeps its size."""
    out = []
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        on_users = bool(dims) and dims[0].dim_param == USERS_AXIS
        rest = [None if not d.HasField("dim_value") else d.dim_value for d in dims[1:]]
        if sum(d is None for d in rest) > 1:
            raise ValueError(f"input {value.name}: more than one dynamic non-batch axis")

        def shape(batch: int, seq: int, rest=rest) -> Shape:
            return (batch, *(seq if d is None else d for d in rest))

        lo, mid, hi = (
            (cfg.min_users, cfg.opt_users, cfg.max_users) if on_users else (cfg.min_batch, cfg.opt_batch, cfg.max_batch)
        )
        out.append(InputProfile(value.name, shape(lo, cfg.min_seq), shape(mid, cfg.opt_seq), shape(hi, cfg.max_seq)))
    return tuple(out)


def _shapes_arg(profile: tuple[InputProfile, ...], which: str) -> str:
    return ",".join(f"{p.name}:{'x'.join(map(str, getattr(p, which)))}" for p in profile)


def trtexec_command(onnx_path: Path, plan_path: Path, profile: tuple[InputProfile, ...]) -> list[str]:
    return [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={_shapes_arg(profile, 'min')}",
        f"--optShapes={_shapes_arg(profile, 'opt')}",
        f"--maxShapes={_shapes_arg(profile, 'max')}",
        "--stronglyTyped",
        "--skipInference",
    ]


def _source(version_dir: Path, fp16: bool) -> str:
    """The graph a plan is built from: precision comes from the graph."""
    name = FP16_FILENAME if fp16 else ONNX_FILENAME
    if not (version_dir / name).exists():
        raise FileNotFoundError(f"{version_dir / name} is missing (export with --fp16 for an FP16 plan)")
    return name


def container_build(
    repository: Path, version_dir: Path, cfg: ProfileConfig, fp16: bool = False, mount: Path = CONTAINER_REPOSITORY
) -> str:
    """The plan build as one shell line inside the NGC Triton image, the repository
    mounted at `mount`: the plan written under a temporary name and renamed when complete."""
    inside = mount / version_dir.resolve().relative_to(repository.resolve())
    tmp, plan = inside / f".{PLAN_FILENAME}.tmp", inside / PLAN_FILENAME
    source = _source(version_dir, fp16)
    profile = profiles(onnx.load(str(version_dir / source), load_external_data=False), cfg)
    args = trtexec_command(inside / source, tmp, profile)
    args[0] = CONTAINER_TRTEXEC
    return f"{' '.join(args)} && mv {tmp} {plan}"


def container_command(repository: Path, version_dir: Path, cfg: ProfileConfig, fp16: bool = False) -> str:
    """The same build as one `docker run` on a GPU host."""
    return (
        f"docker run --rm --gpus all -v {repository.resolve()}:{CONTAINER_REPOSITORY} {TRITON_IMAGE} "
        f"sh -c '{container_build(repository, version_dir, cfg, fp16)}'"
    )


def build_script(repository: Path, cfg: ProfileConfig, fp16: bool = False, mount: Path = CONTAINER_REPOSITORY) -> str:
    """A shell script for the NGC Triton image that builds the plans of the latest version
    of every model with a TensorRT config (docker-compose.yml's `tensorrt-build`): with
    `--model-config-name=tensorrt`, Triton loads no model whose plan is missing. `fp16`
    applies to the FM, the only model exported in half precision."""
    repo = ModelRepository(repository)
    lines = ["#!/bin/sh", f"# Written by `gem tensorrt-script` for {TRITON_IMAGE}."]
    for model in PLAN_MODELS:
        version = repo.latest(model)
        if version is None:
            raise RepositoryError(f"{repository / model} has no version to build a plan for; run `gem export` first")
        version_dir = repository / model / str(version)
        build = container_build(repository, version_dir, cfg, fp16 and model == FM_MODEL, mount)
        # `set -e` would not stop at a failed trtexec: it is not the last command of its && list.
        lines += [f"echo 'building the TensorRT plan of {model} version {version}'", f"{build} || exit 1"]
    return "\n".join(lines) + "\n"


def build_plan(version_dir: Path, cfg: ProfileConfig, fp16: bool = False) -> Path:
    """Builds `model.plan` from `model.onnx` in a version folder (written to a temporary
    name and renamed, so Triton never loads half a plan)."""
    # The NGC images keep trtexec outside PATH.
    trtexec = shutil.which("trtexec", path=f"{os.environ.get('PATH', '')}:/usr/src/tensorrt/bin")
    if trtexec is None:
        repository = version_dir.parent.parent
        raise TensorRTUnavailable(
            "TensorRT is not installed here (no trtexec), and a plan must be built on the GPU and TensorRT "
            f"version that serve it. On the GPU host, run:\n  {container_command(repository, version_dir, cfg, fp16)}"
        )
    onnx_path = version_dir / _source(version_dir, fp16)
    plan = version_dir / PLAN_FILENAME
    with atomic_path(plan) as tmp:
        args = trtexec_command(onnx_path, tmp, profiles(onnx.load(str(onnx_path), load_external_data=False), cfg))
        result = subprocess.run([trtexec, *args[1:]], capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stdout.splitlines()[-15:])
            raise RuntimeError(f"trtexec failed for {onnx_path} (exit {result.returncode}):\n{tail}")
    return plan
