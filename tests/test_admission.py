"""The admission gate's logic (serving/admission.py) and its refusal on the wire
(serving/errors.py): no server."""

from __future__ import annotations

import grpc
import pytest
from gem.knowledge.client import pushback_wait
from google.rpc import error_details_pb2, status_pb2

from serving.admission import DEADLINE, FULL, WAIT, AdmissionConfig, AdmissionGate
from serving.config import FrontendConfig
from serving.errors import DETAILS_KEY, PUSHBACK_KEY, refuse


def gate(examples: int = 100, calls: int = 3) -> AdmissionGate:
    return AdmissionGate(AdmissionConfig(max_examples=examples, max_calls=calls))


def test_an_idle_replica_admits_any_call():
    g = gate(examples=10)
    assert g.decide(rows=1000, budget_s=0.0).admitted


def test_calls_past_the_call_bound_are_refused_until_one_leaves():
    g = gate(calls=2)
    for _ in range(2):
        assert g.decide(1, 1.0).admitted
        g.enter(1)
    refused = g.decide(1, 1.0)
    assert (refused.admitted, refused.reason) == (False, FULL)
    g.leave(1, 0.05)
    assert g.decide(1, 1.0).admitted


def test_examples_past_the_example_bound_are_refused():
    g = gate(examples=100, calls=10)
    g.enter(60)
    assert g.decide(40, 1.0).admitted
    assert g.decide(41, 1.0).reason == FULL


def test_a_deadline_shorter_than_calls_take_is_refused_only_when_busy():
    g = gate()
    g.enter(1)
    assert g.decide(1, 0.001).admitted  # no estimate yet: nothing to refuse on
    g.leave(1, 0.2)
    assert g.decide(1, 0.001).admitted  # idle: it runs at once
    g.enter(1)
    short = g.decide(1, 0.1)
    assert (short.admitted, short.reason) == (False, DEADLINE)
    assert g.decide(1, 0.3).admitted


def test_the_retry_after_follows_the_latency_within_bounds():
    g = AdmissionGate(AdmissionConfig(max_examples=100, max_calls=1, min_retry_s=0.01, max_retry_s=0.5))
    g.enter(1)
    assert g.decide(1, 1.0).retry_after_s == 0.01  # no estimate: the floor
    g.leave(1, 0.1)
    g.enter(1)
    assert g.decide(1, 1.0).retry_after_s == pytest.approx(0.1)
    for _ in range(50):
        g.leave(1, 10.0)
        g.enter(1)
    assert g.decide(1, 100.0).retry_after_s == 0.5


def test_the_latency_estimate_is_a_moving_average():
    g = AdmissionGate(AdmissionConfig(max_examples=100, max_calls=4, smoothing=0.5))
    for seconds in (0.1, 0.3):
        g.enter(1)
        g.leave(1, seconds)
    assert g.latency_s == pytest.approx(0.2)
    assert (g.calls, g.examples) == (0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_call_that_would_wait_past_the_bound_is_refused():
    """The wait is the examples in flight over the examples/s completed while busy."""
    clock = Clock()
    g = AdmissionGate(AdmissionConfig(max_examples=10_000, max_calls=100, max_wait_s=0.05), clock)
    g.enter(100)
    assert g.decide(100, 1.0).admitted  # no rate measured yet: nothing to refuse on
    clock.now = 0.1  # 100 examples in 0.1 s busy: 1,000 examples/s
    g.leave(100, 0.1)
    assert g.examples_per_s == pytest.approx(1000)
    g.enter(40)  # 40 ms of work ahead
    assert g.decide(10, 1.0).admitted
    g.enter(20)  # 60 ms ahead: past the 50 ms bound
    refused = g.decide(10, 1.0)
    assert (refused.admitted, refused.reason) == (False, WAIT)
    assert refused.retry_after_s == pytest.approx(0.06)  # once what is ahead has drained


def test_the_rate_counts_busy_time_only_and_forgets_the_past():
    clock = Clock()
    g = AdmissionGate(AdmissionConfig(max_examples=10_000, max_calls=100, max_wait_s=0.05, rate_half_life_s=1.0), clock)
    g.enter(100)
    clock.now = 0.1
    g.leave(100, 0.1)
    clock.now = 10.0  # idle: no busy time added, both sums decay alike
    g.enter(1000)
    assert g.examples_per_s == pytest.approx(1000)
    clock.now = 10.01  # a faster model now: 1,000 examples in 10 ms busy
    g.leave(1000, 0.01)
    assert g.examples_per_s > 50_000 and (g.calls, g.examples) == (0, 0)


def test_the_limits_come_from_the_front_end_config():
    assert FrontendConfig(max_batch_examples=512, max_examples_per_call=512).admission.max_examples == 1024
    cfg = FrontendConfig(max_in_flight_examples=64, max_in_flight_calls=4)
    assert (cfg.admission.max_examples, cfg.admission.max_calls) == (64, 4)
    with pytest.raises(ValueError, match="at least 1"):
        FrontendConfig(max_in_flight_calls=0)
    assert FrontendConfig.from_args({"max_in_flight_calls": "8"}).admission.max_calls == 8
    assert FrontendConfig.from_args({"max_queue_wait_s": "0.05"}).admission.max_wait_s == 0.05
    with pytest.raises(ValueError, match="cannot be negative"):
        FrontendConfig(max_queue_wait_s=-1)


class Context:
    """What `refuse` sets on a gRPC servicer context."""

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailer):
        self.trailer = dict(trailer)


def test_a_refusal_with_a_retry_after_carries_pushback_and_retry_info():
    context = Context()
    refuse(context, grpc.StatusCode.UNAVAILABLE, "overloaded", retry_after_s=0.0304)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert context.trailer[PUSHBACK_KEY] == "30"
    status = status_pb2.Status.FromString(context.trailer[DETAILS_KEY])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 30


def test_a_refusal_without_a_retry_after_has_no_pushback():
    context = Context()
    refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert PUSHBACK_KEY not in context.trailer
    assert not status_pb2.Status.FromString(context.trailer[DETAILS_KEY]).details


class Refused(grpc.RpcError):
    """What a client call raises: a code and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, trailer: tuple = ()):
        self._code, self._trailer = code, trailer

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._trailer


@pytest.mark.parametrize(
    ("error", "attempt", "remaining_s", "wait"),
    [
        (Refused(grpc.StatusCode.UNAVAILABLE, ((PUSHBACK_KEY, "30"),)), 0, 1.0, 0.03),
        (Refused(grpc.StatusCode.UNAVAILABLE, ((PUSHBACK_KEY, "30"),)), 3, 1.0, None),  # retries spent
        (Refused(grpc.StatusCode.UNAVAILABLE, ((PUSHBACK_KEY, "30"),)), 0, 0.02, None),  # past the deadline
        (Refused(grpc.StatusCode.UNAVAILABLE, ((PUSHBACK_KEY, "soon"),)), 0, 1.0, None),
        (Refused(grpc.StatusCode.UNAVAILABLE), 0, 1.0, None),  # gRPC's own policy retries those
        (Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, ((PUSHBACK_KEY, "30"),)), 0, 1.0, None),
    ],
)
def test_the_client_retries_only_overload_refusals_within_its_deadline(error, attempt, remaining_s, wait):
    assert pushback_wait(error, attempt, retries=3, remaining_s=remaining_s) == wait
