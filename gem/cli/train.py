"""`gem train`: GEM (and baselines) on logged examples, one metric table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gem.cli.common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    PresetOption,
    SchemaOption,
    friendly_errors,
    log,
    progress,
)
from model.schema import DEFAULT_SCHEMA_PATH


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
    with progress("examples") as bar:
        current: dict[str, Any] = {}

        def on_model(name: str, total: int) -> None:
            current["task"] = bar.add_task(f"training {name}", total=total)

        result = train(cfg, on_step=lambda n, _loss: bar.advance(current["task"], n), on_model=on_model)
    log.info("checkpoint written to %s (GEM trained at %.0f examples/s)", result.checkpoint, result.examples_per_s)
    return result.metrics


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
