"""Random and all-zero example batches that are valid for a schema: for parity checks,
tests, benches, load tests and the probe of what a served model returns."""

from __future__ import annotations

import numpy as np

from model.features import USER_INDEX, input_specs, user_indexed_specs, user_input_names
from model.schema import FeatureSchema


def random_batch(schema: FeatureSchema, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid input batch of random values: ids over the whole int64 range (hashing
    must cope), sequence lengths from 0 to `seq_len`. For parity checks and tests."""
    rng = np.random.default_rng(seed)
    batch: dict[str, np.ndarray] = {}
    for spec in input_specs(schema):
        if spec.kind == "sparse":
            batch[spec.name] = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, batch_size)
        elif spec.kind == "dense":
            batch[spec.name] = rng.normal(size=batch_size).astype(np.float32)
        elif spec.kind == "sequence":
            batch[spec.name] = rng.integers(0, 1 << 40, (batch_size, seq_len))
        elif spec.kind == "length":
            batch[spec.name] = rng.integers(0, seq_len + 1, batch_size)
        else:
            batch[spec.name] = rng.integers(0, len(schema.surfaces), batch_size)
    return batch


def random_call(
    schema: FeatureSchema, candidates: int, seq_len: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A ranker's call in the shared-user form: (per-candidate columns, the one user's
    columns), random as in `random_batch` (surfaces mixed across candidates)."""
    sample = random_batch(schema, candidates, seq_len, seed)
    user_side = {s.name for s in input_specs(schema) if s.side == "user"}
    shared = {k: v[:1] for k, v in sample.items() if k in user_side}
    return {k: v for k, v in sample.items() if k not in user_side}, shared


def random_user_batch(
    schema: FeatureSchema, users: int, candidates: int, seq_len: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A random user-indexed batch: `users` user rows, `candidates` candidate rows, each
    candidate of a random user (every user has at least one when candidates >= users)."""
    batch = random_batch(schema, candidates, seq_len, seed)
    users_part = random_batch(schema, users, seq_len, seed + 1)
    for name in user_input_names(schema):
        batch[name] = users_part[name]
    rng = np.random.default_rng(seed + 2)
    index = rng.integers(0, users, candidates)
    index[: min(users, candidates)] = np.arange(min(users, candidates))
    batch[USER_INDEX] = rng.permutation(index).astype(np.int64)
    return batch


def zero_batch(schema: FeatureSchema, user_indexed: bool = False) -> dict[str, np.ndarray]:
    """One all-zero example (surface 0, no events): valid for every schema, so a probe
    of what a served model returns (output widths, versions). `user_indexed` adds
    `user_index` [0] (one user, one candidate)."""
    specs = user_indexed_specs(schema) if user_indexed else input_specs(schema)
    return {s.name: np.zeros((1, 1) if s.rank == 2 else (1,), s.dtype) for s in specs}
