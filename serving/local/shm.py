"""Shared-memory regions of the python backend that a killed Triton leaves behind in
/dev/shm (tens of MB each): found and removed when no live process maps them."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


def _mapped_shm() -> set[str]:
    """Names in /dev/shm that some live process maps or holds open."""
    names: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("/dev/shm/"):
                        names.add(target[len("/dev/shm/") :].split(" ")[0])
    return names


def clean_shared_memory(pid: int | None = None) -> list[str]:
    """Removes the python backend's shared-memory regions that no live process uses any
    more (a killed Triton leaves them behind: tens of MB each). Regions of other running
    servers are mapped by them, so they stay."""
    if not SHM_DIR.is_dir():
        return []
    stale = [p for p in SHM_DIR.glob(f"{SHM_PREFIX}*") if p.is_file()]
    if not stale:
        return []
    used = _mapped_shm()
    removed = []
    for p in stale:
        if p.name not in used:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p.name)
    if removed:
        log.info("removed %d stale shared-memory region(s) of Triton%s", len(removed), f" {pid}" if pid else "")
    return removed
