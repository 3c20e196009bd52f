"""Logged-data columns (Arrow or pandas) -> the arrays the API takes, column-wise.

The server's Parquet reader uses the same functions, so a column a ranker sends and
the same column in a logged shard become the same array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

INT64_LIST = pa.list_(pa.int64())


def pad_lists(column: pa.Array | pa.ChunkedArray, max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A list column (list, large_list or fixed_size_list of integers, as pandas, polars
    and Arrow writers produce) -> (zero-padded [n, L] int64, lengths [n] int64), keeping
    the first `max_len` elements (the newest events) of each list."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.type != INT64_LIST:
        # One column-wise cast; unsigned ids may exceed int64's range, so wrap, never refuse.
        column = pc.cast(column, INT64_LIST, safe=not pa.types.is_unsigned_integer(column.type.value_type))
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    lengths = np.diff(offsets)
    if max_len is not None:
        lengths = np.minimum(lengths, max_len)
    # At least one column: a batch whose histories are all empty is [n, 1] of padding
    # (length 0), since a width-0 sequence is no valid model input.
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    positions = np.arange(width)
    valid = positions[None, :] < lengths[:, None]
    padded = np.zeros((len(lengths), width), dtype=np.int64)
    padded[valid] = values[(offsets[:-1, None] + positions[None, :])[valid]]
    return padded, lengths


def surface_codes(column: pa.Array | pa.ChunkedArray, surfaces: Sequence[str]) -> np.ndarray:
    """Surface names or indices -> int64 indices into `surfaces`; ValueError names the
    first unknown name or out-of-range index."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_integer(column.type):
        index = column.to_numpy().astype(np.int64)
        bad = (index < 0) | (index >= len(surfaces))
        if bad.any():
            raise ValueError(f"column 'surface': index {index[bad][0]} out of range [0, {len(surfaces)})")
        return index
    index = pc.index_in(column, value_set=pa.array(list(surfaces), type=column.type))
    if index.null_count:
        unknown = pc.filter(column, pc.is_null(index))[0].as_py()
        raise ValueError(f"column 'surface': unknown surface {unknown!r} (known: {', '.join(surfaces)})")
    return index.to_numpy().astype(np.int64)
