"""`gem embed`: knowledge stamped onto logged examples, a Ray Data job."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from export.contract import TRITON_GRPC_URL
from gem.cli.common import (
    DEFAULT_REPO,
    BarProgress,
    RepoOption,
    SchemaOption,
    TritonUrlOption,
    backend_of,
    friendly_errors,
    progress,
    stdout,
)
from model.schema import DEFAULT_SCHEMA_PATH


@friendly_errors
def embed_cmd(
    source: Annotated[
        str,
        typer.Argument(help="Parquet file, folder or glob of logged examples (the schema's format); local or s3://."),
    ],
    out: Annotated[
        str,
        typer.Option(help="Output folder or s3:// URL: one subfolder per input file, errors in _errors/."),
    ],
    repo: RepoOption = DEFAULT_REPO,
    backend: Annotated[str, typer.Option(help="onnxruntime (in the Ray actors) or triton.")] = "onnxruntime",
    triton_url: TritonUrlOption = TRITON_GRPC_URL,
    batch_size: Annotated[int, typer.Option(help="Rows per model call in each actor.")] = 2048,
    actors: Annotated[int, typer.Option(help="Actors in the pool, each holding a model or a client.")] = 1,
    threads: Annotated[
        int, typer.Option(help="ONNX Runtime threads per actor (0: the node's cores divided among the actors).")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Redo files whose output exists (default: skip them).")] = False,
    fail_on_error: Annotated[
        bool,
        typer.Option(
            help="Refuse to start if any file cannot be read as the schema, and exit 2 if any row is refused "
            "(default: report both and go on)."
        ),
    ] = False,
    limit: Annotated[
        int | None, typer.Option(help="At most this many rows per file: a dry run (a later full run redoes them).")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray); --out must then be shared storage.")
    ] = None,
    group_by: Annotated[
        str,
        typer.Option(
            metavar="COLUMN",
            help="Request or user key column: with a user-indexed (shared_user) model, the rows of one key in a "
            "batch share one user encoding (checked; rows that differ are never merged). A file without the "
            "column: users found by their features alone. '' turns key grouping off.",
        ),
    ] = "request_id",
    fm_version: Annotated[
        int | None,
        typer.Option(
            help="Stamp with this FM version (one of the newest loaded) and the adapter published for it; "
            "recorded in each file's manifest (default: the latest)."
        ),
    ] = None,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Stamp GEM's knowledge (labels and adapted labels per task, embeddings, versions) onto
    logged examples, as one Ray Data job over all files. Resumable: each file's output is
    committed when complete, and a rerun skips committed files. Logged rows are one per
    impression: a user-indexed model encodes each user of a batch once (--group-by), and
    the summary says how many users were encoded for how many rows."""
    from jobs.embed import EmbedConfig, run_embed
    from model.data.reader import DataError

    cfg = EmbedConfig(
        source=source, out=out, repository=repo, schema_path=schema, backend=backend_of(backend),
        triton_url=triton_url, batch_size=batch_size, actors=actors, threads=threads, overwrite=overwrite,
        fail_on_error=fail_on_error, limit=limit, address=address, group_by=group_by or None, fm_version=fm_version,
    )  # fmt: skip

    with progress("rows") as bar:
        summary = run_embed(cfg, BarProgress(bar))
    table = Table(title=f"gem embed -> {out}")
    columns = ("files", "skipped", "failed", "rows in", "rows out", "error rows", "users encoded", "seconds",
               "rows/s")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    rate = summary.rows_done_now / summary.seconds if summary.seconds else 0.0
    table.add_row(
        str(len(summary.files)), str(sum(f.skipped for f in summary.files)), str(len(summary.failed_files)),
        f"{summary.rows_in:,}", f"{summary.rows_out:,}", f"{summary.error_rows:,}", f"{summary.users_encoded:,}",
        f"{summary.seconds:.1f}", f"{rate:,.0f}",
    )  # fmt: skip
    stdout().print(table)
    if summary.failed_files:
        raise DataError("; ".join(f"{f.path.name}: {f.error}" for f in summary.failed_files))
    if summary.error_rows and fail_on_error:
        raise DataError(f"{summary.error_rows:,} rows refused (--fail-on-error); reasons in {out.rstrip('/')}/_errors")
