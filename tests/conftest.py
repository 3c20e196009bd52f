"""Shared fixtures: the default schema, tiny models and a small synthetic data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.publish import ExportConfig, export_checkpoint
from model.adapter import StudentAdapter
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.data.synth import SynthConfig, write_shards
from model.features import input_names
from model.gem import GEM
from model.schema import FeatureSchema, load_schema


@pytest.fixture(scope="session")
def schema() -> FeatureSchema:
    return load_schema()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory, schema: FeatureSchema) -> Path:
    """40k rows in 4 time-ordered shards; shared by the data, training and CLI tests."""
    out = tmp_path_factory.mktemp("synth")
    write_shards(SynthConfig(rows=40_000, shards=4, seed=7, users=3_000, ads=1_000), schema, out)
    return out


def to_torch(batch: dict[str, np.ndarray], schema: FeatureSchema) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(batch[n]) for n in input_names(schema)}


@pytest.fixture
def tiny():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, schema: FeatureSchema) -> Path:
    """An untrained tiny GEM with a non-identity adapter (so adapted != raw labels)."""
    torch.manual_seed(0)
    model = GEM(schema, preset("tiny")).eval()
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents).eval()
    torch.nn.init.normal_(adapter.mlp[-1].weight, std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(path, schema, preset("tiny"), model, adapter, metrics={})


@pytest.fixture(scope="session")
def published_repo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, synth_dir: Path) -> Path:
    """A model repository with version 1 of gem_fm and student_adapter (read-only: copy it)."""
    repo = tmp_path_factory.mktemp("repo") / "model_repo"
    export_checkpoint(load_checkpoint(tiny_checkpoint), ExportConfig(repository=repo, data=synth_dir))
    return repo
