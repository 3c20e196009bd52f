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

`share_users` turns a per-example batch into that form (identical user rows merged);
`user_indexed_specs` describes it (the ONNX signature of a `shared_user` graph).
"""

from __future__ import annotations

from collections.abc import Iterable
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


def _row_keys(arrays: list[np.ndarray], rows: int) -> np.ndarray:
    """[rows, W] uint8: every array's row bytes side by side (a row's identity)."""
    return np.concatenate([np.ascontiguousarray(a).reshape(rows, -1).view(np.uint8) for a in arrays], axis=1)


def share_users(batch: dict[str, np.ndarray], user_names: Iterable[str], dedup: bool = True) -> dict[str, np.ndarray]:
    """A per-example batch ([B] rows everywhere) in the user-indexed form.

    With `dedup`, rows whose user-side inputs are byte-identical (the candidates of one
    user, as the shared form of the API sends them) become one user row; otherwise
    every row is its own user (U = B, identity index). Vectorized: a multiplicative
    hash of each row's bytes, `np.unique` over the hashes, and an exact comparison of
    every row with its representative (a collision falls back to U = B). A batch that
    already has `user_index` is returned as it is.
    """
    if USER_INDEX in batch:
        return batch
    names = [n for n in user_names if n in batch]
    rows = len(next(iter(batch.values())))
    out = dict(batch)
    identity = np.arange(rows, dtype=np.int64)
    if not dedup or rows <= 1 or not names:
        out[USER_INDEX] = identity
        return out
    keys = _row_keys([batch[n] for n in names], rows)
    width = keys.shape[1]
    words = np.pad(keys, ((0, 0), (0, -width % 8))).view(np.uint64)
    mult = np.random.default_rng(0x9E3779B9).integers(1, 1 << 63, words.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        hashes = (words * mult).sum(axis=1, dtype=np.uint64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not np.array_equal(keys[first[inverse]], keys):
        out[USER_INDEX] = identity
        return out
    for n in names:
        out[n] = batch[n][first]
    out[USER_INDEX] = inverse.astype(np.int64)
    return out


def graph_feeds(batch: dict[str, np.ndarray], graph_inputs: Iterable) -> dict[str, np.ndarray]:
    """The feeds of an FM graph from a batch; `graph_inputs` as ONNX Runtime lists them
    (`session.get_inputs()`: `.name`, `.shape`). A per-example batch becomes the
    user-indexed form (identical user rows merged) when the graph takes that form; the
    graph's user inputs are those on its USERS_AXIS."""
    graph_inputs = list(graph_inputs)
    names = [i.name for i in graph_inputs]
    if USER_INDEX in names and USER_INDEX not in batch:
        batch = share_users(batch, [i.name for i in graph_inputs if i.shape and i.shape[0] == USERS_AXIS])
    return {n: np.ascontiguousarray(batch[n]) for n in names}


def expand_users(batch: dict[str, np.ndarray], user_names: Iterable[str]) -> dict[str, np.ndarray]:
    """The inverse of `share_users`: every user input gathered to [B] rows, no index."""
    if USER_INDEX not in batch:
        return batch
    index = batch[USER_INDEX]
    names = set(user_names)
    return {k: (v[index] if k in names else v) for k, v in batch.items() if k != USER_INDEX}


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
