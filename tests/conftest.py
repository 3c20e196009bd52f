"""Shared fixtures: the default schema, tiny models and a small synthetic data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import preset
from model.data.synth import SynthConfig, write_shards
from model.features import input_names
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
