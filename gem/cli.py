"""`gem`: the command line of GEM knowledge serving.

Each command is a thin layer over a library function; errors the user can fix (a bad
schema, bad data, a corrupt checkpoint) are printed as one line, without a traceback,
and exit with status 2.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from model.checkpoint import CheckpointError, load_checkpoint
from model.config import PRESETS
from model.data.reader import DataError
from model.schema import DEFAULT_SCHEMA_PATH, SchemaError, load_schema

console = Console(stderr=True)
log = logging.getLogger("gem")

ARTIFACTS = Path("artifacts")
DEFAULT_DATA = ARTIFACTS / "data" / "synth"
DEFAULT_CHECKPOINT = ARTIFACTS / "checkpoints" / "gem-small"

app = typer.Typer(
    help="GEM knowledge serving: data, training, export and serving of an ads foundation model.", no_args_is_help=True
)
data_app = typer.Typer(help="Synthetic logged examples.", no_args_is_help=True)
schema_app = typer.Typer(help="The feature schema.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(schema_app, name="schema")

F = TypeVar("F", bound=Callable[..., Any])
USER_ERRORS = (SchemaError, DataError, CheckpointError, ValueError, FileNotFoundError)


def friendly_errors(fn: F) -> F:
    """Errors the user can fix become one red line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


SchemaOption = Annotated[Path, typer.Option("--schema", help="Feature schema YAML.", dir_okay=False)]


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
    with _progress("rows") as progress:
        task = progress.add_task("synthesizing rows", total=rows)
        paths = write_shards(cfg, load_schema(schema), out, on_rows=lambda n: progress.advance(task, n))
    log.info("wrote %d rows in %d shard(s) to %s", rows, len(paths), out)


class RateColumn(ProgressColumn):
    """Items per second of a task, e.g. `12,345 rows/s`."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:>9,.0f} {self.unit}/s" if speed else "", style="cyan")


def _progress(unit: str) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def metric_table(metrics: dict) -> Table:
    """GEM, its adapted labels and the baselines, per task: AUC and NE on the held-out slice."""
    models = [m for m in ("gem", "gem_adapted", "gem_mean_pool", "pooled_mlp", "logistic") if m in metrics]
    tasks = list(metrics["gem"].keys() - {"train_examples_per_s"})
    tasks.sort(key=lambda t: list(metrics["gem"]).index(t))
    table = Table(title=f"held-out slice {', '.join(metrics['eval_shards'])}")
    table.add_column("model", no_wrap=True)
    for t in tasks:
        table.add_column(f"{t} AUC", justify="right")
        table.add_column(f"{t} NE", justify="right")
    table.add_column("train ex/s", justify="right")
    for m in models:
        row = [m]
        for t in tasks:
            overall = metrics[m][t]["overall"]
            row += [f"{overall['auc']:.4f}", f"{overall['ne']:.4f}"]
        rate = metrics[m].get("train_examples_per_s")
        row.append(f"{rate:,.0f}" if rate else "")
        table.add_row(*row)
    return table


def run_training(
    data: Path, out: Path, preset: str, epochs: int, batch_size: int, baselines: bool, seed: int, schema: Path
) -> dict:
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(
        data=data,
        out=out,
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        baselines=baselines,
        seed=seed,
        schema_path=schema,
    )
    with _progress("examples") as progress:
        current: dict[str, Any] = {}

        def on_model(name: str, total: int) -> None:
            current["task"] = progress.add_task(f"training {name}", total=total)

        result = train(cfg, on_step=lambda n, _loss: progress.advance(current["task"], n), on_model=on_model)
    log.info("checkpoint written to %s (GEM trained at %.0f examples/s)", result.checkpoint, result.examples_per_s)
    return result.metrics


PresetOption = Annotated[str, typer.Option(help=f"Model size: {', '.join(PRESETS)}.")]


@app.command("train")
@friendly_errors
def train_cmd(
    data: Annotated[Path, typer.Option(help="Parquet file, folder or glob; shards in time order.")] = DEFAULT_DATA,
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write (replaced atomically).")] = DEFAULT_CHECKPOINT,
    preset: PresetOption = "small",
    epochs: Annotated[int, typer.Option(help="Passes over the training shards.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 512,
    baselines: Annotated[
        bool, typer.Option(help="Also train logistic regression, a pooled MLP and GEM with mean-pooled sequences.")
    ] = False,
    seed: Annotated[int, typer.Option()] = 0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Train GEM on logged examples; the last shard is the held-out evaluation slice."""
    metrics = run_training(data, out, preset, epochs, batch_size, baselines, seed, schema)
    Console().print(metric_table(metrics))


@app.command("up")
@friendly_errors
def up(
    checkpoint: Annotated[
        Path, typer.Option(help="Checkpoint to serve; trained on synthetic data if missing.")
    ] = DEFAULT_CHECKPOINT,
    data: Annotated[Path, typer.Option(help="Synthetic data folder used when a model must be trained.")] = DEFAULT_DATA,
) -> None:
    """Bring up the local stack. For now: make sure a trained `small` model exists and show its metrics."""
    if not (checkpoint / "manifest.json").exists():
        log.info("no checkpoint at %s: training the small model on synthetic data first", checkpoint)
        if not any(data.glob("*.parquet")):
            data_synth(out=data)
        run_training(data, checkpoint, "small", 1, 512, True, 0, DEFAULT_SCHEMA_PATH)
    ckpt = load_checkpoint(checkpoint)
    Console().print(metric_table(ckpt.metrics))
    log.info("model ready at %s", checkpoint)
