"""Admission control in the replica: past capacity, a call is refused at once instead of
queued behind calls it cannot overtake.

Ray Serve bounds its own queue (`max_queued_requests`, serving/serve_config.yaml) but
refuses past it with RESOURCE_EXHAUSTED and no retry-after, and it counts calls, not
examples. The gate here sits in front of the data plane and bounds what is in flight on
this replica in *examples* and in calls; it also refuses a call whose deadline is shorter
than what calls take now (it would time out after using a slot and backend time).

A refused call gets UNAVAILABLE, not RESOURCE_EXHAUSTED: gRPC itself answers
RESOURCE_EXHAUSTED for a message over the size limit, which no retry can fix, so a
client cannot retry that code blindly; UNAVAILABLE says the call did not run and may be
retried with backoff. The refusal carries `retry-pushback-ms` (gRFC A6's trailer) and
`google.rpc.RetryInfo`; our client waits that long and retries (gem.knowledge.client).

One event loop per replica: the gate is plain state, no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reasons of a refusal (the `reason` tag of the refusal counter, serving/prometheus.py).
FULL = "full"
DEADLINE = "deadline"
REASONS = (FULL, DEADLINE)


@dataclass(frozen=True)
class AdmissionConfig:
    # Examples and calls admitted at once on one replica.
    max_examples: int
    max_calls: int
    # The retry-after of a refusal is the current call latency, within these bounds.
    min_retry_s: float = 0.005
    max_retry_s: float = 1.0
    # Weight of the newest call in the latency estimate (exponential moving average).
    smoothing: float = 0.2

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_calls < 1:
            raise ValueError("admission limits must be at least 1 (examples and calls)")


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reason: str = ""
    retry_after_s: float = 0.0


class AdmissionGate:
    """What is in flight on the replica, and how long an admitted call takes lately."""

    def __init__(self, cfg: AdmissionConfig):
        self.cfg = cfg
        self.examples = 0
        self.calls = 0
        # None until a call has completed: no estimate, no deadline refusals.
        self.latency_s: float | None = None

    def decide(self, rows: int, budget_s: float) -> Verdict:
        """Admit a call of `rows` examples with `budget_s` seconds left before its deadline?
        A call on an idle replica is always admitted (nothing to wait for, and it keeps the
        latency estimate fresh); an oversized call alone is the data plane's to split."""
        if self.calls == 0:
            return Verdict(True)
        retry = min(max(self.latency_s or 0.0, self.cfg.min_retry_s), self.cfg.max_retry_s)
        if self.calls + 1 > self.cfg.max_calls or self.examples + rows > self.cfg.max_examples:
            return Verdict(False, FULL, retry)
        if self.latency_s is not None and budget_s < self.latency_s:
            return Verdict(False, DEADLINE, retry)
        return Verdict(True)

    def enter(self, rows: int) -> None:
        self.examples += rows
        self.calls += 1

    def leave(self, rows: int, seconds: float) -> None:
        self.examples -= rows
        self.calls -= 1
        a = self.cfg.smoothing
        self.latency_s = seconds if self.latency_s is None else (1 - a) * self.latency_s + a * seconds
