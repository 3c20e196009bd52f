"""`gem up --embedded` end to end, as a user runs it: a process that exports a
checkpoint, brings up Ray Serve, answers `gem query` and a ranker that installed the
client package alone (a fresh venv without torch or Ray), and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serving.local.ports import free_ports

# Starts Triton and/or Ray: `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]

# A ranker's call built from GetModelInfo alone (no schema code): one user, shared, and
# three candidates; prints what came back.
RANKER = """
import importlib.util, json, sys
import numpy as np
from gem.knowledge import KnowledgeClient

missing = [m for m in ("torch", "ray", "tritonclient", "yaml") if importlib.util.find_spec(m) is None]
with KnowledgeClient(sys.argv[1], timeout_s=60) as client:
    info = client.info()
    features, shared = {}, {}
    for spec in info.inputs:
        rows = 1 if spec.side == "user" else 3
        dtype = np.int64 if spec.dtype == 1 else np.float32
        value = np.full((rows, 4) if len(spec.shape) == 2 else rows, 4 if spec.kind == "length" else 1, dtype)
        (shared if spec.side == "user" else features)[spec.name] = value
    reply = client.generate(features, shared=shared)
print(json.dumps({"missing": missing, "fm": reply.fm_version,
                  "shapes": {k: list(v.shape) for k, v in reply.outputs.items()},
                  "finite": all(bool(np.isfinite(v).all()) for v in reply.outputs.values())}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with only the client package (and what it declares) installed."""
    venv = tmp_path_factory.mktemp("client-venv")
    # A copy: building the package writes build/ beside its sources.
    source = shutil.copytree(ROOT / "client", tmp_path_factory.mktemp("client-src") / "client")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


def listeners(pids: set[int] | None) -> set[int]:
    """The ports that processes `pids` (None: any process) listen on."""
    return {
        c.laddr.port
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and (pids is None or c.pid in pids)
    }


def alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_gem_up_serves_until_ctrl_c(gem_bin, client_venv, tiny_checkpoint, synth_dir, tmp_path):
    (grpc_port,) = free_ports(1)
    address = f"127.0.0.1:{grpc_port}"
    env = {**os.environ, "COLUMNS": "200"}
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [str(gem_bin), "up", "--embedded", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_dir),
             "--repo", str(tmp_path / "repo"), "--grpc-port", str(grpc_port)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "serving gRPC at" not in log.read_text() and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert up.poll() is None and "serving gRPC at" in log.read_text(), log.read_text()[-3000:]
        query = subprocess.run(
            [str(gem_bin), "query", "--address", address, "--candidates", "2"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert query.returncode == 0, query.stderr
        assert "fm v1" in query.stdout
        ranker = subprocess.run(
            [str(client_venv / "bin" / "python"), "-c", RANKER, address],
            cwd=client_venv, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert ranker.returncode == 0, ranker.stderr[-3000:]
        reply = json.loads(ranker.stdout.splitlines()[-1])
        assert reply["missing"] == ["torch", "ray", "tritonclient", "yaml"], "the client pulled in server packages"
        assert reply["fm"] == 1 and reply["finite"]
        assert reply["shapes"]["labels"] == [3, 2] and reply["shapes"]["user_embedding"][0] == 3
        tree = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
        ports = listeners({p.pid for p in tree})
        assert grpc_port in ports, ports
        os.killpg(up.pid, signal.SIGINT)
        # Within 15 s: no process of the stack left, and nothing listening on its ports.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (alive(tree) or listeners(None) & ports):
            time.sleep(0.1)
        assert not alive(tree), f"still running 15 s after Ctrl-C: {alive(tree)}"
        assert not listeners(None) & ports, f"still listening 15 s after Ctrl-C: {listeners(None) & ports}"
        up.wait(timeout=5)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    output = log.read_text()
    assert up.returncode == 0, output[-3000:]
    assert "shutting down" in output
    assert (tmp_path / "repo" / "gem_fm" / "1" / "model.onnx").exists()


def test_gem_up_refuses_a_taken_port_before_starting_anything(gem_bin, tiny_checkpoint, published_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(gem_bin), "up", "--embedded", "--checkpoint", str(tiny_checkpoint), "--repo", str(repo),
             "--grpc-port", str(port)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"{port} (--grpc-port)" in result.stderr and "Traceback" not in result.stderr
