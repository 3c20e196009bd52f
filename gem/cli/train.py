"""`gem train`: GEM (and baselines) on logged examples, one metric table."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from gem.cli.common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    BarProgress,
    PresetOption,
    SchemaOption,
    console,
    friendly_errors,
    log,
    progress,
    stdout,
)
from model.schema import DEFAULT_SCHEMA_PATH

if TYPE_CHECKING:
    from trainer.train import TrainConfig


def metric_table(metrics: dict) -> Table:
    """GEM, its adapted labels and the baselines, per task: AUC and NE on the test slice
    at the epoch each model kept (best validation NE), and its training speed."""
    names = ("gem", "gem_adapted", "gem_per_example", "gem_shared_user", "gem_mean_pool", "pooled_mlp", "logistic")
    models = [m for m in names if m in metrics]
    tasks = [t for t, v in metrics["gem"].items() if isinstance(v, dict) and "overall" in v]
    test = metrics.get("test_shards") or metrics.get("eval_shards", [])
    val = metrics.get("val_shards")
    title = f"test slice {', '.join(test)}" + (f" (epoch chosen on validation slice {', '.join(val)})" if val else "")
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    for t in tasks:
        table.add_column(f"{t} AUC", justify="right")
        table.add_column(f"{t} NE", justify="right")
    table.add_column("epoch", justify="right")
    table.add_column("train ex/s", justify="right")
    table.add_column("train s", justify="right")
    for m in models:
        row = [f"gem ({metrics['gem_arch']})" if m == "gem" and "gem_arch" in metrics else m]
        for t in tasks:
            overall = metrics[m][t]["overall"]
            row += [f"{overall['auc']:.4f}", f"{overall['ne']:.4f}"]
        best, run = metrics[m].get("best_epoch"), metrics[m].get("epochs_run")
        row.append(f"{best}/{run}" if best else "")
        rate = metrics[m].get("train_examples_per_s")
        row.append(f"{rate:,.0f}" if rate else "")
        seconds = metrics[m].get("train_seconds")
        row.append(f"{seconds:,.0f}" if seconds else "")
        table.add_row(*row)
    return table


def run_training(cfg: TrainConfig, progress_every: float = 10.0) -> dict:
    """Trains per `cfg` with progress on the console:
    a bar on terminals, plain lines every `progress_every` seconds elsewhere."""
    from trainer.train import ProgressLog, train

    if not console.is_terminal:
        # A log file, compose, CI: plain lines every `progress_every` seconds, no bar.
        line = functools.partial(console.print, highlight=False, soft_wrap=True)
        result = train(cfg, ProgressLog(line, progress_every))
    else:
        with progress("examples") as bar:
            result = train(cfg, BarProgress(bar))
    log.info("checkpoint written to %s (GEM trained at %.0f examples/s)", result.checkpoint, result.examples_per_s)
    return result.metrics


@friendly_errors
def train_cmd(
    data: Annotated[
        str, typer.Option(help="Parquet file, folder or glob, local or s3://; shards in time order.")
    ] = str(DEFAULT_DATA),
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write (replaced atomically).")] = DEFAULT_CHECKPOINT,
    preset: PresetOption = "small",
    epochs: Annotated[
        int, typer.Option(help="The most passes over the training shards (early stopping usually ends sooner).")
    ] = 8,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation NE.")] = 1,
    batch_size: Annotated[
        int | None, typer.Option(help="Examples per step (default: the preset's, 128 for tiny, else 512).")
    ] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also train logistic regression, a pooled MLP and GEM with mean-pooled sequences.")
    ] = False,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Sequence arch: shared_user (the user side once per user, candidates by target "
            "attention), interformer (per example) or mean_pool (default: the preset's).",
            show_default=False,
        ),
    ] = None,
    esmm: Annotated[
        bool | None,
        typer.Option(
            "--esmm/--independent-tasks",
            help="Tasks with `after:` as P(parent) x P(task | parent) (ESMM), or independent heads "
            "(default: the preset's, ESMM).",
            show_default=False,
        ),
    ] = None,
    progress_every: Annotated[
        float, typer.Option(help="Seconds between progress lines when stderr is not a terminal.")
    ] = 10.0,
    seed: Annotated[int, typer.Option()] = 0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Train GEM on logged examples. The last shard is the test slice (reported), the one
    before it the validation slice (early stopping, the epoch kept), the rest train."""
    from model.config import SEQUENCE_ARCHS
    from trainer.train import TrainConfig

    if arch is not None and arch not in SEQUENCE_ARCHS:
        raise typer.BadParameter(f"{arch!r}; choose one of {', '.join(SEQUENCE_ARCHS)}", param_hint="--arch")
    cfg = TrainConfig(
        data=data,
        out=out,
        preset=preset,
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        baselines=baselines,
        seed=seed,
        schema_path=schema,
        esmm=esmm,
        sequence_arch=arch,
    )
    metrics = run_training(cfg, progress_every)
    stdout().print(metric_table(metrics))
