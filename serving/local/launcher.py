"""Starting and stopping the front end on Ray Serve from Python (`gem up`, `gem serve`,
tests, benchmarks). `serve run serving/serve_config.yaml` does the same from a file."""

from __future__ import annotations

import logging
import os
import time

from serving.config import MAX_MESSAGE_ENV, SERVICER_FUNCTIONS, FrontendConfig, max_message_bytes
from serving.local.health import check
from serving.local.loopback import HOST_ENV, LOCAL_ONLY_ENV
from serving.local.ports import connect_host

log = logging.getLogger(__name__)

APP_NAME = "gem_knowledge"


def start(
    cfg: FrontendConfig,
    grpc_port: int = 50051,
    http_port: int = 8080,
    replicas: int = 1,
    name: str = APP_NAME,
    metrics_port: int | None = None,
    host: str = "127.0.0.1",
) -> str:
    """Starts Ray (if needed), Serve's proxies and the application; returns the gRPC address.

    With several applications on one Serve instance, calls name theirs in the
    `application` metadata key; with one, no metadata is needed. Prometheus metrics
    (`serving.prometheus`, and Ray Serve's own) are served on `metrics_port` at /metrics
    (None: a port Ray picks).

    Everything listens on `host` (127.0.0.1 by default; `--host` opens it deliberately):
    Ray itself, Serve's HTTP proxy and its gRPC proxy (serving/local/loopback.py). The gRPC
    proxy refuses messages over the largest legal call (RESOURCE_EXHAUSTED), and calls
    longer than the backend bound get DEADLINE_EXCEEDED from the proxy itself."""
    import sys

    from model.schema import load_schema

    limit = max_message_bytes(load_schema(cfg.schema_path), cfg.max_examples_per_call)
    env = {MAX_MESSAGE_ENV: str(limit), HOST_ENV: host}
    local_only = host in ("127.0.0.1", "localhost") and LOCAL_ONLY_ENV not in os.environ
    if local_only and "ray._private.ray_constants" not in sys.modules:
        # Ray's single-machine mode (its default on macOS/Windows), decided when Ray is
        # first imported: the node address is the loopback one, so Ray's own servers and
        # its metrics listen there too. Set before Ray is imported.
        env[LOCAL_ONLY_ENV] = "0"
        os.environ[LOCAL_ONLY_ENV] = "0"

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serving.servicer import KnowledgeIngress

    if not ray.is_initialized():
        # Ray's workers (the proxies among them) inherit the environment of the Ray
        # started here, and run the setup hook that binds the gRPC proxy to `host`.
        os.environ.update(env)
        # A Ray of our own: never attach to another process's cluster by accident.
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=metrics_port,
            runtime_env={"env_vars": env, "worker_process_setup_hook": "serving.local.loopback.setup_worker"},
        )
    serve.start(
        http_options={"host": host, "port": http_port},
        grpc_options=gRPCOptions(
            port=grpc_port,
            grpc_servicer_functions=list(SERVICER_FUNCTIONS),
            request_timeout_s=cfg.backend_timeout_s + 5.0,
        ),
    )
    app = KnowledgeIngress.options(num_replicas=replicas).bind(cfg)  # type: ignore[attr-defined]  # a Deployment at run time
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    return f"{connect_host(host)}:{grpc_port}"


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
