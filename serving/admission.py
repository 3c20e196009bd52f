"""Admission control in the replica: past capacity, a call is refused at once instead of
queued behind calls it cannot overtake.

Ray Serve bounds its own queue (`max_queued_requests`, serving/serve_config.yaml) but
refuses past it with RESOURCE_EXHAUSTED and no retry-after, and it counts calls, not
examples. The gate here sits in front of the data plane and bounds what is in flight on
this replica in *examples* and in calls; it also refuses a call whose deadline is shorter
than what calls take now (it would time out after using a slot and backend time), and,
with `max_wait_s`, a call that would wait longer than that behind the work in flight:
the examples in flight over the examples/s the replica completes while busy (a decaying
average), so that the bound is in time, whatever the model's speed, rather than in a
count sized for one model.

A refused call gets UNAVAILABLE, not RESOURCE_EXHAUSTED: gRPC itself answers
RESOURCE_EXHAUSTED for a message over the size limit, which no retry can fix, so a
client cannot retry that code blindly; UNAVAILABLE says the call did not run and may be
retried with backoff. The refusal carries `retry-pushback-ms` (gRFC A6's trailer) and
`google.rpc.RetryInfo`; our client waits that long and retries (gem.knowledge.client).

One event loop per replica: the gate is plain state, no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Reasons of a refusal (the `reason` tag of the refusal counter, serving/prometheus.py).
FULL = "full"
DEADLINE = "deadline"
WAIT = "wait"


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
    # The longest a call may wait behind the work in flight (0: no such bound).
    max_wait_s: float = 0.0
    # Half-life of the examples/s estimate: it follows a change of load or model in seconds.
    rate_half_life_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_calls < 1:
            raise ValueError("admission limits must be at least 1 (examples and calls)")
        if self.max_wait_s < 0:
            raise ValueError("the admission wait bound cannot be negative (0: off)")


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reason: str = ""
    retry_after_s: float = 0.0


class AdmissionGate:
    """What is in flight on the replica, and how long an admitted call takes lately."""

    def __init__(self, cfg: AdmissionConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.clock = cfg, clock
        self.examples = 0
        self.calls = 0
        # None until a call has completed: no estimate, no deadline refusals.
        self.latency_s: float | None = None
        # Examples completed and seconds busy (a call in flight), both decaying with the
        # same half-life: their ratio is the recent examples/s while busy.
        self.done = self.busy_s = 0.0
        self.last = clock()

    def _advance(self) -> None:
        now = self.clock()
        elapsed, self.last = now - self.last, now
        decay = 0.5 ** (elapsed / self.cfg.rate_half_life_s)
        self.done *= decay
        self.busy_s = self.busy_s * decay + (elapsed if self.calls else 0.0)

    @property
    def examples_per_s(self) -> float | None:
        """What the replica completes per second of being busy, lately (None: no estimate yet)."""
        return self.done / self.busy_s if self.done > 0 and self.busy_s > 0 else None

    def _retry_after(self, seconds: float) -> float:
        return min(max(seconds, self.cfg.min_retry_s), self.cfg.max_retry_s)

    def decide(self, rows: int, budget_s: float) -> Verdict:
        """Admit a call of `rows` examples with `budget_s` seconds left before its deadline?
        A call on an idle replica is always admitted (nothing to wait for, and it keeps the
        latency estimate fresh); an oversized call alone is the data plane's to split."""
        if self.calls == 0:
            return Verdict(True)
        retry = self._retry_after(self.latency_s or 0.0)
        if self.calls + 1 > self.cfg.max_calls or self.examples + rows > self.cfg.max_examples:
            return Verdict(False, FULL, retry)
        if self.latency_s is not None and budget_s < self.latency_s:
            return Verdict(False, DEADLINE, retry)
        if self.cfg.max_wait_s > 0:
            self._advance()
            rate = self.examples_per_s
            if rate is not None and (wait := self.examples / rate) > self.cfg.max_wait_s:
                # Retry once what is ahead has drained.
                return Verdict(False, WAIT, self._retry_after(wait))
        return Verdict(True)

    def enter(self, rows: int) -> None:
        self._advance()
        self.examples += rows
        self.calls += 1

    def leave(self, rows: int, seconds: float) -> None:
        self._advance()
        self.done += rows
        self.examples -= rows
        self.calls -= 1
        a = self.cfg.smoothing
        self.latency_s = seconds if self.latency_s is None else (1 - a) * self.latency_s + a * seconds
