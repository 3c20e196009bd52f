"""The local stack behind `gem up`: Triton (unless embedded) and the Ray Serve front end
on this machine, started in order, checked healthy, stopped in reverse order."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serving.config import FrontendConfig
from serving.local import launcher
from serving.local.ports import connect_host, port_in_use
from serving.local.supervisor import SupervisedTriton
from serving.local.triton import TritonConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    repository: Path
    triton_work_dir: Path
    embedded: bool = False
    grpc_port: int = 50051
    http_port: int = 8080
    # Prometheus: the front end's metrics (and Ray Serve's) at /metrics.
    metrics_port: int = 8090
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    # Where everything listens: Triton, the front end and all metrics. 127.0.0.1 unless
    # opened deliberately (`gem up --host`, compose inside its network).
    host: str = "127.0.0.1"
    auth_token: str | None = None


def check_ports(cfg: StackConfig) -> None:
    """Fails before starting anything if a port the stack needs is taken."""
    ports = {
        "--grpc-port": cfg.grpc_port,
        "the front end's HTTP port": cfg.http_port,
        "--metrics-port": cfg.metrics_port,
    }
    if not cfg.embedded:
        ports |= {
            "Triton's HTTP port": cfg.triton_http_port,
            "Triton's gRPC port": cfg.triton_grpc_port,
            "Triton's metrics port": cfg.triton_metrics_port,
        }
    taken = [f"{port} ({what})" for what, port in ports.items() if port_in_use(port, connect_host(cfg.host))]
    if taken:
        raise OSError(f"port(s) already in use: {', '.join(taken)}; is another stack running? (gem triton down)")


@contextlib.contextmanager
def local_stack(cfg: StackConfig) -> Iterator[str]:
    """Yields the front end's gRPC address once it answers health checks."""
    check_ports(cfg)
    with contextlib.ExitStack() as stack:
        token = {} if cfg.auth_token is None else {"auth_token": cfg.auth_token}
        if cfg.embedded:
            frontend_cfg = FrontendConfig(backend="onnxruntime", repository=cfg.repository, **token)
        else:
            triton_cfg = TritonConfig(
                repository=cfg.repository.resolve(),
                work_dir=cfg.triton_work_dir.resolve(),
                http_port=cfg.triton_http_port,
                grpc_port=cfg.triton_grpc_port,
                metrics_port=cfg.triton_metrics_port,
                host=cfg.host,
            )
            log.info("starting Triton (log: %s)", triton_cfg.log_file)
            # Supervised: restarted with backoff if it exits; `gem triton down` finds it.
            triton = stack.enter_context(SupervisedTriton(triton_cfg, owner=os.getpid()))
            frontend_cfg = FrontendConfig(triton_url=triton.cfg.grpc_url, **token)
        log.info("starting Ray Serve (%s backend)", frontend_cfg.backend)
        address = launcher.start(
            frontend_cfg,
            grpc_port=cfg.grpc_port,
            http_port=cfg.http_port,
            metrics_port=cfg.metrics_port,
            host=cfg.host,
        )
        stack.callback(launcher.stop)
        launcher.wait_healthy(address)
        yield address
