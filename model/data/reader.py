"""Parquet/Arrow -> columnar numpy batches in the model's input layout.

Sequences arrive as list<int64> (newest event first) and leave as a zero-padded
[B, L] int64 matrix plus a length vector, built with a handful of vectorized numpy
calls over the Arrow offsets: no per-row Python.

What real writers produce is accepted and cast once, column-wise, to the canonical
type (`canonical`): ids of any integer width -> int64 (uint64 wraps, a consistent
hash input); dense values of any float or integer type -> float32; sequences as
list, large_list or fixed_size_list of any integer type -> list<int64>; surfaces as
string, large_string, dictionary-encoded or integer indices.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from gem.knowledge.columns import INT64_LIST, pad_lists, surface_codes

from model.batch import Batch
from model.features import input_specs
from model.schema import FeatureSchema
from model.storage import Place, is_remote, parquet_files, place, unavailable


class DataError(ValueError):
    """Input data does not match the schema; the message names the column."""


def resolve_paths(source: str | Path) -> list[Path]:
    """A file, a folder (its *.parquet files) or a glob -> sorted file list."""
    p = Path(source)
    if p.is_dir():
        paths = sorted(p.glob("*.parquet"))
    elif p.is_file():
        paths = [p]
    else:
        paths = sorted(Path(x) for x in glob.glob(str(source)))
    if not paths:
        raise DataError(f"no Parquet files at {source}")
    return paths


def resolve_places(source: str | Path | Place) -> list[Place]:
    """`resolve_paths` for a local source or an `s3://` one (a file, a folder's *.parquet
    or a glob in the last part of the URL): sorted files (model/storage.py)."""
    source = str(source)
    if not is_remote(source):
        return [place(p) for p in resolve_paths(source)]
    places = parquet_files(source)
    if not places:
        raise DataError(f"no Parquet files at {source}")
    return places


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _decoded(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def canonical(column: pa.Array | pa.ChunkedArray, kind: str) -> pa.Array | pa.ChunkedArray:
    """One column-wise cast to the type the model's layout is built from:
    sparse -> int64, dense -> float32, sequence -> list<int64>, surface -> string or
    int64 (dictionaries decoded). The caller has checked the type (`check_columns`)."""
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.cast(t.value_type), t.value_type
    if kind == "sparse" and t != pa.int64():
        return pc.cast(column, pa.int64(), safe=not pa.types.is_unsigned_integer(t))
    if kind == "dense" and t != pa.float32():
        return pc.cast(column, pa.float32(), safe=False)
    if kind == "sequence" and t != INT64_LIST:
        unsigned = pa.types.is_unsigned_integer(t.value_type)
        return pc.cast(column, INT64_LIST, safe=not unsigned)
    if kind == "surface":
        if pa.types.is_large_string(t):
            return column.cast(pa.string())
        if pa.types.is_integer(t) and t != pa.int64():
            return pc.cast(column, pa.int64())
    return column


def surface_index(column: pa.Array | pa.ChunkedArray, schema: FeatureSchema) -> np.ndarray:
    """Surface names (string, large_string, dictionary) or indices (any integer) -> int64
    indices, as the client library converts them (gem.knowledge.columns)."""
    try:
        return surface_codes(column, schema.surfaces)
    except ValueError as e:
        raise DataError(str(e)) from None


# What each kind of input accepts in Parquet, and how the error names it.
_COLUMN_TYPES = {
    "sparse": (lambda t: pa.types.is_integer(_decoded(t)), "an integer type"),
    "dense": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "a numeric type"),
    "sequence": (lambda t: _is_list(t) and pa.types.is_integer(t.value_type), "list<int64>"),
    "surface": (lambda t: pa.types.is_integer(_decoded(t)) or _is_text(_decoded(t)), "surface names or indices"),
}


def check_columns(columns: pa.Schema, schema: FeatureSchema, labels: bool = False) -> None:
    """Column names and types against the schema, before any data is read (a Parquet
    footer is enough). Raises a DataError naming the first bad column."""
    needed = [s.name for s in input_specs(schema) if s.kind != "length"]
    if labels:
        needed += [t.label_column for t in schema.tasks]
    missing = [n for n in needed if n not in columns.names]
    if missing:
        raise DataError(
            f"missing column {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for spec in input_specs(schema):
        if spec.kind == "length":
            continue
        accepts, expected = _COLUMN_TYPES[spec.kind]
        found = columns.field(spec.name).type
        if not accepts(found):
            raise DataError(f"column {spec.name!r}: expected {expected}, got {found}")


def check_footer(path: str | Path | Place, schema: FeatureSchema, labels: bool = False) -> pq.FileMetaData:
    """`check_columns` on a Parquet file's footer (no row is read; local or s3://);
    returns the footer (row count, `.schema.to_arrow_schema()`) for the caller's own checks."""
    where = place(path)
    try:
        meta = pq.read_metadata(where.path, filesystem=where.fs)
        columns = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        raise unavailable(e, where) or DataError(f"not a readable Parquet file: {e}") from None
    check_columns(columns, schema, labels)
    return meta


def table_to_batch(
    table: pa.Table, schema: FeatureSchema, *, max_seq_len: int | None = None, labels: bool = True
) -> Batch:
    """An Arrow table in the schema's format -> the model's input arrays (+ labels)."""
    check_columns(table.schema, schema, labels)

    batch: Batch = {}
    for spec in input_specs(schema):
        if spec.kind == "length":
            continue
        col = table.column(spec.name)
        if col.null_count:
            raise DataError(f"column {spec.name!r}: {col.null_count} null values")
        if spec.kind == "surface":
            batch[spec.name] = surface_index(col, schema)
        elif spec.kind == "sequence":
            batch[spec.name], length = pad_lists(col, max_seq_len)
            length_name = next(s.length_name for s in schema.sequences if s.name == spec.sequence)
            batch[length_name] = length
        else:
            batch[spec.name] = canonical(col, spec.kind).to_numpy()
    for seq in schema.sequences:
        lengths = {f.name: batch[f.name].shape for f in seq.fields}
        if len(set(lengths.values())) > 1:
            raise DataError(f"sequence {seq.name!r}: fields have different lengths {lengths}")
    if labels:
        for task in schema.tasks:
            batch[task.label_column] = pc.cast(table.column(task.label_column), pa.float32()).to_numpy()
    return batch


def check_finite(batch: Batch, schema: FeatureSchema) -> None:
    """Training data must have finite dense values (a NaN would poison the
    normalization statistics and every weight it reaches); names the first bad column."""
    for f in schema.dense:
        x = batch[f.name]
        bad = ~np.isfinite(x)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"column {f.name!r}: {int(bad.sum())} non-finite value(s) (NaN or inf; "
                f"the first at row {row}: {x[row]}); dense values must be finite to train on"
            )


def read_batch(
    path: str | Path | Place,
    schema: FeatureSchema,
    *,
    max_seq_len: int | None = None,
    labels: bool = True,
    finite: bool = True,
) -> Batch:
    """One Parquet file (local or s3://) -> a batch; with `finite` (training data)
    non-finite dense values are refused."""
    where = place(path)
    try:
        table = pq.read_table(where.path, filesystem=where.fs)
    except (OSError, pa.ArrowException) as e:
        raise unavailable(e, where) or DataError(f"{path}: not a readable Parquet file: {e}") from None
    try:
        batch = table_to_batch(table, schema, max_seq_len=max_seq_len, labels=labels)
        if finite:
            check_finite(batch, schema)
        return batch
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
