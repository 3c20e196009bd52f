"""`gem embed`: stamp GEM's knowledge onto logged examples, as a Ray Data job.

Each input Parquet file becomes one output folder `<out>/<file stem>/` (Ray Data writes
its parts in parallel into a hidden temporary folder, renamed into place when the file
is complete), so a rerun after a crash skips finished files and never duplicates or
leaves gaps. Inside, an actor pool (`map_batches` with `concurrency`) holds the model:
in-process ONNX Runtime, or a client of the Triton server. The same job runs on a
laptop, here, or on a Ray cluster (`address`).

Rows that do not match the schema (nulls, unknown surfaces, ragged sequence fields) go
to `<out>/_errors/<file stem>.parquet` with the reason; a file that cannot be read as
the schema at all (a column of the wrong type) is reported in the summary. Nothing is
dropped silently: rows out + error rows = rows in, per file.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from export.onnx_export import ADAPTER_OUTPUT
from model.data.reader import DataError, check_columns, resolve_paths, table_to_batch
from model.features import EMBEDDING, LOGITS, USER_EMBEDDING, input_specs, zero_batch
from model.schema import DEFAULT_SCHEMA_PATH, FeatureSchema, load_schema
from serving.backends import OnnxBackend, TritonBackend, sigmoid

log = logging.getLogger(__name__)

KEY_COLUMNS = ("example_id", "event_ts", "surface")
MODEL_OUTPUTS = (LOGITS, ADAPTER_OUTPUT, EMBEDDING, USER_EMBEDDING)
ERRORS = "_errors"


@dataclass(frozen=True)
class EmbedConfig:
    source: str
    out: Path
    repository: Path = Path("model_repo")
    schema_path: Path = DEFAULT_SCHEMA_PATH
    # "onnxruntime" (in the actors) or "triton".
    backend: str = "onnxruntime"
    triton_url: str = "127.0.0.1:8001"
    batch_size: int = 1024
    actors: int = 1
    overwrite: bool = False
    # Stop at the first file that cannot be read as the schema (else report and go on).
    fail_on_error: bool = False
    # Rows per input file at most (a dry run).
    limit: int | None = None
    # Ray cluster address (None: a local Ray).
    address: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "triton"):
            raise ValueError(f"backend must be 'onnxruntime' or 'triton', got {self.backend!r}")
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError("batch_size and actors must be at least 1")


@dataclass
class FileResult:
    path: Path
    rows_in: int = 0
    rows_out: int = 0
    error_rows: int = 0
    skipped: bool = False
    error: str = ""


@dataclass
class Summary:
    files: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_in(self) -> int:
        return sum(f.rows_in for f in self.files)

    @property
    def rows_out(self) -> int:
        return sum(f.rows_out for f in self.files)

    @property
    def error_rows(self) -> int:
        return sum(f.error_rows for f in self.files)

    @property
    def failed_files(self) -> list[FileResult]:
        return [f for f in self.files if f.error]


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


class KnowledgeStamper:
    """The actor of the pool: holds one model (or Triton client) and stamps batches."""

    def __init__(self, cfg: EmbedConfig, schema_yaml: str):
        from model.schema import schema_from_yaml

        self.schema = schema_from_yaml(schema_yaml)
        if cfg.backend == "onnxruntime":
            backend = OnnxBackend(cfg.repository)
            self.infer = lambda batch: backend.run(batch, MODEL_OUTPUTS)
        else:
            # The asyncio Triton client wants its loop current while it is made.
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            backend = TritonBackend(cfg.triton_url, timeout_s=120)
            self.infer = lambda batch: loop.run_until_complete(backend.infer(batch, MODEL_OUTPUTS))
        # Output widths from one all-zero row, for batches in which no row can be served.
        probe = self.infer(zero_batch(self.schema)).outputs
        self.widths = {name: probe[name].shape[1] for name in (EMBEDDING, USER_EMBEDDING)}

    def __call__(self, table: pa.Table) -> pa.Table:
        """Keys, knowledge (null on rows that cannot be served) and `error` per row."""
        problems = row_problems(table, self.schema)
        good = pc.is_null(problems).to_numpy(zero_copy_only=False)
        n, rows = table.num_rows, table.filter(pa.array(good))
        columns: dict[str, pa.Array] = {k: table.column(k) for k in KEY_COLUMNS if k in table.column_names}
        missing = ~good
        if rows.num_rows:
            knowledge = self.infer(table_to_batch(rows, self.schema, labels=False))
        for t, task in enumerate(self.schema.task_names):
            for prefix, output in (("knowledge", LOGITS), ("adapted", ADAPTER_OUTPUT)):
                values = np.zeros(n, np.float32)
                if rows.num_rows:
                    values[good] = sigmoid(knowledge.outputs[output][:, t])
                columns[f"{prefix}_{task}"] = pa.array(values, mask=missing)
        for name, width in self.widths.items():
            values = np.zeros((n, width), np.float32)
            if rows.num_rows:
                values[good] = knowledge.outputs[name]
            columns[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(values.reshape(-1)), width, mask=pa.array(missing)
            )
        versions = (knowledge.fm_version, knowledge.adapter_version) if rows.num_rows else (0, 0)
        for name, version in zip(("fm_version", "adapter_version"), versions, strict=True):
            columns[name] = pa.array(np.full(n, version, np.int64), mask=missing)
        columns["error"] = problems
        return pa.table(columns)


def _served(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column("error"))).drop_columns(["error"])


def _refused(table: pa.Table) -> pa.Table:
    keys = [k for k in KEY_COLUMNS if k in table.column_names]
    return table.filter(pc.is_valid(table.column("error"))).select([*keys, "error"])


def _check_file(path: Path, schema: FeatureSchema) -> None:
    """A file whose columns do not fit the schema is refused from its footer, before any work."""
    try:
        columns = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"not a readable Parquet file: {e}") from None
    check_columns(columns, schema)


def _root_cause(e: BaseException) -> str:
    """The user-facing reason inside Ray's wrappers (a DataError names the column)."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        cause = getattr(x, "cause", None)
        cause = cause if isinstance(cause, BaseException) else None
        if isinstance(x, DataError) and cause is None:
            return str(x)
        stack += [x.__context__, x.__cause__, cause]
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def embed_file(path: Path, cfg: EmbedConfig, schema: FeatureSchema) -> FileResult:
    import ray

    result = FileResult(path)
    target, errors_target = cfg.out / path.stem, cfg.out / ERRORS / path.stem
    if target.exists() and not cfg.overwrite:
        result.skipped = True
        return result
    tmp = cfg.out / f".{path.stem}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _check_file(path, schema)
        ds = ray.data.read_parquet(str(path))
        if cfg.limit is not None:
            ds = ds.limit(cfg.limit)
        result.rows_in = ds.count()
        # Actors must leave a CPU to the read and write tasks, or a pool as large as the
        # machine waits forever for its input.
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        stamped = ds.map_batches(
            KnowledgeStamper,
            num_cpus=min(1.0, max(0.25, (cpus - 1) / cfg.actors)),
            fn_constructor_kwargs={"cfg": cfg, "schema_yaml": schema.to_yaml()},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        ).materialize()
        served, refused = (
            stamped.map_batches(_served, batch_format="pyarrow"),
            stamped.map_batches(_refused, batch_format="pyarrow"),
        )
        result.rows_out, result.error_rows = served.count(), refused.count()
        served.write_parquet(str(tmp / "data"))
        if result.error_rows:
            refused.write_parquet(str(tmp / "errors"))
    except (DataError, ray.exceptions.RayError, pa.ArrowException, OSError) as e:
        # The file is reported; the caller decides whether to go on.
        shutil.rmtree(tmp, ignore_errors=True)
        result.error = _root_cause(e)
        return result
    # Errors first, data last: the data folder is what marks the file as done.
    for final, part in ((errors_target, tmp / "errors"), (target, tmp / "data")):
        if final.exists():
            shutil.rmtree(final)
        if part.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            part.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def run_embed(cfg: EmbedConfig, on_file: Callable[[FileResult], None] = lambda _: None) -> Summary:
    import ray

    schema = load_schema(cfg.schema_path)
    paths = [p for p in resolve_paths(cfg.source) if not p.is_relative_to(cfg.out.resolve())]
    if not paths:
        raise DataError(f"no Parquet files at {cfg.source}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary, start = Summary(), time.perf_counter()
    for path in paths:
        result = embed_file(path, cfg, schema)
        summary.files.append(result)
        on_file(result)
        if result.error:
            log.error("%s: %s", path, result.error)
            if cfg.fail_on_error:
                break
    summary.seconds = time.perf_counter() - start
    return summary
