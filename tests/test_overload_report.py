"""loadtests/overload.py's judgement of a run at 80 % and one at 2x capacity (pure)."""

from __future__ import annotations

from loadtests.overload import saturated, tallied, verdicts


def _run(p99_ms: float, refused: int = 0, slowest: float | None = None, failures: int = 0, **extra) -> dict:
    failed = [{"code": "UNAVAILABLE", "refused": True}] * refused
    failed += [{"code": "DEADLINE_EXCEEDED", "refused": False}] * (failures - refused)
    return {"p99_ms": p99_ms, "refused": refused, "refused_p50_ms": slowest, "refused_p99_ms": slowest,
            "refused_max_ms": slowest, "failures": failures, "failed_calls": failed, **extra}  # fmt: skip


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


def test_saturated_when_less_than_nine_tenths_of_the_rate_is_admitted():
    assert saturated({"calls_per_s": 80.0, "target_rate": 100.0})
    assert not saturated({"calls_per_s": 95.0, "target_rate": 100.0})


def test_a_step_keeps_its_failed_calls_as_counts_by_status():
    step = _run(60, refused=3, slowest=6, failures=5, versions={"1:1": {"calls": 9}})
    kept = tallied(step)
    assert kept["failed_by_code"] == {"UNAVAILABLE (refused)": 3, "DEADLINE_EXCEEDED": 2}
    assert "failed_calls" not in kept and "versions" not in kept
    assert kept["p99_ms"] == 60 and kept["refused"] == 3
