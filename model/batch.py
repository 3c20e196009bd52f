"""The columnar batch: one numpy array per input (and label) column, rows on axis 0,
sequence matrices [B, L] zero-padded on the right. Its operations: rows taken, padding
trimmed, cut into minibatches, concatenated."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from model.schema import SURFACE_INPUT, FeatureSchema

Batch = dict[str, np.ndarray]


def take(batch: Batch, index: np.ndarray | slice) -> Batch:
    """The given rows of every column."""
    return {k: v[index] for k, v in batch.items()}


def trim_sequences(batch: Batch, schema: FeatureSchema) -> Batch:
    """Cuts each sequence matrix to its longest row (at least one column), so that
    attention cost follows the real lengths, not the padding."""
    out = dict(batch)
    for seq in schema.sequences:
        width = max(1, int(batch[seq.length_name].max(initial=0)))
        for f in seq.fields:
            out[f.name] = batch[f.name][:, :width]
    return out


def minibatch_rows(
    n: int, size: int, rng: np.random.Generator | None = None, lengths: np.ndarray | None = None
) -> list[np.ndarray]:
    """Row indices of each minibatch.

    With `lengths`, rows of similar sequence length go together (length bucketing):
    sorted by length, ties broken at random, then the minibatches are shuffled.
    """
    if lengths is None:
        order = rng.permutation(n) if rng is not None else np.arange(n)
    else:
        jitter = rng.random(n) if rng is not None else np.arange(n)
        order = np.lexsort((jitter, lengths))
    chunks = [order[lo : lo + size] for lo in range(0, n, size)]
    if rng is not None and lengths is not None:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    return chunks


def iter_minibatches(
    batch: Batch, size: int, schema: FeatureSchema, rng: np.random.Generator | None = None
) -> Iterator[tuple[np.ndarray, Batch]]:
    """(row indices, minibatch) pairs, length-bucketed on the first sequence and
    trimmed; shuffled when `rng` is given, else deterministic."""
    lengths = batch[schema.sequences[0].length_name] if schema.sequences else None
    for rows in minibatch_rows(len(batch[SURFACE_INPUT]), size, rng, lengths):
        yield rows, trim_sequences(take(batch, rows), schema)


def concat(batches: list[Batch]) -> Batch:
    """Row-concatenates batches, padding sequence matrices to the widest."""
    out: Batch = {}
    for k in batches[0]:
        arrays = [b[k] for b in batches]
        if arrays[0].ndim == 2:
            width = max(a.shape[1] for a in arrays)
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays]
        out[k] = np.concatenate(arrays)
    return out
