"""The `gem` application: the command groups and top-level commands, registered from
the modules that hold them (one module per group)."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer
from rich.logging import RichHandler

from gem.cli import data, embed, export, serve, student, train, trainer
from gem.cli.common import console
from serving.local.logs import LOG_FORMAT_ENV, LOG_FORMATS, JSONFormatter

app = typer.Typer(
    help="GEM knowledge serving: data, training, export and serving of an ads foundation model.", no_args_is_help=True
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    log_format: Annotated[
        str,
        typer.Option(
            envvar=LOG_FORMAT_ENV,
            help="text (for a terminal) or json (one object per line, for a log pipeline; Ray Serve's logs too, "
            "with each call's request_id).",
        ),
    ] = "text",
) -> None:
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"one of {', '.join(LOG_FORMATS)}, got {log_format!r}", param_hint="--log-format")
    # The processes this command starts (Ray's workers among them) log the same way.
    os.environ[LOG_FORMAT_ENV] = log_format
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JSONFormatter())
    else:
        handler = RichHandler(console=console, show_path=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])


app.add_typer(data.data_app, name="data")
app.add_typer(data.schema_app, name="schema")
app.command("train")(train.train_cmd)
app.command("export")(export.export_cmd)
app.command("tensorrt-script")(export.tensorrt_script)
app.add_typer(export.triton_app, name="triton")
app.command("bootstrap")(serve.bootstrap_cmd)
app.command("up")(serve.up)
app.command("serve")(serve.serve_cmd)
app.command("query")(serve.query)
app.command("health")(serve.health)
app.command("embed")(embed.embed_cmd)
app.add_typer(trainer.trainer_app, name="trainer")
app.add_typer(student.student_app, name="student")
