"""The `gem` commands docker-compose.yml's containers run, here without containers:
`gem health` (the front end's healthcheck) against a tiny in-process gRPC health
server, `gem bootstrap` (the one-shot that publishes a model) with training and export
stubbed, and `gem tensorrt-script` (the plan build of the `gpu` profile) run by `sh`
with a stand-in trtexec.

Then (marked stack) every service of ours by its compose command, healthcheck and
environment (tests/compose_checks.py `local_command`: container paths become host
folders, service names and container ports local addresses, 0.0.0.0 the loopback), as
local processes against a local Triton started with the flags compose's `triton`
passes (test_compose.py shows the two are the same, admin key included): `bootstrap`
(on a published repository, where it does nothing), `frontend` until its healthcheck
says SERVING and a call succeeds, `locust-master` with one `locust-worker` for a short
headless run against it, and `trainer` until its healthcheck passes (on an empty
stream: its training is test_trainer_service.py's). Not here: `trainer-gpu`,
`tensorrt-*`, the images, the network and the GPU profile (no Docker, no GPU on these
machines)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import onnx
import pytest
from gem.knowledge import KnowledgeClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from typer.testing import CliRunner

import export.tensorrt
from export.contract import ADAPTER_MODEL, FM_MODEL
from export.tensorrt import container_build, container_command, serving_profile
from export.triton_config import ServingConfig
from gem import cli
from model.schema import load_schema
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

runner = CliRunner()


# --- gem health -----------------------------------------------------------------------


@pytest.fixture
def health_server():
    """A gRPC server with only the standard health service; yields its address and servicer."""
    (port,) = free_ports(1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def gem(*args: str):
    return runner.invoke(cli.app, list(args))


def test_health_exits_0_when_serving(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = gem("health", "--address", address, "--timeout", "5")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{address}: SERVING"


def test_health_exits_1_when_not_serving(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = gem("health", "--address", address)
    assert result.exit_code == 1
    assert result.output.strip() == f"{address}: NOT_SERVING"


def test_health_exits_1_with_one_line_when_nothing_listens():
    (port,) = free_ports(1)
    result = gem("health", "--address", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), "no traceback: a plain exit"
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"127.0.0.1:{port}: UNAVAILABLE: ")


# --- gem bootstrap --------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """Stubs synthesis, training and export where trainer.bootstrap calls them; records
    what `gem bootstrap`/`gem up` ran."""
    import export.publish
    import model.checkpoint
    import model.data.synth
    import trainer.train
    from gem.cli import export as export_cli
    from gem.cli import train as train_cli

    done: list[tuple] = []

    def synth(cfg, schema, out: Path, progress=None) -> None:
        out.mkdir(parents=True)
        (out / "part-00000.parquet").touch()
        done.append(("synth", out))

    def train(cfg, progress=None):
        done.append(("train", cfg.data, cfg.out, cfg.preset))
        return SimpleNamespace(metrics={})

    def publish(checkpoint, repo, policy, control=None, progress=None):
        done.append(("export", checkpoint, repo.root, policy.data))
        return SimpleNamespace()

    monkeypatch.setattr(model.data.synth, "write_shards", synth)
    monkeypatch.setattr(trainer.train, "train", train)
    monkeypatch.setattr(model.checkpoint, "load_checkpoint", lambda path: path)
    monkeypatch.setattr(export.publish, "publish", publish)
    monkeypatch.setattr(train_cli, "metric_table", lambda metrics: "")
    monkeypatch.setattr(export_cli, "parity_table", lambda report: "")
    return done


def paths(tmp_path: Path, published: bool, checkpoint: bool) -> tuple[Path, Path, Path]:
    ckpt, data, repo = tmp_path / "ckpt", tmp_path / "data", tmp_path / "model_repo"
    repo.mkdir()
    if published:
        (repo / FM_MODEL / "1").mkdir(parents=True)
    if checkpoint:
        ckpt.mkdir()
        (ckpt / "manifest.json").write_text("{}")
    return ckpt, data, repo


def bootstrap(ckpt: Path, data: Path, repo: Path):
    return gem("bootstrap", "--checkpoint", str(ckpt), "--data", str(data), "--repo", str(repo))


def test_bootstrap_trains_and_exports_into_an_empty_repository(tmp_path, calls):
    ckpt, data, repo = paths(tmp_path, published=False, checkpoint=False)
    result = bootstrap(ckpt, data, repo)
    assert result.exit_code == 0, result.output
    assert calls == [("synth", data), ("train", data, ckpt, "small"), ("export", ckpt, repo, data)]


def test_bootstrap_exports_an_existing_checkpoint(tmp_path, calls):
    ckpt, data, repo = paths(tmp_path, published=False, checkpoint=True)
    assert bootstrap(ckpt, data, repo).exit_code == 0
    assert calls == [("export", ckpt, repo, None)]


def test_bootstrap_does_nothing_on_a_published_repository(tmp_path, calls):
    ckpt, data, repo = paths(tmp_path, published=True, checkpoint=False)
    result = bootstrap(ckpt, data, repo)
    assert result.exit_code == 0, result.output
    assert calls == [], "no checkpoint, but a published model: nothing to train"


def test_up_still_trains_a_missing_checkpoint_before_serving(tmp_path, calls, monkeypatch):
    """`gem up` runs the same bootstrap, and as before also trains a missing checkpoint
    when the repository is already published."""
    import serving.local.stack

    served = []

    @contextlib.contextmanager
    def stack(cfg):
        served.append(cfg.frontend.repository)
        yield "127.0.0.1:1"

    monkeypatch.setattr(serving.local.stack, "local_stack", stack)
    from gem.cli import serve

    monkeypatch.setattr(serve, "_ready_message", lambda *args: None)
    monkeypatch.setattr(serve, "wait_for_ctrl_c", lambda: None)
    ckpt, data, repo = paths(tmp_path, published=True, checkpoint=False)
    result = gem("up", "--checkpoint", str(ckpt), "--data", str(data), "--repo", str(repo))
    assert result.exit_code == 0, result.output
    assert calls == [("synth", data), ("train", data, ckpt, "small")]
    assert served == [repo]


# --- gem tensorrt-script ----------------------------------------------------------------


def _graph(path: Path, inputs: list, outputs: list) -> None:
    """A one-node graph with the given signature (Identity of the first input)."""
    nodes = [helper.make_node("Identity", [inputs[0].name], [outputs[0].name])]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs)), path)


@pytest.fixture
def repo(tmp_path) -> Path:
    """Version 2 of the FM (a sequence input) and version 1 of the adapter."""
    root = tmp_path / "model_repo"
    seq = helper.make_tensor_value_info("hist_item_id", TensorProto.INT64, ["B", "L"])
    user = helper.make_tensor_value_info("user_id", TensorProto.INT64, ["B"])
    _graph(root / FM_MODEL / "1" / "model.onnx", [user], [helper.make_tensor_value_info("o", TensorProto.INT64, ["B"])])
    _graph(
        root / FM_MODEL / "2" / "model.onnx",
        [seq, user],
        [helper.make_tensor_value_info("o", TensorProto.INT64, ["B", "L"])],
    )
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 2])
    _graph(
        root / ADAPTER_MODEL / "1" / "model.onnx",
        [logits],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", 2])],
    )
    return root


def fake_trtexec(path: Path, fail: bool) -> Path:
    """Writes --saveEngine's file, like trtexec, or fails."""
    body = "exit 3" if fail else 'for a; do case "$a" in --saveEngine=*) echo plan > "${a#--saveEngine=}";; esac; done'
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_tensorrt_script_is_the_export_build_for_each_model(repo, tmp_path):
    out = tmp_path / "scripts" / "build-plans.sh"
    result = gem("tensorrt-script", "--repo", str(repo), "--out", str(out))
    assert result.exit_code == 0, result.output
    script = out.read_text()
    profile = serving_profile(load_schema(), ServingConfig().max_batch_size)
    fm, adapter = repo / FM_MODEL / "2", repo / ADAPTER_MODEL / "1"
    for version_dir in (fm, adapter):
        build = container_build(repo, version_dir, profile)
        assert f"{build} || exit 1" in script.splitlines()
        # The very command `gem export --tensorrt` prints where there is no trtexec.
        assert f"sh -c '{build}'" in container_command(repo, version_dir, profile)
    assert f"hist_item_id:{profile.max_batch}x{profile.max_seq}" in script, "the schema's longest sequence"
    assert "/models/gem_fm/2/model.onnx" in script and "/models/gem_fm/1/" not in script, "the latest version"
    assert subprocess.run(["sh", "-n", str(out)]).returncode == 0


def test_tensorrt_script_builds_the_plans_and_stops_at_a_failure(repo, tmp_path, monkeypatch):
    """Run by sh, with the repository mounted where it is and a stand-in trtexec."""
    for fail in (False, True):
        monkeypatch.setattr(export.tensorrt, "CONTAINER_TRTEXEC", str(fake_trtexec(tmp_path / "trtexec", fail)))
        result = gem("tensorrt-script", "--repo", str(repo), "--mount", str(repo.resolve()))
        assert result.exit_code == 0, result.output
        run = subprocess.run(["sh", "-c", result.stdout], capture_output=True, text=True, env=os.environ)
        plans = [repo / FM_MODEL / "2" / "model.plan", repo / ADAPTER_MODEL / "1" / "model.plan"]
        if fail:
            assert run.returncode == 1
        else:
            assert run.returncode == 0, run.stderr
            assert all(p.read_text() == "plan\n" for p in plans)
            assert not list(repo.rglob(".model.plan.tmp")), "renamed into place"
            for p in plans:
                p.unlink()
    assert not any(p.exists() for p in plans), "a failed FM build stops before the adapter's"


def test_tensorrt_script_needs_a_published_model(tmp_path):
    result = gem("tensorrt-script", "--repo", str(tmp_path))
    assert result.exit_code == 2
    assert "has no version to build a plan for" in " ".join(result.output.split())  # rich wraps lines


# --- options with a fixed set of values -------------------------------------------------


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["serve", "--backend", "tritonn"], "--backend"),
        (["embed", "data", "--out", "out", "--backend", "tritonn"], "--backend"),
        (["serve", "--ingress", "sideways"], "--ingress"),
        (["serve", "--proxy-location", "Everywhere"], "--proxy-location"),
    ],
)
def test_an_unknown_choice_is_a_usage_error_naming_the_option_and_the_choices(command, option):
    """Before anything starts: exit 2, the option and what it takes, no traceback."""
    result = gem(*command)
    text = " ".join(result.output.split())  # rich wraps lines
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}" in text, text
    assert "is not one of" in text and "Traceback" not in text, text


# --- every service of ours, by its compose command, as a local process -----------------


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


@pytest.mark.stack
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
