"""Shared by the benchmarks: timing loops, a results table, JSON output."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    name: str
    batch: int
    calls: int
    p50_ms: float
    p99_ms: float
    examples_per_s: float


def int_list(text: str) -> list[int]:
    """A comma-separated list of ints, as the benches' options take it ("" is none)."""
    return [int(x) for x in text.split(",") if x.strip()]


def summarize(name: str, batch: int, seconds: list[float]) -> Timing:
    ms = np.array(seconds) * 1e3
    return Timing(
        name, batch, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), batch * len(ms) / sum(seconds)
    )


@dataclass(frozen=True)
class Budget:
    """How long to time one cell: at least `min_calls`, then until `seconds` or `max_calls`."""

    warmup: int = 3
    min_calls: int = 20
    max_calls: int = 500
    seconds: float = 3.0

    def more(self, timed: list[float]) -> bool:
        return len(timed) < self.max_calls and (len(timed) < self.min_calls or sum(timed) < self.seconds)


def time_sync(fn: Callable[[], object], budget: Budget = Budget()) -> list[float]:
    for _ in range(budget.warmup):
        fn()
    timed: list[float] = []
    while budget.more(timed):
        start = time.perf_counter()
        fn()
        timed.append(time.perf_counter() - start)
    return timed


async def time_async(fn: Callable[[], Awaitable[object]], budget: Budget = Budget()) -> list[float]:
    for _ in range(budget.warmup):
        await fn()
    timed: list[float] = []
    while budget.more(timed):
        start = time.perf_counter()
        await fn()
        timed.append(time.perf_counter() - start)
    return timed


def table(title: str, timings: list[Timing]) -> Table:
    t = Table(title=title)
    for col in ("backend", "batch", "calls", "p50 ms", "p99 ms", "examples/s"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for x in timings:
        t.add_row(x.name, str(x.batch), str(x.calls), f"{x.p50_ms:.2f}", f"{x.p99_ms:.2f}", f"{x.examples_per_s:,.0f}")
    return t


def write_json(name: str, config: dict, timings: list[Timing]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    machine = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    doc = {"config": config, "machine": machine, "results": [asdict(t) for t in timings]}
    path.write_text(json.dumps(doc, indent=2))
    Console(stderr=True).print(f"wrote {path}")
    return path
