"""The local stack behind `gem up`: Triton (unless embedded) and the Ray Serve front end
on this machine, started in order, checked healthy, stopped in reverse order."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serving import launcher
from serving.config import FrontendConfig
from serving.net import port_in_use
from serving.triton.server import TritonConfig, TritonServer

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
    taken = [f"{port} ({what})" for what, port in ports.items() if port_in_use(port)]
    if taken:
        raise OSError(f"port(s) already in use: {', '.join(taken)}; is another stack running? (gem triton down)")


@contextlib.contextmanager
def local_stack(cfg: StackConfig) -> Iterator[str]:
    """Yields the front end's gRPC address once it answers health checks."""
    check_ports(cfg)
    with contextlib.ExitStack() as stack:
        if cfg.embedded:
            frontend_cfg = FrontendConfig(backend="onnxruntime", repository=cfg.repository)
        else:
            triton_cfg = TritonConfig(
                repository=cfg.repository,
                work_dir=cfg.triton_work_dir,
                http_port=cfg.triton_http_port,
                grpc_port=cfg.triton_grpc_port,
                metrics_port=cfg.triton_metrics_port,
            )
            log.info("starting Triton (log: %s)", triton_cfg.log_file)
            stack.enter_context(TritonServer(triton_cfg))
            frontend_cfg = FrontendConfig(triton_url=triton_cfg.grpc_url)
        log.info("starting Ray Serve (%s backend)", frontend_cfg.backend)
        address = launcher.start(
            frontend_cfg, grpc_port=cfg.grpc_port, http_port=cfg.http_port, metrics_port=cfg.metrics_port
        )
        stack.callback(launcher.stop)
        launcher.wait_healthy(address)
        yield address
