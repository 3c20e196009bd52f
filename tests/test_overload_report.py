"""loadtests/overload.py's judgement of a run at 80 % and one at 2x capacity, and the
probe's summary of what it saw (pure)."""

from __future__ import annotations

from collections import Counter

from loadtests.overload import saturated, tallied, verdicts
from loadtests.probe import summarize


def _run(p99_ms: float, refused: int = 0, slowest: float | None = None, failures: int = 0, **extra) -> dict:
    """A step as loadtests.overload keeps it: Locust's figures, and the probe's, whose
    refusals are `refused` calls of `slowest` ms (Locust's own refusals timed at 10x)."""
    failed = [{"code": "UNAVAILABLE", "refused": True}] * refused
    failed += [{"code": "DEADLINE_EXCEEDED", "refused": False}] * (failures - refused)
    locust_ms = None if slowest is None else 10 * slowest
    refused_ms = [] if slowest is None else [slowest] * refused
    probe = summarize([5.0] * 20, refused_ms, extra.pop("probe_failed", Counter()))
    return {"p99_ms": p99_ms, "refused": refused, "refused_p50_ms": locust_ms, "refused_p99_ms": locust_ms,
            "refused_max_ms": locust_ms, "failures": failures, "failed_calls": failed, "probe": probe,
            **extra}  # fmt: skip


def test_met_when_admitted_calls_stay_fast_and_refusals_are_quick():
    judged = verdicts(_run(40), _run(75, refused=30, slowest=6, failures=30))
    assert [v.ok for v in judged] == [True, True, True]


def test_each_target_can_miss():
    slow = verdicts(_run(40), _run(120, refused=30, slowest=6, failures=30))
    assert [v.ok for v in slow] == [False, True, True] and "3.00x" in slow[0].measured
    queued = verdicts(_run(40), _run(60, refused=30, slowest=25, failures=30))
    assert [v.ok for v in queued] == [True, False, True]
    nothing_refused = verdicts(_run(40), _run(60))
    assert not nothing_refused[1].ok and nothing_refused[1].measured == "none refused"
    timed_out = verdicts(_run(40), _run(60, refused=30, slowest=6, failures=32))
    assert not timed_out[2].ok and "DEADLINE_EXCEEDED" in timed_out[2].measured
    probe_failed = verdicts(_run(40), _run(60, refused=30, slowest=6, failures=30, probe_failed=Counter(INTERNAL=1)))
    assert not probe_failed[2].ok and "INTERNAL" in probe_failed[2].measured


def test_the_refusal_target_is_judged_on_the_probe_with_locust_shown_beside():
    judged = verdicts(_run(40), _run(60, refused=30, slowest=6, failures=30))[1]
    assert judged.ok  # the probe's 6 ms, although Locust timed the same refusals at 60 ms
    assert "max 6.0 ms" in judged.measured and "Locust's 30: p50 60 ms" in judged.measured


def test_the_probe_summarizes_admitted_and_refused_calls_apart():
    summary = summarize([float(ms) for ms in range(1, 101)], [2.0, 4.0], Counter(DEADLINE_EXCEEDED=1))
    assert summary["calls"] == 103 and summary["admitted"] == 100 and summary["refused"] == 2
    assert summary["admitted_p50_ms"] == 50.5 and 99 < summary["admitted_p99_ms"] < 100
    assert summary["refused_p50_ms"] == 3.0 and summary["refused_max_ms"] == 4.0
    assert summary["failed_by_code"] == {"DEADLINE_EXCEEDED": 1}
    empty = summarize([], [], Counter())
    assert empty["calls"] == 0 and empty["admitted_p99_ms"] is None and empty["refused_max_ms"] is None


def test_saturated_when_less_than_nine_tenths_of_the_rate_is_admitted():
    assert saturated({"calls_per_s": 80.0, "target_rate": 100.0})
    assert not saturated({"calls_per_s": 95.0, "target_rate": 100.0})


def test_a_step_keeps_its_failed_calls_as_counts_by_status():
    step = _run(60, refused=3, slowest=6, failures=5, versions={"1:1": {"calls": 9}})
    kept = tallied(step)
    assert kept["failed_by_code"] == {"UNAVAILABLE (refused)": 3, "DEADLINE_EXCEEDED": 2}
    assert "failed_calls" not in kept and "versions" not in kept
    assert kept["p99_ms"] == 60 and kept["refused"] == 3
