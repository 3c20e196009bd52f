"""The soak (loadtests/soak.py): its fault schedule and bound checks (pure), and the
3-minute soak against the real stack with the side trainer, asserting its verdict."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from loadtests import bounds, chaos
from loadtests.faults import KINDS, MIN_GAP_S, schedule, warm_up_s
from loadtests.sampling import display_name, parent_of, parse_status, sample_process, shm_names

ROOT = Path(__file__).resolve().parents[1]


def test_schedule_spreads_every_fault_between_warm_up_and_tail():
    faults = schedule(180)
    assert [f.kind for f in faults] == list(KINDS)
    assert faults[0].at_s == warm_up_s(180) == 18
    assert faults[-1].at_s == pytest.approx(162)
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(faults)]
    assert min(gaps) >= MIN_GAP_S and max(gaps) - min(gaps) < 0.2
    assert [f.kind for f in faults].count("kill_triton") == 2


def test_schedule_scales_with_the_run():
    assert [f.at_s for f in schedule(1200)] == pytest.approx([4 * f.at_s for f in schedule(300)], abs=0.5)


def test_schedule_refuses_a_run_too_short_for_its_faults():
    with pytest.raises(ValueError, match="too short"):
        schedule(60)


def test_proc_parsers():
    status = "Name:\tpython\nVmRSS:\t  2048 kB\nThreads:\t7\n"
    assert parse_status(status) == (2048 * 1024, 7)
    maps = ("7f00-7f01 rw-s 00000000 00:1a 12 /dev/shm/triton_python_backend_shm_region_1\n"
            "7f02-7f03 r-xp 00000000 08:01 99 /usr/lib/libc.so.6\n")  # fmt: skip
    assert shm_names(maps) == {"triton_python_backend_shm_region_1"}
    assert parent_of("4242 (tritonserver ) x) S 4100 4242 4242 0 -1") == 4100  # a name with ") "
    me = sample_process(os.getpid())
    assert me is not None and me[0].ppid == os.getppid()


DOWN = [bounds.Window("triton", 100.0, 110.0)]


def _failure(start, end, code="DEADLINE_EXCEEDED"):
    return {"start": start, "end": end, "code": code}


def test_failed_calls_excuse_only_deadlines_that_passed_while_triton_was_down():
    failures = [_failure(95, 105), _failure(108, 138), _failure(101, 102, "UNAVAILABLE"), _failure(120, 121),
                _failure(101, 102, "INVALID_ARGUMENT")]  # fmt: skip
    failed, excused = bounds.failed_calls(failures, DOWN, rate=2.0, deadline_s=30)
    assert not failed.ok and failed.measured.startswith("2 ")  # the one after, and the bad call
    assert "DEADLINE_EXCEEDED" in failed.measured and "INVALID_ARGUMENT" in failed.measured
    assert excused.ok and excused.measured.startswith("3 ")
    ok, _ = bounds.failed_calls([], DOWN, 2.0, 30)
    assert ok.ok and ok.measured == "0"


def test_excused_calls_are_bounded_by_the_down_time():
    many = [_failure(100, 101)] * 100
    _, excused = bounds.failed_calls(many, DOWN, rate=2.0, deadline_s=30)  # at most 2 * (10 + 30)
    assert not excused.ok


def _seen(calls, first, last):
    return {"calls": calls, "first": first, "last": last}


def test_versions_served():
    published = {"fm": {1, 2, 3}, "adapter": {1, 2}}
    rolled_back = {"fm": ({3}, 200.0)}
    fine = {"1:1": _seen(10, 0, 150), "3:2": _seen(5, 100, 199), "2:2": _seen(7, 150, 300)}
    assert all(v.ok for v in bounds.versions_served(fine, published, rolled_back))
    never, stale = bounds.versions_served({**fine, "4:2": _seen(3, 0, 10), "3:1": _seen(2, 150, 201)},
                                          published, rolled_back)  # fmt: skip
    assert (never.ok, never.measured) == (False, "3")
    assert (stale.ok, stale.measured) == (False, "2")


def _sample(t, rss=(100,), fds=10, threads=5, shm=0, pids=None):
    pids = pids or range(1, len(rss) + 1)
    procs = [{"pid": p, "name": f"p{p}", "rss_bytes": r, "fds": fds, "threads": threads}
             for p, r in zip(pids, rss, strict=True)]  # fmt: skip
    return {"t": t, "processes": procs, "shm_bytes": shm}


def test_rss_growth_counts_after_the_warm_up_only():
    warm = [_sample(t, rss=(50 + t,)) for t in range(0, 10)]  # grows during the warm-up
    steady = [_sample(t, rss=(100,)) for t in range(10, 40)]
    assert bounds.rss_growth(warm + steady, 10)[0].ok
    leaking = [_sample(t, rss=(100 + t,)) for t in range(10, 40)]
    verdict = bounds.rss_growth(warm + leaking, 10)[0]
    assert not verdict.ok and "p1 (pid 1)" in verdict.measured


def test_rss_growth_judges_the_side_trainer_apart():
    def sample(t, trainer_rss):
        procs = [
            {"pid": 1, "name": "ray::ServeReplica", "rss_bytes": 100, "fds": 1, "threads": 1},
            {"pid": 2, "name": "python3.11 gem trainer", "rss_bytes": trainer_rss, "fds": 1, "threads": 1},
        ]
        return {"t": t, "processes": procs, "shm_bytes": 0}

    stack, trainer = bounds.rss_growth([sample(t, 100 + t) for t in range(40)], 0)
    assert stack.ok and "of 1 processes" in stack.measured and "serving stack" in stack.bound
    assert not trainer.ok and "gem trainer (pid 2)" in trainer.measured and "side trainer" in trainer.bound


def test_rss_growth_skips_a_process_started_late():
    early = [_sample(t, rss=(100,)) for t in range(0, 30)]
    restarted = [_sample(t, rss=(100, 10 + t), pids=[1, 2]) for t in range(30, 40)]  # warming up
    verdict = bounds.rss_growth(early + restarted, 0)[0]
    assert verdict.ok and "of 1 processes" in verdict.measured


def test_the_resource_bounds_count_from_the_first_fm_publish():
    started = 1000.0
    adapter_only = {"gem_fm": None, "student_adapter": 2, "error": None, "ts": started + 10}
    failed_fm = {"gem_fm": 2, "student_adapter": 3, "error": "Triton refused it", "ts": started + 40}
    fm = {"gem_fm": 2, "student_adapter": 3, "error": None, "ts": started + 60}
    assert bounds.steady_from(18, [adapter_only, failed_fm, fm], started) == 60
    assert bounds.steady_from(18, [adapter_only], started) == 18  # no FM publish: the warm-up's end
    assert bounds.steady_from(90, [fm], started) == 90


def test_rss_growth_skips_a_process_gone_before_the_end():
    killed = [_sample(t, rss=(100, 100 + t), pids=[1, 2]) for t in range(0, 30)]
    after = [_sample(t, rss=(100,)) for t in range(30, 40)]
    verdict = bounds.rss_growth(killed + after, 0)[0]
    assert verdict.ok and "of 1 processes" in verdict.measured


def test_flat_fds_threads_and_shm():
    steady = [_sample(t, fds=100, threads=50, shm=1 << 20) for t in range(20)]
    assert all(v.ok for v in bounds.flat(steady, 0))
    growing = [_sample(t, fds=100 + 10 * t, threads=50, shm=(1 << 20) * (1 + t)) for t in range(20)]
    fds, threads, shm = bounds.flat(growing, 0)
    assert (fds.ok, threads.ok, shm.ok) == (False, True, False)
    assert not bounds.flat(steady[:3], 0)[0].ok  # too few samples is not a pass


def test_triton_exits_counts_restarts_nobody_scheduled():
    def triton(t, pid):
        return {"t": t, "processes": [{"pid": pid, "name": "tritonserver", "rss_bytes": 1, "fds": 1, "threads": 1}],
                "shm_bytes": 0}  # fmt: skip

    samples = [triton(0, 10), triton(5, 11), triton(10, 12)]
    assert bounds.triton_exits(samples, killed=2)[0].ok
    verdict = bounds.triton_exits(samples, killed=1)[0]
    assert not verdict.ok and verdict.measured.startswith("1 ")
    # Caught between fork and exec while loading a version: Triton's name, Triton's child.
    forking = triton(7, 11)
    forking["processes"].append({**forking["processes"][0], "pid": 99, "ppid": 11})
    assert bounds.triton_exits([*samples[:2], forking, samples[2]], killed=2)[0].ok


def test_a_kill_picks_the_process_not_its_fork_before_exec():
    """A fork that has not exec'd yet carries its parent's name; the fault kills the parent."""
    forks = "import os, time; child = os.fork(); child and print(child, flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", forks], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())  # the parent prints it once the fork exists
        name = display_name(proc.pid)
        assert display_name(child) == name
        assert chaos._processes(SimpleNamespace(roots=(proc.pid,)), name) == [proc.pid]
    finally:
        for pid in (proc.pid, child):
            with contextlib.suppress(ProcessLookupError):
                if pid:
                    os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_trainer_published_wants_an_adapter_refresh_then_fm_cycles():
    lines = [{"gem_fm": None, "student_adapter": 2, "error": None}, {"gem_fm": 2, "student_adapter": 3, "error": None}]
    assert bounds.trainer_published(lines, 2)[0].ok
    assert not bounds.trainer_published(lines, 3)[0].ok  # a cycle missing
    unloaded = [lines[0], {"gem_fm": 2, "student_adapter": 3, "error": "could not reach Triton"}]
    assert not bounds.trainer_published(unloaded, 2)[0].ok
    assert not bounds.trainer_published([lines[0], {**lines[1], "gem_fm": None}], 2)[0].ok


def test_faults_done_needs_every_fault_and_its_check():
    records = [{"at_s": 18, "kind": "rollback", "detail": "gem_fm 3 -> 2", "ok": True}]
    done, one = bounds.faults_done(records, 1)
    assert done.ok and one.ok and one.measured == "gem_fm 3 -> 2"
    assert not bounds.faults_done(records, 2)[0].ok
    assert not bounds.faults_done([{**records[0], "ok": False}], 1)[1].ok


@pytest.mark.stack
@pytest.mark.timeout(1200)
def test_three_minute_soak(published_repo, tiny_checkpoint, tmp_path):
    """The stack at a small rate for 3 minutes with the whole fault schedule; every bound
    of the verdict holds (the command's exit code says so too)."""
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    out = tmp_path / "soak"
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.soak", "--minutes", "3", "--rate", "3", "--candidates", "16,64",
         "--repo", str(repo), "--checkpoint", str(tiny_checkpoint), "--preset", "tiny", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=1100,
    )  # fmt: skip
    assert (out / "soak.json").exists(), (done.returncode, done.stdout[-3000:], done.stderr[-5000:])
    report = json.loads((out / "soak.json").read_text())
    broken = [v for v in report["verdicts"] if not v["ok"]]
    assert done.returncode == 0 and not broken, (broken, done.stdout[-3000:], done.stderr[-3000:])
    assert [f["kind"] for f in report["faults"]] == list(KINDS)
    assert report["summary"]["calls"] > 300 and (out / "soak.png").stat().st_size > 0
    assert len(report["published"]["fm"]) >= 3 and len(report["published"]["adapter"]) >= 4
    assert "Traceback" not in done.stdout + done.stderr
