"""`gem embed`: stamp GEM's knowledge onto logged examples, as a Ray Data job.

One streaming pipeline covers every pending input file: `read_parquet` (the file path
as a column) -> `map_batches` on an actor pool that holds the model (in-process ONNX
Runtime, or a client of the Triton server) and writes each batch's rows as Parquet parts
into the staging folder of their file -> the driver, which counts rows per file from the
actors' small receipts and commits a file (renames its staging folder into place) as
soon as all of its rows are written. Writes are spread over the actors, the commit is
the driver's alone, so the same job runs on a laptop, here, or on a Ray cluster
(`address`; the output folder must then be shared storage).

Each input file becomes `<out>/<file stem>/` (parts plus `_manifest.json`, the commit
marker: a rerun after a crash skips committed files and redoes the others, so there are
no duplicates or gaps). Rows that do not match the schema (nulls, unknown surfaces,
ragged sequence fields) go to `<out>/_errors/<file stem>/` with the reason; a file that
cannot be read as the schema at all (a column of the wrong type) is refused from its
Parquet footer before any work. Nothing is dropped silently: per file, rows out + error
rows = rows in.

Logged rows are one row per impression. When the served FM takes the user-indexed form
(`shared_user`), each batch goes to it with each user once: the rows of one request (or
user) key, `group_by` (default `request_id`, when the file has that column), become one
user row after an exact check that they agree (else, and without the column, identical
user rows are found by content). The summary counts the users encoded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from export.contract import ADAPTER_OUTPUT
from model.data.reader import DataError, check_footer, resolve_paths, table_to_batch
from model.examples import zero_batch
from model.features import USER_INDEX, input_specs, user_input_names
from model.outputs import EMBEDDING, LOGITS, USER_EMBEDDING, sigmoid
from model.schema import DEFAULT_SCHEMA_PATH, FeatureSchema, load_schema
from model.user_index import share_users
from serving.backends import OnnxBackend, TritonBackend, published_graphs

log = logging.getLogger(__name__)

KEY_COLUMNS = ("example_id", "event_ts", "surface")
MODEL_OUTPUTS = (LOGITS, ADAPTER_OUTPUT, EMBEDDING, USER_EMBEDDING)
ERRORS = "_errors"
STAGING = ".staging"
MANIFEST = "_manifest.json"
# Ray Data's column with each row's source file (`include_paths`).
PATH_COLUMN = "path"


@dataclass(frozen=True)
class EmbedConfig:
    source: str
    out: Path
    repository: Path = Path("model_repo")
    schema_path: Path = DEFAULT_SCHEMA_PATH
    # "onnxruntime" (in the actors) or "triton".
    backend: str = "onnxruntime"
    triton_url: str = "127.0.0.1:8001"
    batch_size: int = 2048
    actors: int = 1
    # ONNX Runtime threads per actor (0: the node's cores divided among the actors).
    threads: int = 0
    overwrite: bool = False
    # Refuse to start when a file cannot be read as the schema, and fail the job when
    # any row is refused (else: report them and go on).
    fail_on_error: bool = False
    # Rows per input file at most (a dry run).
    limit: int | None = None
    # Ray cluster address (None: a local Ray).
    address: str | None = None
    # The request (or user) key column: a user-indexed FM encodes the user of each key
    # once per batch. None, or a column a file lacks: users found by content alone.
    group_by: str | None = "request_id"

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "triton"):
            raise ValueError(f"backend must be 'onnxruntime' or 'triton', got {self.backend!r}")
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError("batch_size and actors must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be at least 1")


@dataclass
class FileResult:
    path: Path
    rows_in: int = 0
    rows_out: int = 0
    error_rows: int = 0
    skipped: bool = False
    error: str = ""
    # User-side encodings computed for the rows out (= rows out for a per-example FM).
    users: int = 0
    fm_versions: list[int] = field(default_factory=list)
    adapter_versions: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.rows_out + self.error_rows == self.rows_in


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

    @property
    def users_encoded(self) -> int:
        """Users encoded by this run (per batch: a user whose rows span batches counts in each)."""
        return sum(f.users for f in self.files if not f.skipped and not f.error)

    @property
    def rows_stamped(self) -> int:
        """Rows stamped by this run (skipped files not counted)."""
        return sum(f.rows_out for f in self.files if not f.skipped and not f.error)

    @property
    def rows_done_now(self) -> int:
        """Rows stamped by this run (skipped files not counted): what rows/s is about."""
        return sum(f.rows_in for f in self.files if not f.skipped and not f.error)


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
    """The actor of the pool: holds one model (or Triton client), stamps batches, writes
    each batch's rows into its file's staging folder and returns a receipt per file."""

    def __init__(self, cfg: EmbedConfig, schema_yaml: str, staging: str):
        import os

        from model.schema import schema_from_yaml

        self.schema, self.staging = schema_from_yaml(schema_yaml), Path(staging)
        self.group_by = cfg.group_by
        users = user_input_names(self.schema)
        if cfg.backend == "onnxruntime":
            # The node's cores shared among the pool (actors spread evenly over nodes).
            threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors)
            backend = OnnxBackend(cfg.repository, threads=threads, user_names=users)
            self.infer = lambda batch: backend.run(batch, MODEL_OUTPUTS)
            # The FM's user inputs if it takes the user-indexed form, else None.
            self.fm_users = backend.fm_user_inputs()
        else:
            # The asyncio Triton client wants its loop current while it is made.
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            backend = TritonBackend(cfg.triton_url, timeout_s=120, user_names=users)
            self.infer = lambda batch: loop.run_until_complete(backend.infer(batch, MODEL_OUTPUTS))
            self.fm_users = loop.run_until_complete(backend.fm_user_inputs())
        # Output widths from one all-zero row, for batches in which no row can be served.
        probe = self.infer(zero_batch(self.schema)).outputs
        self.widths = {name: probe[name].shape[1] for name in (EMBEDDING, USER_EMBEDDING)}

    def _model_batch(self, rows: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The FM's batch of (servable) rows, and the user row each row is encoded by. A
        user-indexed FM gets each user once: by the key column where there is one,
        checked exactly, else by content (`share_users`); it goes pre-indexed."""
        batch = table_to_batch(rows, self.schema, labels=False)
        if self.fm_users is None:
            return batch, np.arange(rows.num_rows)
        keys = key_codes(rows.column(self.group_by)) if self.group_by in rows.column_names else None
        batch = share_users(batch, self.fm_users, keys=keys)
        return batch, batch[USER_INDEX]

    def stamp(self, table: pa.Table) -> pa.Table:
        """Keys, knowledge (null on rows that cannot be served) and `error` per row."""
        return self._stamp(table)[0]

    def _stamp(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """`stamp`, and per row the user row of its batch that encoded it (-1: not served)."""
        problems = row_problems(table, self.schema)
        good = pc.is_null(problems).to_numpy(zero_copy_only=False)
        n, rows = table.num_rows, table.filter(pa.array(good))
        columns: dict[str, pa.Array] = {k: table.column(k) for k in KEY_COLUMNS if k in table.column_names}
        missing = ~good
        user_of = np.full(n, -1, np.int64)
        if rows.num_rows:
            batch, user_rows = self._model_batch(rows)
            user_of[good] = user_rows
            knowledge = self.infer(batch)
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
        return pa.table(columns), user_of

    def __call__(self, table: pa.Table) -> pa.Table:
        stamped, user_of = self._stamp(table.drop_columns([PATH_COLUMN]))
        sources = table.column(PATH_COLUMN)
        receipts = []
        # A batch may span files (a handful): one part per file and kind.
        for source in pc.unique(sources).to_pylist():
            here = pc.equal(sources, source)
            rows = stamped.filter(here)
            mine = user_of[here.to_numpy(zero_copy_only=False)]
            bad = pc.is_valid(rows.column("error"))
            served = rows.filter(pc.invert(bad)).drop_columns(["error"])
            errors = rows.filter(bad).select([c for c in (*KEY_COLUMNS, "error") if c in rows.column_names])
            folder = self.staging / Path(source).stem
            for kind, part in (("data", served), ("errors", errors)):
                if part.num_rows:
                    (folder / kind).mkdir(parents=True, exist_ok=True)
                    pq.write_table(part, folder / kind / f"part-{uuid.uuid4().hex}.parquet")
            receipts.append({
                PATH_COLUMN: source, "rows_out": served.num_rows, "error_rows": errors.num_rows,
                "users": int(np.unique(mine[mine >= 0]).size),
                "fm_version": int(pc.max(served.column("fm_version")).as_py() or 0),
                "adapter_version": int(pc.max(served.column("adapter_version")).as_py() or 0),
            })  # fmt: skip
        return pa.Table.from_pylist(receipts)


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


def _check_file(path: Path, schema: FeatureSchema) -> tuple[int, pa.Schema]:
    """A file whose columns do not fit the schema is refused from its footer, before any
    work; returns its row count and Arrow schema."""
    meta = check_footer(path, schema)
    columns = meta.schema.to_arrow_schema()
    if KEY_COLUMNS[0] not in columns.names:
        raise DataError(f"missing column {KEY_COLUMNS[0]!r} (the key of the output rows)")
    return meta.num_rows, columns


def _committed(target: Path, cfg: EmbedConfig) -> dict | None:
    """The manifest of a file's finished output, if it stands for what is asked now (a
    dry run's output does not stand for the whole file)."""
    manifest = target / MANIFEST
    if not manifest.exists():
        return None
    done = json.loads(manifest.read_text())
    return done if done.get("limit") in (None, cfg.limit) else None


def plan(cfg: EmbedConfig, schema: FeatureSchema) -> tuple[list[FileResult], dict[Path, pa.Schema]]:
    """Every input file: skipped (committed before), refused (with the reason) or pending
    (with the rows it will stamp); and the Arrow schema of each pending file, read once
    from its footer here."""
    paths = [p for p in resolve_paths(cfg.source) if not p.resolve().is_relative_to(cfg.out.resolve())]
    if not paths:
        raise DataError(f"no Parquet files at {cfg.source} (outside the output folder)")
    stems: dict[str, Path] = {}
    for path in paths:
        if (other := stems.setdefault(path.stem, path)) != path:
            raise DataError(f"{other} and {path} would both write {cfg.out / path.stem}: rename one")
    results, footers = [], {}
    for path in paths:
        result = FileResult(path.resolve())
        done = None if cfg.overwrite else _committed(cfg.out / path.stem, cfg)
        if done is not None:
            result.skipped = True
            for key in ("rows_in", "rows_out", "error_rows", "fm_versions", "adapter_versions"):
                setattr(result, key, done[key])
            result.users = done.get("users", 0)
        else:
            try:
                rows, footers[result.path] = _check_file(path, schema)
                result.rows_in = rows if cfg.limit is None else min(rows, cfg.limit)
            except DataError as e:
                result.error = str(e)
        results.append(result)
    return results, footers


def _commit(result: FileResult, cfg: EmbedConfig, run_staging: Path) -> None:
    """Errors first, data (with its manifest) last: the data folder marks the file done."""
    stem = result.path.stem
    staging = run_staging / stem
    (staging / "data").mkdir(parents=True, exist_ok=True)
    manifest = {"source": str(result.path), "limit": cfg.limit, **asdict(result)}
    del manifest["path"], manifest["skipped"], manifest["error"]
    (staging / "data" / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for final, part in ((cfg.out / ERRORS / stem, staging / "errors"), (cfg.out / stem, staging / "data")):
        if final.exists():
            shutil.rmtree(final)
        if part.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            part.rename(final)
    shutil.rmtree(staging, ignore_errors=True)


def _dataset(pending: list[FileResult], cfg: EmbedConfig, columns: list[str]):
    import ray

    if cfg.limit is None:
        files = [str(r.path) for r in pending]
        return ray.data.read_parquet(files, include_paths=True).select_columns([*columns, PATH_COLUMN])
    # A dry run reads the head of each file here: a few rows, not worth a read task.
    heads = []
    for r in pending:
        batches, rows = [], 0
        for batch in pq.ParquetFile(r.path).iter_batches(batch_size=cfg.limit, columns=columns):
            batches.append(batch)
            rows += batch.num_rows
            if rows >= cfg.limit:
                break
        head = pa.Table.from_batches(batches).slice(0, cfg.limit)
        heads.append(head.append_column(PATH_COLUMN, pa.array([str(r.path)] * head.num_rows)))
    return ray.data.from_arrow(heads)


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


class Listener:
    """What a caller hears of a run (the CLI draws its progress bar from it)."""

    def planned(self, files: list[FileResult]) -> None:
        """Every input file, before any work: skipped, refused or pending."""

    def rows(self, n: int) -> None:
        """`n` more rows written (served or refused)."""

    def file(self, result: FileResult) -> None:
        """A file committed, skipped or failed."""


def _stamp(
    live: dict[str, FileResult],
    names: list[str],
    cfg: EmbedConfig,
    schema: FeatureSchema,
    listener: Listener,
    run_staging: Path,
) -> None:
    """One pipeline over files that share a Parquet schema (with columns `names`): read ->
    actor pool -> the driver counts receipts and commits each file when all its rows are
    written."""
    import ray

    columns = list(dict.fromkeys(
        [k for k in KEY_COLUMNS if k in names] + [s.name for s in input_specs(schema) if s.kind != "length"]
        + [c for c in [cfg.group_by] if c and c in names]
    ))  # fmt: skip
    # Actors leave a CPU to the read tasks, or a pool as large as the machine waits
    # forever for its input.
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    receipts = _dataset(list(live.values()), cfg, columns).map_batches(
        KnowledgeStamper,
        num_cpus=min(1.0, max(0.25, (cpus - 1) / cfg.actors)),
        fn_constructor_kwargs={"cfg": cfg, "schema_yaml": schema.to_yaml(), "staging": str(run_staging)},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
    )
    try:
        for block in receipts.iter_batches(batch_size=None, batch_format="pyarrow"):
            # A receipt per file and batch: a handful per block, not a row loop.
            for receipt in block.to_pylist():
                result = live[receipt[PATH_COLUMN]]
                result.rows_out += receipt["rows_out"]
                result.error_rows += receipt["error_rows"]
                result.users += receipt["users"]
                for key in ("fm_version", "adapter_version"):
                    versions = getattr(result, f"{key}s")
                    if receipt[key] and receipt[key] not in versions:
                        versions.append(receipt[key])
                listener.rows(receipt["rows_out"] + receipt["error_rows"])
                if result.done:
                    _commit(result, cfg, run_staging)
                    listener.file(result)
    except (DataError, ray.exceptions.RayError, pa.ArrowException, OSError) as e:
        reason = _root_cause(e)
        for result in live.values():
            if not result.done:
                result.error = reason
    for result in live.values():
        if not result.done and not result.error:
            result.error = f"only {result.rows_out + result.error_rows:,} of {result.rows_in:,} rows came back"
        if result.error:
            listener.file(result)


def run_embed(cfg: EmbedConfig, listener: Listener | None = None) -> Summary:
    """Stamp every pending file: one pipeline per distinct Parquet schema among them
    (usually one; Ray Data cannot merge, say, a dictionary and a plain string column)."""
    import ray

    start = time.perf_counter()
    listener = listener or Listener()
    if cfg.backend == "onnxruntime":
        published_graphs(cfg.repository)  # no model: say so now, not from every actor
    schema = load_schema(cfg.schema_path)
    files, footers = plan(cfg, schema)
    summary = Summary(files)
    listener.planned(summary.files)
    for result in summary.files:
        if result.skipped or result.error:
            listener.file(result)
    pending = [r for r in summary.files if not r.skipped and not r.error]
    if summary.failed_files and cfg.fail_on_error:
        pending = []
    groups: dict[pa.Schema, dict[str, FileResult]] = {}
    # Each run stages under a folder of its own: the actors of a killed run can outlive
    # their driver for a while, and must never add parts to this run's files. What
    # earlier runs staged is never committed, so it goes.
    run_staging = cfg.out / STAGING / uuid.uuid4().hex[:12]
    if pending:
        shutil.rmtree(cfg.out / STAGING, ignore_errors=True)
    if cfg.group_by:
        lacking = [r for r in pending if cfg.group_by not in footers[r.path].names]
        if lacking:
            log.info("gem embed: %d of %d file(s) have no %r column: their users are found by content alone",
                     len(lacking), len(pending), cfg.group_by)  # fmt: skip
    for result in pending:
        if result.done:  # an empty file
            _commit(result, cfg, run_staging)
            listener.file(result)
        else:
            groups.setdefault(footers[result.path].remove_metadata(), {})[str(result.path)] = result
    if groups and not ray.is_initialized():
        ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for columns, live in groups.items():
        _stamp(live, columns.names, cfg, schema, listener, run_staging)
    if pending:
        # Also what a killed run's actors wrote while this one ran: nothing commits it.
        shutil.rmtree(cfg.out / STAGING, ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    if summary.rows_stamped:
        log.info("gem embed: users encoded: %s for %s rows", f"{summary.users_encoded:,}", f"{summary.rows_stamped:,}")
    return summary
