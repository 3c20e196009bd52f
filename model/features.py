"""Model inputs derived from the feature schema: names, dtypes and shapes.

This is the one place that says what a columnar batch looks like. The model's
forward, the ONNX signature, the Triton config, the gRPC validation and the Parquet
reader all iterate over `input_specs(schema)`.

  sparse feature      int64   [B]      raw id, hashed inside the model
  dense feature       float32 [B]
  sequence field      int64   [B, L]   most recent event first, zero-padded
  <sequence>_length   int64   [B]      valid events per row (0 allowed)
  surface             int64   [B]      index into schema.surfaces
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.schema import SURFACE_INPUT, FeatureSchema

Kind = Literal["sparse", "dense", "sequence", "length", "surface"]


@dataclass(frozen=True)
class InputSpec:
    name: str
    kind: Kind
    dtype: np.dtype
    # 1 for [B], 2 for [B, L]
    rank: int
    side: str
    # The sequence this input belongs to (fields and lengths), else None.
    sequence: str | None = None


INT64 = np.dtype(np.int64)
FLOAT32 = np.dtype(np.float32)


def input_specs(schema: FeatureSchema) -> tuple[InputSpec, ...]:
    specs = [InputSpec(f.name, "sparse", INT64, 1, f.side) for f in schema.sparse]
    specs += [InputSpec(f.name, "dense", FLOAT32, 1, f.side) for f in schema.dense]
    for seq in schema.sequences:
        specs += [InputSpec(f.name, "sequence", INT64, 2, "user", seq.name) for f in seq.fields]
        specs.append(InputSpec(seq.length_name, "length", INT64, 1, "user", seq.name))
    specs.append(InputSpec(SURFACE_INPUT, "surface", INT64, 1, "context"))
    return tuple(specs)


def input_names(schema: FeatureSchema) -> tuple[str, ...]:
    return tuple(s.name for s in input_specs(schema))


# Output names of the FM, fixed by the wire contract.
LOGITS = "logits"
EMBEDDING = "embedding"
USER_EMBEDDING = "user_embedding"
FM_OUTPUTS = (LOGITS, EMBEDDING, USER_EMBEDDING)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Labels are probabilities: the sigmoid of the logits, in their dtype, without
    overflow for large negative logits (exp(-logaddexp(0, -x)))."""
    return np.exp(-np.logaddexp(0, -logits))


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


def zero_batch(schema: FeatureSchema) -> dict[str, np.ndarray]:
    """One all-zero example (surface 0, no events): valid for every schema, so a probe
    of what a served model returns (output widths, versions)."""
    return {s.name: np.zeros((1, 1) if s.rank == 2 else (1,), s.dtype) for s in input_specs(schema)}
