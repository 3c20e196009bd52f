"""How long work says where it stands: one protocol for training, the first start of a
stack (`trainer/bootstrap.py`), export, data synthesis and the batch job.

The work calls `start` when a unit begins (a model, a stage, a set of files), `advance`
as items of it finish, and `note` for a line worth keeping. The CLI turns the calls into
progress bars (`gem.cli.common.BarProgress`); callers that want nothing pass `SILENT`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, task: str, total: int | None = None) -> None:
        """A unit of work begins; `total`: its size in items (rows, examples), when known."""
        ...

    def advance(self, n: int, **figures: float) -> None:
        """`n` more items of the current unit are done; `figures`: running numbers (loss)."""
        ...

    def note(self, message: str) -> None:
        """A line worth keeping: a stage reached, a file written."""
        ...


class Silent:
    """Progress that goes nowhere."""

    def start(self, task: str, total: int | None = None) -> None:
        return None

    def advance(self, n: int, **figures: float) -> None:
        return None

    def note(self, message: str) -> None:
        return None


SILENT: Progress = Silent()
