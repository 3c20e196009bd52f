"""The embedded backend's inference runs below the thread that made it: its worker
threads and ONNX Runtime's intra-op threads all carry the raised nice value, the caller's
own thread keeps its own, and inference still answers."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from model.examples import random_batch
from model.outputs import LOGITS
from serving.backends.onnx import OnnxBackend
from serving.backends.priority import MAX_NICE, inference_pool, lower_this_thread
from serving.config import FrontendConfig

NICE = 5


def nice_of_threads(pid: int | str = "self") -> dict[int, int]:
    """tid -> nice value of every thread of a process (/proc/PID/task/*/stat, field 19)."""
    nice = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        nice[int(task.name)] = int(fields[16])
    return nice


def test_inference_threads_run_below_the_caller(published_repo, schema):
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = set(nice_of_threads())
    backend = OnnxBackend(published_repo, nice=NICE)
    batch = random_batch(schema, 32, 8, seed=3)
    knowledge = asyncio.run(backend.infer(batch, [LOGITS]))
    assert np.isfinite(knowledge.outputs[LOGITS]).all()
    new = {tid: n for tid, n in nice_of_threads().items() if tid not in before}
    # The pool's worker and the sessions' intra-op threads (at least one each).
    assert len(new) >= 2, new
    assert set(new.values()) == {min(base + NICE, MAX_NICE)}, new
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    asyncio.run(backend.close())


def test_a_level_pool_leaves_priorities_alone():
    with inference_pool(0) as pool:
        tid, nice = pool.submit(lambda: (threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0))).result()
    assert tid != threading.get_native_id()
    assert nice == os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_lowering_stops_at_the_lowest_priority():
    def lowered_twice() -> int:
        lower_this_thread(MAX_NICE)
        lower_this_thread(MAX_NICE)
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    with inference_pool(0) as pool:
        assert pool.submit(lowered_twice).result() == MAX_NICE


@pytest.mark.parametrize("nice", [-1, MAX_NICE + 1])
def test_a_nice_out_of_range_is_refused_with_its_bounds(nice):
    with pytest.raises(ValueError, match="inference_nice must be 0"):
        FrontendConfig(inference_nice=nice)
    if nice < 0:
        with pytest.raises(ValueError, match="raising priority needs privileges"):
            inference_pool(nice)
