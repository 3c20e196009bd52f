"""Starting and stopping the front end on Ray Serve from Python (`gem up`, `gem serve`,
tests, benchmarks). `serve run serving/serve_config.yaml` does the same from a file.

Two ingresses (`serving.config.Ingress`, `--ingress`, $GEM_INGRESS):

- "direct" (the default): Ray Serve's direct ingress. The application's replica runs its
  own gRPC server on the public port (`grpc_port`), so a call reaches the code that
  answers it in one hop. Serve still starts its proxies on the head node (its controller
  forces HeadOnly in this mode): their HTTP on `http_port`, their gRPC on a private free
  port (the fallback Serve routes to while a replica is missing), and the replica also
  starts an HTTP server of its own on a loopback port from Serve's range (30000-31000;
  the API has no HTTP routes). One replica only: the
  public port is one replica's, and several replicas would need a port each and a
  balancer in front (`start` refuses `replicas > 1`; use "proxy" for those, or, on a
  cluster, a load balancer over the replicas' ports: serving/serve_config.yaml).
  Several applications on one Serve instance get consecutive ports from `grpc_port`
  on (`apps`), each reached at `address_of(name)`.
- "proxy": Serve's gRPC proxy on `grpc_port` hands each call to a replica (any number of
  them); several applications share the port and calls name theirs in the
  `application` metadata key.

Every Ray Serve setting here is an environment variable read when Ray's processes
import Serve, so it is set before Ray starts: Ray's workers inherit the environment of
the Ray started here (`ray.init` below).
"""

from __future__ import annotations

import logging
import os
import time

from serving.config import (
    MAX_MESSAGE_ENV,
    SERVICER_FUNCTIONS,
    FrontendConfig,
    Ingress,
    ProxyLocation,
    max_message_bytes,
)
from serving.local.health import check
from serving.local.logs import serve_logging_config
from serving.local.loopback import HOST_ENV, LOCAL_ONLY_ENV
from serving.local.ports import connect_host, free_ports
from serving.tracing import SERVICE_NAME, SERVICE_NAME_ENV, TRACES_ENDPOINT_ENV, serve_tracing_config

log = logging.getLogger(__name__)

APP_NAME = "gem_knowledge"
# ray/serve/_private/constants.py (ray 2.60).
DIRECT_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# Ray starts its workers at nice 15 (ray_config_def.h, worker_niceness) so that a node's
# batch tasks yield to everything else. A replica that answers rankers must not yield to
# whatever else shares its cores (a load generator, a side trainer): past capacity a
# refusal waits for its event loop's turn (2x capacity on 2 cores, probe refusals p50
# 52-61 ms at 15, 13-42 at 0; loadtests/README.md). Its inference runs below it instead
# (FrontendConfig.inference_nice). Read by the raylet this process starts; a cluster's
# nodes set it in their own environment (deploy/k8s/frontend.yaml).
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def ingress_env(ingress: Ingress, grpc_port: int, apps: int) -> dict[str, str]:
    """Ray Serve's settings for `ingress` (every key set either way, so a Ray started
    later in the same process does not inherit the other mode's)."""
    if ingress == "proxy":
        return {DIRECT_ENV: "0"}
    return {
        DIRECT_ENV: "1",
        # The controller hands replicas their gRPC ports from this range, lowest first:
        # with one application, the public port itself.
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + apps),
        # A released port is held back this long (for balancers that still route to
        # it); with none in front, a restarted replica takes its port back at once.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # A stopping replica stays up at least this long for balancers to deregister it
        # (30 s by default); it still waits for the calls in flight.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def start(
    cfg: FrontendConfig,
    grpc_port: int = 50051,
    http_port: int = 8080,
    replicas: int = 1,
    name: str = APP_NAME,
    metrics_port: int | None = None,
    host: str = "127.0.0.1",
    ingress: Ingress = "direct",
    apps: int = 1,
    tracing: str | None = None,
    address: str | None = None,
    replicas_per_node: int | None = None,
    proxy_location: ProxyLocation = "EveryNode",
) -> str:
    """Starts Ray (if needed), Serve and the application; returns the gRPC address.

    `apps`: how many applications will run on this Serve instance (direct ingress gives
    each a port of its own, `grpc_port` to `grpc_port + apps - 1`; with the proxy they
    share `grpc_port` and calls name theirs in the `application` metadata key).
    Prometheus metrics (`serving.prometheus`, and Ray Serve's own) are served on
    `metrics_port` at /metrics (None: a port Ray picks). `tracing`: an OTLP/HTTP traces
    endpoint to send Serve's spans and ours to (serving/tracing.py; None: off).

    `address`: a running Ray cluster to deploy on (default: a Ray of this process's own);
    `replicas_per_node` caps the replicas a node takes (1 spreads them over the nodes);
    `proxy_location`: where Serve runs its proxies (serving.config.ProxyLocation).

    Everything listens on `host` (127.0.0.1 by default; `--host` opens it deliberately):
    Ray itself, Serve's proxies and the replica's gRPC server (serving/local/loopback.py).
    The gRPC server that answers the public port refuses messages over the largest legal
    call (RESOURCE_EXHAUSTED), and calls longer than the backend bound get
    DEADLINE_EXCEEDED from Serve itself."""
    import sys

    from model.schema import load_schema

    if ingress == "direct" and replicas > 1:
        raise ValueError(
            f"direct ingress serves one replica on port {grpc_port}; for {replicas} replicas "
            "use --ingress proxy (or, on a cluster, a load balancer over the replicas' ports)"
        )
    limit = max_message_bytes(load_schema(cfg.schema_path), cfg.max_examples_per_call)
    env = {
        MAX_MESSAGE_ENV: str(limit),
        HOST_ENV: host,
        WORKER_NICENESS_ENV: "0",
        **ingress_env(ingress, grpc_port, apps),
    }
    if tracing:
        env |= {TRACES_ENDPOINT_ENV: tracing, SERVICE_NAME_ENV: SERVICE_NAME}
    # Never on a cluster's address: its workers on other machines must stay reachable.
    local_only = address is None and host in ("127.0.0.1", "localhost") and LOCAL_ONLY_ENV not in os.environ
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
        # Ray's workers (the proxies and replicas among them) inherit the environment of
        # the Ray started here, and run the setup hook that binds gRPC servers to `host`.
        os.environ.update(env)
        runtime_env = {"env_vars": env, "worker_process_setup_hook": "serving.local.loopback.setup_worker"}
        if address:
            # A running cluster (`ray start`): its nodes already export their metrics.
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        else:
            # A Ray of our own: never attach to another process's cluster by accident.
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                _metrics_export_port=metrics_port,
                runtime_env=runtime_env,
            )
    # Direct ingress: the replica takes the public port; Serve's (head-node) proxy, which
    # reads the same gRPC options, gets a private one.
    proxy_grpc_port = grpc_port if ingress == "proxy" else free_ports(1)[0]
    # Serve's own processes take the logging config of serve.start, the application's
    # replicas that of serve.run.
    logging_config = serve_logging_config()
    serve.start(
        proxy_location=proxy_location,
        logging_config=logging_config,
        tracing_config=serve_tracing_config(tracing),
        http_options={"host": host, "port": http_port},
        grpc_options=gRPCOptions(
            port=proxy_grpc_port,
            grpc_servicer_functions=list(SERVICER_FUNCTIONS),
            request_timeout_s=cfg.backend_timeout_s + 5.0,
            # On every gRPC server of Serve's (the replica's under direct ingress, the
            # proxy's): grpcurl and grpcui list and call the services without the .proto.
            enable_reflection=True,
        ),
    )
    app = KnowledgeIngress.options(num_replicas=replicas, max_replicas_per_node=replicas_per_node).bind(cfg)  # type: ignore[attr-defined]  # a Deployment at run time
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False, logging_config=logging_config)
    return f"{connect_host(host)}:{grpc_port}"


def proxy_address(host: str = "127.0.0.1") -> str:
    """The gRPC address of Serve's proxy: the public port with the proxy ingress, the
    head-node proxy's private one under direct ingress (calls there take the proxy hop,
    which is how bench/frontend.py measures both ingresses on one Serve instance)."""
    import ray

    return f"{connect_host(host)}:{ray.get(_controller().get_grpc_config.remote()).port}"


def _controller():
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("Serve is not running (launcher.start first)")
    return client._controller


def address_of(name: str, host: str = "127.0.0.1", timeout_s: float = 120.0) -> str:
    """The gRPC address that serves application `name`: its replica's port under direct
    ingress (known once the replica has started), else the proxy's."""
    import ray
    from ray.serve._private.common import RequestProtocol

    controller = _controller()
    direct = os.environ.get(DIRECT_ENV) == "1"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups = ray.get(controller.get_target_groups.remote(name))
        ports = [
            t.port
            for g in groups
            if g.protocol == RequestProtocol.GRPC and (g.app_name == name or not direct)
            for t in g.targets
        ]
        if ports:
            return f"{connect_host(host)}:{ports[0]}"
        time.sleep(0.25)
    raise TimeoutError(f"application {name} has no gRPC address after {timeout_s:.0f}s")


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
