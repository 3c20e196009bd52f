"""`gem up` as a test's subprocess: started with a Ray temp dir of its own, ready once it
prints its address, stopped by Ctrl-C (SIGKILL if that hangs), also on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.trainer_support import start_gem, wait_for

READY = "serving gRPC at"


@contextlib.contextmanager
def gem_up(*args: str, cwd: Path, log: Path, timeout_s: float = 300) -> Iterator[Path]:
    """Runs `gem <args>` (an `up` command line) until the block ends; yields the Ray temp
    dir, where Ray Serve writes its logs (ray/session_*/logs/serve/). The dir is short and
    in /tmp: Ray's socket paths must stay under the OS limit."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="gu", dir="/tmp"))
    up = start_gem(*args, cwd=cwd, env={"RAY_TMPDIR": str(ray_tmp)}, log=log)
    try:
        wait_for(lambda: READY in log.read_text(), timeout_s, f"`gem {' '.join(args[:2])}` to serve", up, log)
        yield ray_tmp
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
