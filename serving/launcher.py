"""Starting and stopping the front end on Ray Serve from Python (`gem up`, `gem serve`,
tests, benchmarks). `serve run serving/serve_config.yaml` does the same from a file."""

from __future__ import annotations

import logging
import time

from serving.config import SERVICER_FUNCTIONS, FrontendConfig
from serving.health import check

log = logging.getLogger(__name__)

APP_NAME = "gem_knowledge"


def start(
    cfg: FrontendConfig,
    grpc_port: int = 50051,
    http_port: int = 8080,
    replicas: int = 1,
    name: str = APP_NAME,
    metrics_port: int | None = None,
) -> str:
    """Starts Ray (if needed), Serve's proxies and the application; returns the gRPC address.

    With several applications on one Serve instance, calls name theirs in the
    `application` metadata key; with one, no metadata is needed. Prometheus metrics
    (`serving.prometheus`, and Ray Serve's own) are served on `metrics_port` at /metrics
    (None: a port Ray picks)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serving.ingress import KnowledgeIngress

    if not ray.is_initialized():
        # A Ray of our own: never attach to another process's cluster by accident.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(SERVICER_FUNCTIONS)),
    )
    app = KnowledgeIngress.options(num_replicas=replicas).bind(cfg)
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    return f"127.0.0.1:{grpc_port}"


def wait_healthy(address: str, timeout_s: float = 120.0, application: str | None = None) -> None:
    """Polls gRPC health checking until the service answers SERVING."""
    deadline = time.monotonic() + timeout_s
    serving, last = False, "no answer"
    while not serving and time.monotonic() < deadline:
        serving, last = check(address, 5.0, application)
        if not serving:
            time.sleep(0.25)
    if not serving:
        raise TimeoutError(f"front end at {address} not serving after {timeout_s:.0f}s ({last})")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
