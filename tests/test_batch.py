"""The columnar batch's operations (model.batch): rows taken, padding trimmed, cut into
minibatches, concatenated."""

import numpy as np

from model.batch import concat, iter_minibatches, minibatch_rows, take, trim_sequences
from model.examples import random_batch
from model.schema import SURFACE_INPUT


def test_concat_pads_sequence_matrices_to_the_widest(schema):
    a, b = random_batch(schema, 3, 2, seed=1), random_batch(schema, 2, 5, seed=2)
    both = concat([a, b])
    seq = schema.sequences[0].fields[0].name
    assert both[seq].shape == (5, 5)
    np.testing.assert_array_equal(both[seq][:3, :2], a[seq])
    assert not both[seq][:3, 2:].any()
    np.testing.assert_array_equal(both[SURFACE_INPUT], np.concatenate([a[SURFACE_INPUT], b[SURFACE_INPUT]]))


def test_take_and_trim_sequences(schema):
    batch = random_batch(schema, 6, 8, seed=3)
    seq = schema.sequences[0]
    batch[seq.length_name] = np.array([0, 1, 3, 2, 0, 1])
    rows = take(batch, np.array([0, 3, 4]))
    assert all(len(v) == 3 for v in rows.values())
    trimmed = trim_sequences(rows, schema)
    assert trimmed[seq.fields[0].name].shape == (3, 2)
    empty = trim_sequences(take(batch, np.array([0, 4])), schema)
    assert empty[seq.fields[0].name].shape == (2, 1), "at least one column"


def test_minibatches_cover_every_row_once(schema):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, 50)
    for chunks in (minibatch_rows(50, 8), minibatch_rows(50, 8, rng), minibatch_rows(50, 8, rng, lengths)):
        assert sorted(np.concatenate(chunks).tolist()) == list(range(50))
        assert max(len(c) for c in chunks) == 8
    batch = random_batch(schema, 20, 4, seed=4)
    seen = np.concatenate([rows for rows, _ in iter_minibatches(batch, 6, schema)])
    assert sorted(seen.tolist()) == list(range(20))
