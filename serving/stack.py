"""The local stack behind `gem up`: Triton (unless embedded) and the Ray Serve front end
on this machine, started in order, checked healthy, stopped in reverse order."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serving import frontend
from serving.config import FrontendConfig
from serving.triton.server import TritonConfig, TritonServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    repository: Path
    triton_work_dir: Path
    embedded: bool = False
    grpc_port: int = 50051
    http_port: int = 8080
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002


@contextlib.contextmanager
def local_stack(cfg: StackConfig) -> Iterator[str]:
    """Yields the front end's gRPC address once it answers health checks."""
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
        address = frontend.start(frontend_cfg, grpc_port=cfg.grpc_port, http_port=cfg.http_port)
        stack.callback(frontend.stop)
        frontend.wait_healthy(address)
        yield address
