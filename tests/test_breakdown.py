"""bench.breakdown's CPU accounting: every thread's CPU read from /proc
(loadtests.sampling.thread_cpu), and a cell's CPU per call grouped by who took it."""

from __future__ import annotations

import os
import threading
import time

import pytest

import bench.breakdown
from bench.breakdown import CPU_GROUPS, CpuMeter
from loadtests.sampling import thread_cpu


def test_a_busy_thread_shows_its_cpu_time_under_its_own_id():
    started, done, tid = threading.Event(), threading.Event(), []

    def burn() -> None:
        tid.append(threading.get_native_id())
        started.set()
        while time.thread_time() < 0.3:  # this thread's own CPU clock, not the wall's
            pass
        done.wait()

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        assert started.wait(30)
        deadline = time.monotonic() + 30
        while thread_cpu().get((os.getpid(), tid[0]), (0, 0.0))[1] < 0.25:
            assert time.monotonic() < deadline, "the thread's CPU time never reached /proc"
            time.sleep(0.05)
        nice, seconds = thread_cpu()[os.getpid(), tid[0]]
        assert nice == os.getpriority(os.PRIO_PROCESS, tid[0])
        assert 0.25 <= seconds < 60
    finally:
        done.set()
        worker.join()


NAMES = {
    101: "ray::ServeReplica:embedded:KnowledgeIngress",
    202: "ray::ServeReplica:triton:KnowledgeIngress",
    303: "tritonserver",
    404: "ray::ServeController",
}


@pytest.fixture
def meter(monkeypatch) -> CpuMeter:
    """A cell's before and after: the bench's own thread, the embedded replica's loop (nice
    0) and inference threads (nice 10, one of them started inside the cell), the Triton
    application's replica, Triton and Ray's controller."""
    me = os.getpid()
    monkeypatch.setattr(bench.breakdown, "display_name", lambda pid: NAMES.get(pid, "python"))
    m = CpuMeter()
    m.before = {(me, me): (0, 1.0), (101, 101): (0, 5.0), (101, 102): (10, 7.0), (202, 202): (0, 1.0),
                (303, 303): (0, 2.0), (404, 404): (0, 3.0)}  # fmt: skip
    m.after = {(me, me): (0, 1.2), (101, 101): (0, 5.1), (101, 102): (10, 7.4), (101, 103): (10, 0.2),
               (202, 202): (0, 1.05), (303, 303): (0, 2.3), (404, 404): (0, 3.01)}  # fmt: skip
    return m


def test_cpu_per_call_by_who_took_it(meter):
    got = meter.per_call(calls=10, app="embedded")
    assert list(got) == list(CPU_GROUPS)
    # ms per call: 0.2 s of the bench's, 0.1 s of the loop's, 0.4 + 0.2 s of inference
    # (the thread started inside the cell counts whole), 0.3 s of Triton's; the other
    # application's replica and Ray's controller are "other" (0.05 + 0.01 s).
    assert got == pytest.approx({"bench process": 20, "replica loops": 10, "replica inference": 60,
                                 "triton": 30, "other": 6})  # fmt: skip


def test_the_serving_replica_is_the_named_applications_and_none_in_process(meter):
    triton_app = meter.per_call(calls=10, app="triton")
    assert triton_app["replica loops"] == pytest.approx(5)  # its own replica only
    assert triton_app["replica inference"] == 0
    assert triton_app["other"] == pytest.approx(10 + 60 + 1)
    in_process = meter.per_call(calls=10, app=None)
    assert in_process["replica loops"] == in_process["replica inference"] == 0
    assert in_process["other"] == pytest.approx(10 + 60 + 5 + 1)
