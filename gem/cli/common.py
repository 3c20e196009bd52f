"""What every command group shares: the console, default paths, option types, the
error policy and progress display.

Kept light: `gem health` is the compose healthcheck (every 15 s), so nothing here
imports torch, Ray or Triton; commands import what they need when they run.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from model.config import PRESETS
from serving.local.state import DEFAULT_WORK_DIR

if TYPE_CHECKING:
    from serving.backends.base import BackendKind


def stdout() -> Console:
    """Tables go to stdout: a terminal's width there, else (a log file, compose, CI)
    wide enough that no figure is cut to an ellipsis."""
    out = Console()
    return out if out.is_terminal else Console(width=200)


console = Console(stderr=True)
log = logging.getLogger("gem")

ARTIFACTS = Path("artifacts")
DEFAULT_DATA = ARTIFACTS / "data" / "synth"
DEFAULT_CHECKPOINT = ARTIFACTS / "checkpoints" / "gem-small"
DEFAULT_REPO = Path("model_repo")
TRITON_WORK_DIR = DEFAULT_WORK_DIR
DEFAULT_STREAM = ARTIFACTS / "stream"
DEFAULT_TRAINER_STATE = ARTIFACTS / "trainer"

SchemaOption = Annotated[Path, typer.Option("--schema", help="Feature schema YAML.", dir_okay=False)]
TritonUrlOption = Annotated[str, typer.Option(help="Triton's gRPC address (triton backend).")]
RepoOption = Annotated[Path, typer.Option("--repo", help="Triton model repository to publish into.", file_okay=False)]
PresetOption = Annotated[str, typer.Option(help=f"Model size: {', '.join(PRESETS)}.")]
MetricsPortOption = Annotated[
    int, typer.Option(help="Prometheus port of the front end (its metrics and Ray Serve's, at /metrics).")
]

Choice = TypeVar("Choice", bound=str)


def one_of(value: str, choices: tuple[Choice, ...], option: str) -> Choice:
    """An option's value, checked (a typo is a usage error, not a traceback)."""
    for choice in choices:
        if value == choice:
            return choice
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)


def backend_of(value: str) -> BackendKind:
    """`--backend`: triton or onnxruntime."""
    from serving.backends.base import BACKENDS

    return one_of(value, BACKENDS, "--backend")


# Errors the user can fix, by module. An exception can only be raised once its module
# is loaded, so the check looks only at loaded modules and never imports one (some
# import torch, which a healthcheck must not pay for).
_USER_ERRORS = {
    "model.schema": "SchemaError",
    "model.data.reader": "DataError",
    "model.checkpoint": "CheckpointError",
    "export.onnx_export": "ExportError",
    "export.repository": "RepositoryError",
    "export.tensorrt": "TensorRTUnavailable",
    "serving.local.triton": "TritonError",
    "serving.backends.errors": "BackendError",
}


def user_errors() -> tuple[type[BaseException], ...]:
    loaded = (getattr(sys.modules[m], name) for m, name in _USER_ERRORS.items() if m in sys.modules)
    return (*loaded, ValueError, OSError, TimeoutError)


F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Errors the user can fix become one red line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, user_errors()):
                raise
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    """Items per second of a task since it started, e.g. `12,345 rows/s` (an average:
    work that arrives in bursts makes rich's windowed speed jump)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        # A task may carry its own figure (`rate`, e.g. training time only).
        speed = task.fields.get("rate") or (task.completed / task.elapsed if task.elapsed else None)
        return Text(f"{speed:>9,.0f} {self.unit}/s" if speed else "", style="cyan")


def progress(unit: str) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


class BarProgress:
    """`model.progress.Progress` drawn on a rich progress bar: one bar per started unit,
    notes as log lines."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task: TaskID | None = None

    def start(self, task: str, total: int | None = None) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total or 0)
        self.task = self.bar.add_task(task, total=total)

    def advance(self, n: int, **figures: float) -> None:
        if self.task is None:
            self.start("working")
        assert self.task is not None
        # Figures become the task's fields (`rate`: RateColumn's figure).
        fields: dict[str, Any] = dict(figures)
        self.bar.update(self.task, advance=n, **fields)

    def note(self, message: str) -> None:
        log.info("%s", message)


def wait_for_ctrl_c() -> None:
    """Blocks until SIGINT or SIGTERM. Installed after Ray started, which sets handlers
    of its own; a timed wait lets Python run the handler promptly."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
