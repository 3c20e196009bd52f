"""The local Triton's state file (`<work_dir>/server.json`, mode 600): its config, pid,
the `gem up` that supervises it, and its admin key. `gem triton down`, `gem triton
status` and the CLI's model control find the server through it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Where `gem triton up` and `gem up` keep the local Triton's scratch and state.
DEFAULT_WORK_DIR = Path("artifacts") / "triton"


def state_file(work_dir: Path) -> Path:
    return work_dir / "server.json"


def write_state(work_dir: Path, state: dict[str, Any]) -> None:
    """Written afresh, readable by this user only (it holds the admin key)."""
    path = state_file(work_dir)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state, default=str, indent=2))


class StateError(ValueError):
    """A state file that exists but cannot be read back (corrupt, truncated, not ours)."""


def read_state(work_dir: Path) -> dict[str, Any] | None:
    """The recorded state, or None when no server is recorded. A file that is there but
    unreadable is a `StateError`: saying "no server" would leave a running one behind."""
    path = state_file(work_dir)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(
            f"the Triton state file {path} cannot be read ({type(e).__name__}); if no Triton runs from "
            f"{work_dir}, remove it"
        ) from None
    if not isinstance(state, dict) or "pid" not in state:
        raise StateError(f"the Triton state file {path} is not one `gem triton up` or `gem up` wrote; remove it")
    return state


def remove_state(work_dir: Path) -> None:
    state_file(work_dir).unlink(missing_ok=True)
