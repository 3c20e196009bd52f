"""Model inputs derived from the feature schema: names, dtypes and shapes.

This is the one place that says what a columnar batch looks like. The model's
forward, the ONNX signature, the Triton config, the gRPC validation and the Parquet
reader all iterate over `input_specs(schema)`.

  sparse feature      int64   [B]      raw id, hashed inside the model
  dense feature       float32 [B]
  sequence field      int64   [B, L]   most recent event first, zero-padded
  <sequence>_length   int64   [B]      valid events per row (0 allowed)
  surface             int64   [B]      index into schema.surfaces

A user-indexed batch (what a `shared_user` GEM takes, `GEMConfig.sequence_arch`) holds
the user-side inputs (the schema's `side: user` features and every behavior sequence)
once per user, [U] / [U, L], and adds

  user_index          int64   [B]      the user row of each candidate, in [0, U)

`user_indexed_specs` describes it (the ONNX signature of a `shared_user` graph);
`model.user_index` turns batches into that form and back, and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.schema import SURFACE_INPUT, FeatureSchema

Kind = Literal["sparse", "dense", "sequence", "length", "surface", "index"]


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


# The user-indexed form: the index input, and the names of the two batch axes in an
# exported graph (the user inputs' axis 0 is USERS_AXIS, every other input's BATCH_AXIS).
USER_INDEX = "user_index"
USERS_AXIS = "users"
BATCH_AXIS = "batch"


def user_input_names(schema: FeatureSchema) -> tuple[str, ...]:
    """The inputs that are the same for every candidate of one user (side: user)."""
    return tuple(s.name for s in input_specs(schema) if s.side == "user")


def user_indexed_specs(schema: FeatureSchema) -> tuple[InputSpec, ...]:
    """The inputs of a user-indexed batch: the schema's, then `user_index` [B]."""
    return (*input_specs(schema), InputSpec(USER_INDEX, "index", INT64, 1, "context"))
