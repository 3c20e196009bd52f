"""The local stack behind `gem up`: Triton (unless embedded) and the Ray Serve front end
on this machine, started in order, checked healthy, stopped in reverse order."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from serving.config import FrontendConfig, Ingress, default_ingress
from serving.local import launcher
from serving.local.ports import connect_host, port_in_use
from serving.local.supervisor import SupervisedTriton
from serving.local.triton import TritonConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    # The front end (backend, repository, token, limits). With a local Triton, its
    # `triton_url` is that server's.
    frontend: FrontendConfig
    # The local Triton; None with the embedded backend (`frontend.backend` onnxruntime).
    triton: TritonConfig | None = None
    grpc_port: int = 50051
    http_port: int = 8080
    # Prometheus: the front end's metrics (and Ray Serve's) at /metrics.
    metrics_port: int = 8090
    # Where the front end and its metrics listen (Triton: `triton.host`). 127.0.0.1
    # unless opened deliberately (`gem up --host`, compose inside its network).
    host: str = "127.0.0.1"
    # Who answers `grpc_port`: the replica itself ("direct") or Serve's gRPC proxy
    # (serving/local/launcher.py).
    ingress: Ingress = field(default_factory=default_ingress)
    # OTLP/HTTP traces endpoint for the front end and Triton (serving/tracing.py); None: off.
    tracing: str | None = None

    def __post_init__(self) -> None:
        if (self.triton is None) != (self.frontend.backend == "onnxruntime"):
            raise ValueError("a local Triton goes with the triton backend, and only with it")


def check_ports(cfg: StackConfig) -> None:
    """Fails before starting anything if a port the stack needs is taken."""
    ports = {
        (cfg.host, "--grpc-port"): cfg.grpc_port,
        (cfg.host, "the front end's HTTP port"): cfg.http_port,
        (cfg.host, "--metrics-port"): cfg.metrics_port,
    }
    if cfg.triton is not None:
        t = cfg.triton
        ports |= {
            (t.host, "Triton's HTTP port"): t.http_port,
            (t.host, "Triton's gRPC port"): t.grpc_port,
            (t.host, "Triton's metrics port"): t.metrics_port,
        }
    taken = [f"{port} ({what})" for (host, what), port in ports.items() if port_in_use(port, connect_host(host))]
    if taken:
        raise OSError(f"port(s) already in use: {', '.join(taken)}; is another stack running? (gem triton down)")


@contextlib.contextmanager
def local_stack(cfg: StackConfig) -> Iterator[str]:
    """Yields the front end's gRPC address once it answers health checks."""
    check_ports(cfg)
    with contextlib.ExitStack() as stack:
        frontend = cfg.frontend
        if cfg.triton is not None:
            triton_cfg = dataclasses.replace(
                cfg.triton,
                repository=cfg.triton.repository.resolve(),
                work_dir=cfg.triton.work_dir.resolve(),
                trace_url=cfg.tracing,
            )
            log.info("starting Triton (log: %s)", triton_cfg.log_file)
            # Supervised: restarted with backoff if it exits; `gem triton down` finds it.
            triton = stack.enter_context(SupervisedTriton(triton_cfg, owner=os.getpid()))
            frontend = dataclasses.replace(frontend, triton_url=triton.cfg.grpc_url)
        log.info("starting Ray Serve (%s backend)", frontend.backend)
        address = launcher.start(
            frontend,
            grpc_port=cfg.grpc_port,
            http_port=cfg.http_port,
            metrics_port=cfg.metrics_port,
            host=cfg.host,
            ingress=cfg.ingress,
            tracing=cfg.tracing,
        )
        stack.callback(launcher.stop)
        launcher.wait_healthy(address)
        yield address
