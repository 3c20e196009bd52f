"""Per row of a logged batch: why it cannot be served (vectorized over the table), and
its request or user key as codes (the rows of one key share one user encoding)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.features import input_specs
from model.schema import FeatureSchema


def row_problems(table: pa.Table, schema: FeatureSchema) -> pa.Array:
    """Per row, why it cannot be served (null where fine): vectorized over the table."""
    reasons = pa.nulls(table.num_rows, pa.string())
    for spec in input_specs(schema):
        if spec.kind == "length" or spec.name not in table.column_names:
            continue
        column = table.column(spec.name)
        if column.null_count:
            reasons = pc.if_else(pc.and_(pc.is_null(reasons), pc.is_null(column)), f"{spec.name} is null", reasons)
        if spec.kind == "surface" and not pa.types.is_integer(column.type):
            names = column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column
            unknown = pc.invert(pc.is_in(names, value_set=pa.array(schema.surfaces)))
            reasons = pc.if_else(pc.and_(pc.is_null(reasons), unknown), "unknown surface", reasons)
    for seq in schema.sequences:
        present = [f.name for f in seq.fields if f.name in table.column_names]
        if len(present) > 1:
            lengths = [pc.list_value_length(table.column(n)) for n in present]
            ragged = pc.not_equal(lengths[0], lengths[1])
            for other in lengths[2:]:
                ragged = pc.or_(ragged, pc.not_equal(lengths[0], other))
            ragged = pc.fill_null(ragged, False)
            reasons = pc.if_else(pc.and_(pc.is_null(reasons), ragged), f"{seq.name} fields differ in length", reasons)
    return reasons


def servable(problems: pa.Array) -> np.ndarray:
    """bool [rows]: the rows without a problem (`row_problems`), which the model gets."""
    return pc.is_null(problems).to_numpy(zero_copy_only=False)


def key_codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A key column (any type) as int64 codes, equal where the keys are; a null key is a
    code of its own per row (never grouped)."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    nulls = np.flatnonzero(codes < 0)
    codes[nulls] = len(encoded.dictionary) + np.arange(len(nulls))
    return codes
