"""One ranker's view of the stack while Locust loads it: a call at a time, paced, from a
thread that is not itself saturated.

Locust's own figures include its process's delays: at 2x capacity on the stack's own
cores its users wait for their turn of its loop before a reply is even read, so a refusal
the replica answered in a millisecond can be timed at hundreds. The probe times what a
ranker with its own CPU would see (`loadtests.overload` runs it beside each step). It
uses the project's client with no retries, so a refusal is seen and timed as one.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
from gem.knowledge import KnowledgeClient
from gem.knowledge.client import pushback_s

from model.examples import random_call
from model.schema import schema_from_yaml

SEQ_LEN = 64


@dataclass(frozen=True)
class ProbeConfig:
    interval_s: float = 0.05  # one call per interval: 20 calls/s, a rounding error of the load
    candidates: int = 16
    timeout_s: float = 5.0
    token: str | None = None


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(admitted_ms: list[float], refused_ms: list[float], failed: Counter) -> dict:
    """The probe's figures: its admitted and refused calls' latencies, other failures by code."""
    return {
        "calls": len(admitted_ms) + len(refused_ms) + sum(failed.values()),
        "admitted": len(admitted_ms),
        "admitted_p50_ms": _percentile(admitted_ms, 50),
        "admitted_p99_ms": _percentile(admitted_ms, 99),
        "refused": len(refused_ms),
        "refused_p50_ms": _percentile(refused_ms, 50),
        "refused_p99_ms": _percentile(refused_ms, 99),
        "refused_max_ms": max(refused_ms, default=None),
        "failed_by_code": dict(failed),
    }


class Probe:
    """Calls `address` every `interval_s` from its own thread until stopped."""

    def __init__(self, address: str, cfg: ProbeConfig = ProbeConfig()):
        self.address, self.cfg = address, cfg
        self.admitted_ms: list[float] = []
        self.refused_ms: list[float] = []
        self.failed: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gem-probe", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=self.cfg.timeout_s + 5)

    def summary(self) -> dict:
        return summarize(self.admitted_ms, self.refused_ms, self.failed)

    def _run(self) -> None:
        with KnowledgeClient(self.address, token=self.cfg.token, timeout_s=self.cfg.timeout_s, retries=0) as client:
            schema = schema_from_yaml(client.info().schema_yaml)
            ads, shared = random_call(schema, self.cfg.candidates, SEQ_LEN, seed=0)
            next_call = time.monotonic()
            while not self._stop.wait(max(0.0, next_call - time.monotonic())):
                # Paced, without catching up after a slow call (that would be a burst).
                next_call = max(next_call + self.cfg.interval_s, time.monotonic())
                start = time.perf_counter()
                try:
                    client.generate(ads, shared=shared, outputs=("labels",))
                except grpc.RpcError as e:
                    took = (time.perf_counter() - start) * 1000
                    if pushback_s(e) is not None:
                        self.refused_ms.append(took)
                    else:
                        self.failed[e.code().name] += 1
                else:
                    self.admitted_ms.append((time.perf_counter() - start) * 1000)
