"""`gem student ...`: the reference vertical model and the knowledge it learns from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from gem.cli.common import console, friendly_errors, stdout
from model.schema import DEFAULT_SCHEMA_PATH
from students.config import REFERENCE_CONFIG
from students.variants import NAMES, SHARE_MODES

student_app = typer.Typer(
    help="A reference vertical model (student) trained on logged data and GEM's knowledge.", no_args_is_help=True
)


def metrics_table(title: str, rows: dict[str, dict]) -> Table:
    """Rows: name -> evaluate()'s output. AUC, log loss and NE per task (overall)."""
    tasks = list(next(iter(rows.values())))
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    for t in tasks:
        for m in ("AUC", "log loss", "NE"):
            table.add_column(f"{t} {m}", justify="right")
    for name, metrics in rows.items():
        cells = [name]
        for t in tasks:
            o = metrics[t]["overall"]
            cells += [f"{o['auc']:.4f}", f"{o['log_loss']:.4f}", f"{o['ne']:.4f}"]
        table.add_row(*cells)
    return table


@student_app.command("train")
@friendly_errors
def train_cmd(
    data: Annotated[
        Path, typer.Option(help="Logged Parquet (folder or glob), time-ordered shards; the last is the test slice.")
    ],
    out: Annotated[Path, typer.Option(help="Student checkpoint folder (student.pt, student.json).")] = Path(
        "artifacts/students/student"
    ),
    knowledge: Annotated[
        Path | None, typer.Option(help="`gem embed`'s --out folder over the same shards (joined by example_id).")
    ] = None,
    variant: Annotated[
        str, typer.Option(help=f"Knowledge used, comma-separated: {', '.join(NAMES)} (e.g. aux,repr).")
    ] = "hard",
    kd_weight: Annotated[
        float, typer.Option(help="Distillation weight w (kd: (1-w) hard + w KD; aux: hard + w KD).")
    ] = 0.5,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 1.0,
    share_checkpoint: Annotated[
        Path | None, typer.Option(help="FM checkpoint whose embedding tables `share` takes (by feature name).")
    ] = None,
    share_mode: Annotated[str, typer.Option(help=f"Shared tables: {' or '.join(SHARE_MODES)}.")] = "finetune",
    repository: Annotated[
        Path | None,
        typer.Option(help="Model repository the share checkpoint was published to (records its FM version)."),
    ] = None,
    config: Annotated[Path, typer.Option(help="Student config YAML (features, surfaces, sizes).")] = REFERENCE_CONFIG,
    epochs: Annotated[int, typer.Option(help="Passes over the training shards.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Rows per step.")] = 512,
    eval_shards: Annotated[int, typer.Option(help="Newest shards held out as the test slice.")] = 1,
    seed: Annotated[int, typer.Option(help="Same seed, same run.")] = 0,
    schema: Annotated[Path, typer.Option(help="The FM's feature schema YAML.")] = DEFAULT_SCHEMA_PATH,
) -> None:
    """Train the student on logged shards, learning from GEM's knowledge as the variant
    says; print AUC, log loss and NE per task on the test slice; write a checkpoint."""
    from students.train import StudentTrainConfig, train_student
    from students.variants import parse_variant

    v = parse_variant(variant, weight=kd_weight, temperature=temperature, share_mode=share_mode)
    cfg = StudentTrainConfig(
        data=data, out=out, knowledge=knowledge, variant=v, config_path=config, schema_path=schema,
        share_checkpoint=share_checkpoint, repository=repository, epochs=epochs, batch_size=batch_size,
        eval_shards=eval_shards, seed=seed,
    )  # fmt: skip
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )  # fmt: skip
    # A bar on a terminal; a line every tenth of the work otherwise (logs, CI).
    task: dict[str, Any] = {"done": 0, "next": 0}

    def on_start(total: int) -> None:
        task.update(total=total, next=total // 10)
        if console.is_terminal:
            task["id"] = progress.add_task(escape(f"training student [{v.name}]"), total=total, loss="-")

    def on_step(n: int, loss: float) -> None:
        task["done"] += n
        if console.is_terminal:
            progress.update(task["id"], advance=n, loss=f"{loss:.4f}")
        elif task["done"] >= task["next"]:
            task["next"] += max(1, task["total"] // 10)
            pct = 100 * task["done"] / task["total"]
            console.print(
                f"training student [{v.name}]: {task['done']:,}/{task['total']:,} examples ({pct:.0f}%), "
                f"loss {loss:.4f}",
                markup=False,
                highlight=False,
            )

    with progress:
        result = train_student(cfg, on_step=on_step, on_start=on_start)
    title = escape(f"student [{v.name}] on {', '.join(result.metrics['test_shards'])}")
    stdout().print(metrics_table(title, {v.name: result.metrics["test"]}))
    rate = result.examples_per_s
    console.print(f"checkpoint written to {result.checkpoint} ({rate:,.0f} examples/s)", highlight=False)
