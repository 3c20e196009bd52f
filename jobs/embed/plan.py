"""Which input files a run does: each is skipped (committed before), refused from its
Parquet footer (with the reason) or pending (with the rows it will stamp)."""

from __future__ import annotations

import pyarrow as pa

from jobs.embed.config import EmbedConfig
from jobs.embed.manifest import committed, skipped_result
from jobs.embed.outputs import KEY_COLUMNS
from jobs.embed.results import FileResult
from model.data.reader import DataError, check_footer, resolve_places
from model.schema import FeatureSchema
from model.storage import Place, check_bucket, place


def check_file(path: Place, schema: FeatureSchema) -> tuple[int, pa.Schema]:
    """A file whose columns do not fit the schema is refused from its footer, before any
    work; returns its row count and Arrow schema."""
    meta = check_footer(path, schema)
    columns = meta.schema.to_arrow_schema()
    if KEY_COLUMNS[0] not in columns.names:
        raise DataError(f"missing column {KEY_COLUMNS[0]!r} (the key of the output rows)")
    return meta.num_rows, columns


def plan(cfg: EmbedConfig, schema: FeatureSchema) -> tuple[list[FileResult], dict[Place, pa.Schema]]:
    """Every input file (local or s3://): skipped, refused or pending; and the Arrow schema
    of each pending file, read once from its footer here."""
    out = place(cfg.out)
    check_bucket(out)
    paths = [p for p in resolve_places(cfg.source) if not p.is_relative_to(out)]
    if not paths:
        raise DataError(f"no Parquet files at {cfg.source} (outside the output folder)")
    stems: dict[str, Place] = {}
    for path in paths:
        if (other := stems.setdefault(path.stem, path)) != path:
            raise DataError(f"{other} and {path} would both write {out / path.stem}: rename one")
    results, footers = [], {}
    for path in paths:
        done = None if cfg.overwrite else committed(out / path.stem, cfg.limit, cfg.fm_version)
        if done is not None:
            results.append(skipped_result(path, done))
            continue
        result = FileResult(path)
        try:
            rows, footers[result.path] = check_file(path, schema)
            result.rows_in = rows if cfg.limit is None else min(rows, cfg.limit)
        except DataError as e:
            result.error = str(e)
        results.append(result)
    return results, footers
