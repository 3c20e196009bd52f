"""Shared fixtures: the default schema, tiny models and a small synthetic data set."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from model.adapter import StudentAdapter
from model.checkpoint import ModelBundle, load_checkpoint, save_checkpoint
from model.config import preset
from model.data.synth import SynthConfig, write_shards
from model.gem import GEM
from model.schema import FeatureSchema, load_schema
from serving.local.loopback import LOCAL_ONLY_ENV
from serving.local.ports import free_ports
from serving.local.triton import TritonConfig

# Ray's single-machine mode for every Ray of the suite, as `gem up` has it (read when Ray
# is first imported, so here, before any test module imports it): node addresses are the
# loopback one, and a driver reaches a cluster at 127.0.0.1 (tests/test_cluster.py) instead
# of the address Ray would guess for this machine, where nothing listens.
os.environ.setdefault(LOCAL_ONLY_ENV, "0")


@pytest.fixture(scope="session")
def schema() -> FeatureSchema:
    return load_schema()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory, schema: FeatureSchema) -> Path:
    """40k rows in 4 time-ordered shards; shared by the data, training and CLI tests."""
    out = tmp_path_factory.mktemp("synth")
    write_shards(SynthConfig(rows=40_000, shards=4, seed=7, users=3_000, ads=1_000), schema, out)
    return out


@pytest.fixture(scope="session")
def gem_bin() -> Path:
    """The installed `gem` script: what users run."""
    return Path(sys.executable).with_name("gem")


@pytest.fixture(scope="session")
def gem(gem_bin: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Runs the `gem` command line as a user would: a subprocess, wide output, captured."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
        full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
        return subprocess.run(
            [str(gem_bin), *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout
        )

    return run


@pytest.fixture(scope="session")
def triton_config() -> Callable[[Path, Path], TritonConfig]:
    """A local Triton's config on free ports, for a repository and a work folder."""

    def make(repo: Path, work: Path) -> TritonConfig:
        http, grpc, metrics = free_ports(3)
        return TritonConfig(repository=repo, work_dir=work, http_port=http, grpc_port=grpc, metrics_port=metrics)

    return make


@pytest.fixture
def tiny():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, schema: FeatureSchema) -> Path:
    """An untrained tiny GEM with a non-identity adapter (so adapted != raw labels)."""
    torch.manual_seed(0)
    model = GEM(schema, preset("tiny")).eval()
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents).eval()
    torch.nn.init.normal_(adapter.last.weight, std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(path, ModelBundle(schema, preset("tiny"), model, adapter), metrics={})


@pytest.fixture(scope="session")
def published_repo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, synth_dir: Path) -> Path:
    """A model repository with version 1 of gem_fm and student_adapter (read-only: copy it)."""
    repo = tmp_path_factory.mktemp("repo") / "model_repo"
    publish(load_checkpoint(tiny_checkpoint), ModelRepository(repo), PublishPolicy(data=synth_dir))
    return repo


def _published_tiny(root: Path, schema: FeatureSchema, synth_dir: Path, arch: str, seed: int) -> tuple[Path, GEM]:
    """An untrained tiny GEM of `arch` saved under root/ckpt and published to
    root/model_repo; returns (repository, torch model)."""
    cfg = preset("tiny").with_(sequence_arch=arch)
    torch.manual_seed(seed)
    model = GEM(schema, cfg).eval()
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
    ckpt = save_checkpoint(root / "ckpt", ModelBundle(schema, cfg, model, adapter), metrics={})
    publish(load_checkpoint(ckpt), ModelRepository(root / "model_repo"), PublishPolicy(data=synth_dir))
    return root / "model_repo", model


@pytest.fixture(scope="session")
def per_example_repo(tmp_path_factory: pytest.TempPathFactory, schema: FeatureSchema, synth_dir: Path) -> Path:
    """A published per-example (`interformer`) tiny FM, one batch axis, batched by Triton,
    whatever the presets' arch (read-only: copy it); its checkpoint is beside it (../ckpt)."""
    return _published_tiny(tmp_path_factory.mktemp("per-example-repo"), schema, synth_dir, "interformer", 0)[0]


@pytest.fixture(scope="session")
def shared_user_repo(tmp_path_factory: pytest.TempPathFactory, schema: FeatureSchema, synth_dir: Path):
    """(repository, torch model): a published user-indexed (`shared_user`) tiny FM and its
    adapter (read-only: copy it)."""
    return _published_tiny(tmp_path_factory.mktemp("shared-user-repo"), schema, synth_dir, "shared_user", 3)


# Fault injection for the side trainer's crash tests. A `sitecustomize` on PYTHONPATH of
# the trainer's processes wraps one function (`module:Qualified.name`) so that its Nth
# call in a process (on rank 0) writes GEM_TEST_HOLD_FILE and waits there to be killed,
# `before` or `after` the call: production code carries no hook.
HOLD_SITECUSTOMIZE = """
import os

_spec = os.environ.get("GEM_TEST_HOLD")
if _spec:
    import functools
    import importlib
    import time

    _module, _qualname, _when, _nth = _spec.split(":")
    _owner = importlib.import_module(_module)
    *_path, _attr = _qualname.split(".")
    for _part in _path:
        _owner = getattr(_owner, _part)
    _original = getattr(_owner, _attr)
    _calls = [0]

    def _hold():
        held = os.environ["GEM_TEST_HOLD_FILE"]
        with open(held + ".tmp", "w") as f:
            f.write(f"{_spec} {os.getpid()}\\n")
        os.replace(held + ".tmp", held)
        while True:
            time.sleep(60)

    @functools.wraps(_original)
    def _held(*args, **kwargs):
        hit = False
        if os.environ.get("RANK", "0") == "0":
            _calls[0] += 1
            hit = _calls[0] == int(_nth)
        if hit and _when == "before":
            _hold()
        result = _original(*args, **kwargs)
        if hit and _when == "after":
            _hold()
        return result

    setattr(_owner, _attr, _held)
"""


@pytest.fixture(scope="session")
def hold_env(tmp_path_factory: pytest.TempPathFactory):
    """env(point, held_file) -> the environment that makes a trainer process hold at
    `point` ("module:Qualified.name:before|after:N") and write `held_file` there."""
    folder = tmp_path_factory.mktemp("hold_hooks")
    (folder / "sitecustomize.py").write_text(HOLD_SITECUSTOMIZE)

    def env(point: str, held: Path) -> dict[str, str]:
        return {"PYTHONPATH": str(folder), "GEM_TEST_HOLD": point, "GEM_TEST_HOLD_FILE": str(held)}

    return env
