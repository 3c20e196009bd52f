"""`gem data` and `gem schema`: synthetic logged examples and the feature schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gem.cli.common import (
    DEFAULT_DATA,
    DEFAULT_STREAM,
    BarProgress,
    SchemaOption,
    console,
    friendly_errors,
    log,
    progress,
)
from model.schema import DEFAULT_SCHEMA_PATH, load_schema

data_app = typer.Typer(help="Synthetic logged examples.", no_args_is_help=True)
schema_app = typer.Typer(help="The feature schema.", no_args_is_help=True)


@schema_app.command("check")
@friendly_errors
def schema_check(path: Annotated[Path, typer.Argument(help="Schema YAML to validate.")] = DEFAULT_SCHEMA_PATH) -> None:
    """Validate a schema file and summarize it."""
    s = load_schema(path)
    seqs = ", ".join(f"{q.name} (max {q.max_length}: {', '.join(f.name for f in q.fields)})" for q in s.sequences)
    console.print(
        f"[green]ok[/] {s.name}: {len(s.sparse)} sparse, {len(s.dense)} dense, sequences: {seqs or 'none'}; "
        f"surfaces: {', '.join(s.surfaces)}; tasks: {', '.join(s.task_names)}",
        highlight=False,
    )


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder for the Parquet shards (part-00000.parquet, ...).")] = DEFAULT_DATA,
    rows: Annotated[int, typer.Option(help="Total rows over all shards.")] = 200_000,
    shards: Annotated[int, typer.Option(help="Files, each a consecutive time slice; the last is the freshest.")] = 4,
    seed: Annotated[int, typer.Option(help="Same seed, same data.")] = 0,
    drift: Annotated[float, typer.Option(help="0 = stationary; 1 = preferences move fully over the time range.")] = 0.0,
    days: Annotated[float, typer.Option(help="Time range the shards cover.")] = 7.0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Generate logged examples from a planted model (deterministic by seed)."""
    from model.data.synth import SynthConfig, write_shards

    cfg = SynthConfig(rows=rows, shards=shards, seed=seed, drift=drift, days=days)
    with progress("rows") as bar:
        paths = write_shards(cfg, load_schema(schema), out, progress=BarProgress(bar))
    log.info("wrote %d rows in %d shard(s) to %s", rows, len(paths), out)


@data_app.command("stream")
@friendly_errors
def data_stream(
    out: Annotated[Path, typer.Option(help="Folder the shards arrive in (what `gem trainer run --stream` reads).")] = (
        DEFAULT_STREAM
    ),
    shards: Annotated[int, typer.Option(help="Shards to write, one every --every-s seconds.", min=1)] = 10,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per shard.", min=1)] = 20_000,
    every_s: Annotated[float, typer.Option(help="Seconds between two shards.", min=0.0)] = 30.0,
    drift: Annotated[
        float, typer.Option(help="0 = stationary; 1 = preferences move fully from the first shard to the last.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Same seed, same stream.")] = 0,
    start: Annotated[int, typer.Option(help="First shard index to write (resume a stream).", min=0)] = 0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Play a stream of logged examples: write synthetic shards into a folder over time,
    each renamed into place when complete (a trainer never sees half a shard)."""
    from trainer.stream import StreamConfig, play_stream

    cfg = StreamConfig(
        out=out, shards=shards, rows_per_shard=rows_per_shard, every_s=every_s, drift=drift, seed=seed, start=start
    )
    play_stream(cfg, load_schema(schema), on_shard=lambda p: log.info("wrote %s", p))
