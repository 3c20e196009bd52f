"""Inference below the replica's event loop in the CPU's run queue.

The launcher starts the replica at nice 0, not Ray's 15 (serving/local/launcher.py): a
replica that answers rankers must not yield its event loop, where admission and refusals
run, to whatever else shares the cores. Its inference is another matter: ONNX Runtime's
threads (the one that calls `run` and its intra-op pool) take every core they get, and at
nice 0 they would compete as equals with the loop and with everything else on the
machine (a side trainer, a load generator). A higher nice value for those threads alone
keeps the loop first whenever it has work, while inference still takes every idle cycle.

Linux keeps the nice value per thread and a new thread inherits its creator's, so a pool
whose threads lower their own priority, with the sessions created on that pool, keeps all
of ONNX Runtime's threads below the loop. Raising one's nice needs no privilege; lowering
it back would need CAP_SYS_NICE, hence a pool of its own rather than the loop's default
executor. (The GIL is not the CPU's queue: Python steps of inference still take turns
with the loop, whatever their priority; loadtests/README.md, "At 2x capacity".)
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

MAX_NICE = 19


def lower_this_thread(nice: int) -> None:
    """Add `nice` to the calling thread's nice value (capped at 19; 0: unchanged)."""
    if nice <= 0:
        return
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, MAX_NICE))


def inference_pool(nice: int, name: str = "gem-infer") -> ThreadPoolExecutor:
    """A thread pool whose threads run `nice` steps below the thread that made it; what
    they create (an ONNX Runtime session's intra-op threads) inherits that."""
    if nice < 0:
        raise ValueError(f"inference nice must be 0 (off) or more, got {nice}: raising priority needs privileges")
    return ThreadPoolExecutor(thread_name_prefix=name, initializer=lower_this_thread, initargs=(nice,))
