"""OpenTelemetry tracing of a call through the front end and Triton: off by default, on
with one flag (`gem up --tracing URL`, `gem serve --tracing URL`: an OTLP/HTTP traces
endpoint, e.g. a collector's http://127.0.0.1:4318/v1/traces).

When on, every process exports to that one endpoint:
- Ray Serve traces its own steps (`TracingConfig`; the replica continues the caller's
  W3C `traceparent` metadata) with `span_processors` below as its exporter;
- the data plane adds a span per backend batch (`backend_span`), and the Triton client
  sends that span's context to Triton as `traceparent` (`trace_headers`);
- Triton, in its OpenTelemetry trace mode (`triton_trace_args`), continues it.
So a call's spans share one trace id from the ranker to the model. Every call is sampled
unless the caller's `traceparent` says otherwise: tracing is meant to be turned on to look.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import propagate, trace

# The standard OpenTelemetry variable: the exporter in every Serve process reads it.
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
# The resource's service.name of the front end's spans (the SDK reads the variable).
SERVICE_NAME_ENV, SERVICE_NAME = "OTEL_SERVICE_NAME", "gem-knowledge"
_tracer = trace.get_tracer("gem.serving")


def span_processors() -> list:
    """Ray Serve's tracing exporter (`TracingConfig.exporter_import_path`): batches of
    spans over OTLP/HTTP to $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500)]


def serve_tracing_config(endpoint: str | None):
    """Ray Serve's TracingConfig: on, exporting through `span_processors`, with an endpoint."""
    from ray.serve.schema import TracingConfig

    if not endpoint:
        return TracingConfig(enabled=False)
    return TracingConfig(enabled=True, exporter_import_path="serving.tracing:span_processors", sampling_ratio=1.0)


def triton_trace_args(endpoint: str | None) -> list[str]:
    """Triton's flags for its OpenTelemetry mode, exporting to `endpoint` (none when off)."""
    if not endpoint:
        return []
    return [
        "--trace-config=mode=opentelemetry",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=1",
        f"--trace-config=opentelemetry,url={endpoint}",
        "--trace-config=opentelemetry,resource=service.name=triton",
    ]


@contextlib.contextmanager
def backend_span(backend: str, examples: int, calls: int) -> Iterator[None]:
    """A span around one merged backend batch (a no-op when tracing is off: the API's
    default tracer records nothing)."""
    with _tracer.start_as_current_span(
        "gem backend batch", attributes={"gem.backend": backend, "gem.examples": examples, "gem.calls": calls}
    ):
        yield


def trace_headers() -> dict[str, str] | None:
    """The current span's W3C context as request headers (gRPC metadata), or None."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None
