"""Prometheus metrics of the front end, through Ray's metrics system.

Ray Serve replicas record them with `ray.serve.metrics` (which adds the `deployment`,
`replica` and `application` tags); each node's Ray metrics agent serves them, with
Ray Serve's own metrics, on the node's metrics export port (`gem serve --metrics-port`,
`ray start --metrics-export-port`). Ray prefixes every name with `ray_`, and a counter
gets `_total`: `calls` below is scraped as `ray_gem_calls_total`.

`DOCUMENTED` is the one list of what is exported and what it means; the README's table
and the metrics test are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve import metrics

# Call latency in milliseconds: from 1 ms (a cache-warm single example) to 10 s (the
# default deadline), log-spaced.
LATENCY_MS = [1.0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
EXAMPLES = [1.0, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    tags: tuple[str, ...]
    description: str

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


CALLS = Metric(
    "gem_calls",
    "counter",
    ("method", "code"),
    "Calls answered, by RPC method and gRPC status code (OK, INVALID_ARGUMENT, UNAVAILABLE, ...).",
)
EXAMPLES_SERVED = Metric(
    "gem_examples", "counter", ("method",), "Examples (candidate rows) in successful Generate calls."
)
CALL_LATENCY = Metric(
    "gem_call_latency_ms",
    "histogram",
    ("method",),
    "Time in the ingress per call, from decoding the request to the reply, in ms.",
)
BATCH_EXAMPLES = Metric(
    "gem_batch_examples",
    "histogram",
    ("backend",),
    "Examples per merged backend batch (how well @serve.batch merges calls).",
)
BACKEND_LATENCY = Metric(
    "gem_backend_latency_ms",
    "histogram",
    ("backend",),
    "Time of one merged batch in the backend (Triton or ONNX Runtime), in ms.",
)
MODEL_VERSION = Metric(
    "gem_model_version", "gauge", ("model",), "Model version that produced the latest reply, per model (fm, adapter)."
)
REFUSALS = Metric(
    "gem_admission_refusals",
    "counter",
    ("reason",),
    "Generate calls refused by admission control (UNAVAILABLE with a retry-after), by reason: "
    "full (the replica's in-flight bound) or deadline (shorter than calls take now).",
)
DOCUMENTED = (CALLS, EXAMPLES_SERVED, CALL_LATENCY, BATCH_EXAMPLES, BACKEND_LATENCY, MODEL_VERSION, REFUSALS)


class FrontendMetrics:
    """The ingress's recorders (made inside a replica, so Serve's tags are added)."""

    def __init__(self, backend: str):
        def counter(m: Metric) -> metrics.Counter:
            return metrics.Counter(m.name, description=m.description, tag_keys=m.tags)  # type: ignore[arg-type]  # ray types it tuple[str]

        def histogram(m: Metric, boundaries: list[float]) -> metrics.Histogram:
            return metrics.Histogram(m.name, description=m.description, boundaries=boundaries, tag_keys=m.tags)  # type: ignore[arg-type]  # ray types it tuple[str]

        self.calls, self.examples, self.refusals = counter(CALLS), counter(EXAMPLES_SERVED), counter(REFUSALS)
        self.call_latency = histogram(CALL_LATENCY, LATENCY_MS)
        self.batch_examples = histogram(BATCH_EXAMPLES, EXAMPLES)
        self.backend_latency = histogram(BACKEND_LATENCY, LATENCY_MS)
        for recorder in (self.batch_examples, self.backend_latency):
            recorder.set_default_tags({"backend": backend})
        self.version = metrics.Gauge(MODEL_VERSION.name, description=MODEL_VERSION.description,
                                     tag_keys=MODEL_VERSION.tags)  # type: ignore[arg-type]  # fmt: skip

    def call(self, method: str, code: str, seconds: float, examples: int = 0) -> None:
        self.calls.inc(tags={"method": method, "code": code})
        self.call_latency.observe(seconds * 1000, tags={"method": method})
        if examples:
            self.examples.inc(examples, tags={"method": method})

    def refusal(self, reason: str) -> None:
        self.refusals.inc(tags={"reason": reason})

    def batch(self, examples: int, seconds: float, fm_version: int, adapter_version: int) -> None:
        self.batch_examples.observe(examples)
        self.backend_latency.observe(seconds * 1000)
        self.version.set(fm_version, tags={"model": "fm"})
        self.version.set(adapter_version, tags={"model": "adapter"})
