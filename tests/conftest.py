"""Shared fixtures: the default schema, tiny models and a small synthetic data set."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from export.publish import ExportConfig, export_checkpoint
from model.adapter import StudentAdapter
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.data.synth import SynthConfig, write_shards
from model.gem import GEM
from model.schema import FeatureSchema, load_schema
from serving.net import free_ports
from serving.triton.server import TritonConfig


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
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
    torch.nn.init.normal_(adapter.mlp[-1].weight, std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(path, schema, preset("tiny"), model, adapter, metrics={})


@pytest.fixture(scope="session")
def published_repo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, synth_dir: Path) -> Path:
    """A model repository with version 1 of gem_fm and student_adapter (read-only: copy it)."""
    repo = tmp_path_factory.mktemp("repo") / "model_repo"
    export_checkpoint(load_checkpoint(tiny_checkpoint), ExportConfig(repository=repo, data=synth_dir))
    return repo
