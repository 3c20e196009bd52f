"""GEM's knowledge, as `gem embed` wrote it, joined to logged rows by `example_id`.

`gem embed` writes `<out>/<input file stem>/part-*.parquet` (plus `_manifest.json`)
per input file, with `example_id`, `knowledge_<task>`, `adapted_<task>`, `embedding`
and `user_embedding` (README, "Batch knowledge export"). The join is one pyarrow
`index_in` over the key columns and one `take`: the result has exactly the logged
rows, in their order. A logged row without knowledge (refused by `gem embed`, a file
not stamped yet) is an error that names how many and which, never a silent drop, and
a key stamped twice is an error too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from model.outputs import EMBEDDING, USER_EMBEDDING

KEY = "example_id"


class KnowledgeJoinError(ValueError):
    """Logged rows and knowledge rows do not pair one to one."""


def knowledge_columns(tasks: tuple[str, ...], *, labels: bool = True, embeddings: bool = True) -> list[str]:
    cols = [f"{p}_{t}" for t in tasks for p in ("knowledge", "adapted")] if labels else []
    return cols + ([EMBEDDING, USER_EMBEDDING] if embeddings else [])


def read_knowledge(folder: str | Path, stems: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    """The knowledge of the given input files (by stem; all when None) as one table.
    Files whose knowledge is missing are named in the error."""
    folder = Path(folder)
    if stems is None:
        dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    else:
        dirs = [folder / s for s in stems]
        missing = [d.name for d in dirs if not (d / "_manifest.json").exists()]
        if missing:
            raise KnowledgeJoinError(
                f"no committed knowledge for {', '.join(missing)} in {folder} (run `gem embed` over those files)"
            )
    if not dirs:
        raise KnowledgeJoinError(f"no knowledge in {folder} (run `gem embed ... --out {folder}`)")
    files = [str(p) for d in dirs for p in sorted(d.glob("*.parquet"))]
    if not files:
        return pa.table({KEY: pa.array([], pa.int64())})
    cols = None if columns is None else [KEY, *columns]
    return ds.dataset(files, format="parquet").to_table(columns=cols)


def join_knowledge(logged: pa.Table, knowledge: pa.Table) -> pa.Table:
    """`logged` with the knowledge columns appended, row for row (one to one).

    Raises KnowledgeJoinError when a logged row has no knowledge (the count and the
    first ids), when a key is in the knowledge twice, or when knowledge is null."""
    for name, table in (("logged rows", logged), ("knowledge", knowledge)):
        if KEY not in table.column_names:
            raise KnowledgeJoinError(f"{name} lack the key column {KEY!r}")
    keys = knowledge.column(KEY)
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        raise KnowledgeJoinError(
            f"{len(twice)} example_id(s) have more than one knowledge row, e.g. {twice[:5].to_pylist()}"
        )
    index = pc.index_in(logged.column(KEY), value_set=keys.combine_chunks() if keys.num_chunks else keys)
    if index.null_count:
        missing = pc.filter(logged.column(KEY), pc.is_null(index))
        raise KnowledgeJoinError(
            f"{index.null_count} of {logged.num_rows} logged rows have no knowledge row, "
            f"example_id e.g. {missing[:5].to_pylist()}"
        )
    extra = knowledge.drop_columns([KEY]).take(index)
    for name in extra.column_names:
        if (nulls := extra.column(name).null_count) and name not in logged.column_names:
            raise KnowledgeJoinError(f"knowledge column {name!r} is null on {nulls} joined rows")
    out = logged
    for name in extra.column_names:
        out = out.append_column(f"k_{name}" if name in logged.column_names else name, extra.column(name))
    return out


def matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column (embeddings) -> float32 [n, width], no per-row Python."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def teacher_probs(table: pa.Table, prefix: str, tasks: tuple[str, ...]) -> np.ndarray:
    """[n, T] probabilities from `<prefix>_<task>` columns ("knowledge" or "adapted")."""
    return np.stack([table.column(f"{prefix}_{t}").to_numpy().astype(np.float32) for t in tasks], axis=1)


# The column `gem embed` stamps with the FM version of each row's knowledge.
FM_VERSION_COLUMN = "fm_version"


def knowledge_fm_version(folder: str | Path, stems: list[str]) -> int:
    """The one FM version whose embedding space the knowledge of these files is in. A
    student must not learn from two spaces at once: knowledge of mixed versions is an
    error that says how to stamp it under one (`gem embed --fm-version`)."""
    versions = pc.unique(read_knowledge(folder, stems, [FM_VERSION_COLUMN]).column(FM_VERSION_COLUMN)).to_pylist()
    versions = sorted(v for v in versions if v is not None)
    if len(versions) != 1:
        raise KnowledgeJoinError(
            f"the knowledge in {folder} comes from FM versions {versions or 'none'}, not one; stamp it again "
            f"under one version (`gem embed --fm-version V --overwrite`)"
        )
    return int(versions[0])
