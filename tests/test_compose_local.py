"""docker-compose.yml's services of ours run without Docker: each by its compose command,
healthcheck and environment (tests/compose_checks.py `local_command`: container paths
become host folders, service names and container ports local addresses, 0.0.0.0 the
loopback), as local processes, against a local Triton started with the flags compose's
`triton` passes (test_compose.py shows the two are the same, admin key included).

Exercised: `bootstrap` (on a published repository, where it does nothing), `frontend`
until its healthcheck says SERVING and a call succeeds, `locust-master` with one
`locust-worker` for a short headless run against it, and `trainer` until its
healthcheck passes (on an empty stream: its training is test_trainer_service.py's).
Not here: `trainer-gpu`, `tensorrt-*`, the images, the network and the GPU profile
(no Docker, no GPU on these machines)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gem.knowledge import KnowledgeClient

from serving.backends.triton_client import ADMIN_KEY_ENV
from serving.local.ports import free_ports
from serving.local.triton import TritonConfig, TritonServer
from tests.compose_checks import (
    ROOT,
    admin_key,
    healthcheck_argv,
    load,
    local_command,
    local_environment,
    resolved,
    services,
    workdir,
)

pytestmark = pytest.mark.stack

BIN = Path(sys.executable).parent
# A short load run, through the variables compose passes on to the Locust master.
LOAD = {"LOCUST_WORKERS": "1", "LOCUST_USERS": "2", "LOCUST_SPAWN_RATE": "2", "LOCUST_RUN_TIME": "6s"}


def run_env(service: dict, **extra: str) -> dict[str, str]:
    # The image installs the project; here the checkout is on the path instead.
    return {**os.environ, **local_environment(service, LOAD), "PYTHONPATH": str(ROOT), **extra}


def program(argv: list[str]) -> list[str]:
    """The image's console scripts are this environment's."""
    return [str(BIN / argv[0]), *argv[1:]]


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A long-running service, stopped as `docker compose down` stops it (SIGTERM to
    its group, then SIGKILL), also when the test fails."""
    with log.open("w") as out:
        p = subprocess.Popen(
            program(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield p
    finally:
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait_s)
                break


def healthy(argv: list[str], env: dict[str, str], cwd: Path, p: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Polls the service's compose healthcheck until it passes, failing early if the
    service exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert p.poll() is None, f"exited with {p.returncode}:\n{log.read_text()[-3000:]}"
        if subprocess.run(program(argv), env=env, cwd=cwd, capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"healthcheck {argv} never passed:\n{log.read_text()[-3000:]}")


def test_our_compose_services_run_as_local_processes(published_repo, tmp_path):
    compose, problems = resolved(load(), LOAD)
    assert problems == []
    svc = services(compose)
    key, problems = admin_key(compose)
    assert problems == [] and key
    # The image's working directory, with what the services read from it and the bind mounts they write.
    app = tmp_path / "app"
    (app / "artifacts" / "loadtest").mkdir(parents=True)
    (app / "loadtests").symlink_to(ROOT / "loadtests")
    repo, checkpoints = tmp_path / "model_repo", tmp_path / "checkpoints"
    shutil.copytree(published_repo, repo)
    checkpoints.mkdir()
    at = {"/models": repo, "/app/artifacts/checkpoints": checkpoints, str(workdir()): app}
    triton_http, triton_grpc, triton_metrics, grpc_port, metrics_port, master_port, trainer_port = free_ports(7)
    triton_cfg = TritonConfig(repo, tmp_path / "triton", triton_http, triton_grpc, triton_metrics, admin_key=key)
    addresses = {
        "triton:8001": f"127.0.0.1:{triton_grpc}",
        "50051": str(grpc_port),
        "8090": str(metrics_port),
        "127.0.0.1:50051": f"127.0.0.1:{grpc_port}",
        "frontend:50051": f"127.0.0.1:{grpc_port}",
        "locust-master": "127.0.0.1",
        "8091": str(trainer_port),
    }

    def command(name: str) -> list[str]:
        return local_command(svc[name]["command"], at, addresses)

    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    done = subprocess.run(program(command("bootstrap")), env=run_env(svc["bootstrap"]), cwd=app, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before, "a published repository is left as it is"

    with TritonServer(triton_cfg):
        frontend_env, frontend_log = run_env(svc["frontend"]), tmp_path / "frontend.log"
        with process(command("frontend"), frontend_env, app, frontend_log) as frontend:
            check = local_command(healthcheck_argv(svc["frontend"]) or [], at, addresses)
            healthy(check, frontend_env, app, frontend, frontend_log, timeout_s=300)
            with KnowledgeClient(f"127.0.0.1:{grpc_port}", timeout_s=30) as client:
                info = client.info()
            # The FM's inputs, which the front end reads from Triton's model config.
            assert info.backend == "triton" and info.inputs
            # The Locust master's own port is fixed in Locust (5557, all interfaces): moved
            # to a free one on the loopback, through Locust's variables.
            bind = {"LOCUST_MASTER_BIND_HOST": "127.0.0.1", "LOCUST_MASTER_BIND_PORT": str(master_port)}
            master_env = run_env(svc["locust-master"], **bind)
            worker_env = run_env(svc["locust-worker"], LOCUST_MASTER_NODE_PORT=str(master_port))
            with process(command("locust-worker"), worker_env, app, tmp_path / "worker.log"):
                master = subprocess.run(
                    program(command("locust-master")),
                    env=master_env,
                    cwd=app,
                    capture_output=True,
                    text=True,
                    timeout=240,
                )
            assert master.returncode == 0, master.stderr[-6000:] + (tmp_path / "worker.log").read_text()[-3000:]
        # The side trainer (two gloo processes, a fresh `small` FM: bootstrap trained none
        # here) waits for shards on an empty stream; its healthcheck asks its metrics.
        (app / "artifacts" / "stream").mkdir()
        trainer_env, trainer_log = run_env(svc["trainer"]), tmp_path / "trainer.log"
        assert trainer_env[ADMIN_KEY_ENV] == key
        with process(command("trainer"), trainer_env, app, trainer_log) as trainer:
            check = local_command(healthcheck_argv(svc["trainer"]) or [], at, addresses)
            healthy(check, trainer_env, app, trainer, trainer_log, timeout_s=300)
    summary = json.loads((app / "artifacts" / "loadtest" / "summary.json").read_text())
    assert summary["calls"] > 0 and summary["failures"] == 0, summary
