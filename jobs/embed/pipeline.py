"""The driver: plans the run, streams every pending file through the actor pool (one
Ray Data pipeline per distinct Parquet schema among them), counts the actors' receipts
and commits each file when all of its rows are written."""

from __future__ import annotations

import logging
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from export.contract import LOADED_VERSIONS
from jobs.embed.commit import STAGING, commit
from jobs.embed.config import EmbedConfig
from jobs.embed.outputs import KEY_COLUMNS
from jobs.embed.plan import plan
from jobs.embed.results import FileResult, Summary
from jobs.embed.stamper import PATH_COLUMN, KnowledgeStamper
from model.data.reader import DataError
from model.features import input_specs
from model.progress import SILENT, Progress
from model.schema import FeatureSchema, load_schema
from model.storage import Place, place, remove
from serving.backends.errors import VersionNotLoaded
from serving.backends.onnx import published_graphs

log = logging.getLogger(__name__)


def _dataset(pending: list[FileResult], cfg: EmbedConfig, columns: list[str]):
    import ray

    if cfg.limit is None:
        # The filesystem's own paths (S3: `bucket/key`), which Ray Data puts in PATH_COLUMN.
        files = [r.path.path for r in pending]
        read = ray.data.read_parquet(files, filesystem=pending[0].path.fs, include_paths=True)
        return read.select_columns([*columns, PATH_COLUMN])
    # A dry run reads the head of each file here: a few rows, not worth a read task.
    heads = []
    for r in pending:
        batches, rows = [], 0
        with r.path.fs.open_input_file(r.path.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=cfg.limit, columns=columns):
                batches.append(batch)
                rows += batch.num_rows
                if rows >= cfg.limit:
                    break
        head = pa.Table.from_batches(batches).slice(0, cfg.limit)
        heads.append(head.append_column(PATH_COLUMN, pa.array([r.path.path] * head.num_rows)))
    return ray.data.from_arrow(heads)


def _root_cause(e: BaseException) -> str:
    """The user-facing reason inside Ray's wrappers (a DataError names the column)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
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


def _stamp(
    live: dict[str, FileResult],
    names: list[str],
    cfg: EmbedConfig,
    schema: FeatureSchema,
    progress: Progress,
    out: Place,
    run_staging: Place,
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
        fn_constructor_kwargs={"cfg": cfg, "schema_yaml": schema.to_yaml(), "staging": run_staging.uri},
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
                result.parts += receipt["parts"]
                for key in ("fm_version", "adapter_version"):
                    versions = getattr(result, f"{key}s")
                    if receipt[key] and receipt[key] not in versions:
                        versions.append(receipt[key])
                progress.advance(receipt["rows_out"] + receipt["error_rows"])
                if result.done:
                    commit(result, out, cfg.limit, cfg.fm_version, run_staging)
                    progress.note(result.describe())
    except (DataError, ray.exceptions.RayError, pa.ArrowException, OSError) as e:
        reason = _root_cause(e)
        for result in live.values():
            if not result.done:
                result.error = reason
    for result in live.values():
        if not result.done and not result.error:
            result.error = f"only {result.rows_out + result.error_rows:,} of {result.rows_in:,} rows came back"
        if result.error:
            progress.note(result.describe())


def run_embed(cfg: EmbedConfig, progress: Progress = SILENT) -> Summary:
    """Stamp every pending file: one pipeline per distinct Parquet schema among them
    (usually one; Ray Data cannot merge, say, a dictionary and a plain string column).
    `progress` hears one unit, its total the rows to stamp, and a note per file
    (committed, skipped or failed)."""
    import ray

    start = time.perf_counter()
    if cfg.backend == "onnxruntime":
        # No model, or a pin to a version the actors will not load: say so now, not
        # from every actor.
        loaded = [fm for fm, _ in published_graphs(cfg.repository, LOADED_VERSIONS)]
        if cfg.fm_version is not None and cfg.fm_version not in loaded:
            raise VersionNotLoaded(cfg.fm_version, loaded)
    schema = load_schema(cfg.schema_path)
    files, footers = plan(cfg, schema)
    summary = Summary(files)
    progress.start("stamping knowledge", total=summary.rows_done_now)
    for result in summary.files:
        if result.skipped or result.error:
            progress.note(result.describe())
    pending = [r for r in summary.files if not r.skipped and not r.error]
    if summary.failed_files and cfg.fail_on_error:
        pending = []
    groups: dict[pa.Schema, dict[str, FileResult]] = {}
    # Each run stages under a folder of its own: the actors of a killed run can outlive
    # their driver for a while, and must never add parts to this run's files. What
    # earlier runs staged is never committed, so it goes.
    out = place(cfg.out)
    run_staging = out / STAGING / uuid.uuid4().hex[:12]
    if pending:
        remove(out / STAGING)
    if cfg.group_by:
        lacking = [r for r in pending if cfg.group_by not in footers[r.path].names]
        if lacking:
            log.info("gem embed: %d of %d file(s) have no %r column: their users are found by content alone",
                     len(lacking), len(pending), cfg.group_by)  # fmt: skip
    for result in pending:
        if result.done:  # an empty file
            commit(result, out, cfg.limit, cfg.fm_version, run_staging)
            progress.note(result.describe())
        else:
            groups.setdefault(footers[result.path].remove_metadata(), {})[result.path.path] = result
    if groups and not ray.is_initialized():
        ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for columns, live in groups.items():
        _stamp(live, columns.names, cfg, schema, progress, out, run_staging)
    if pending:
        # Also what a killed run's actors wrote while this one ran: nothing commits it.
        remove(out / STAGING)
    summary.seconds = time.perf_counter() - start
    if summary.rows_stamped:
        log.info("gem embed: users encoded: %s for %s rows", f"{summary.users_encoded:,}", f"{summary.rows_stamped:,}")
    return summary
