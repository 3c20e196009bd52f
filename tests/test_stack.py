"""`gem up --embedded` end to end, as a user runs it: a process that exports a
checkpoint, brings up Ray Serve, answers `gem query`, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from serving.net import free_ports
from tests.test_triton_server import GEM_BIN


def test_gem_up_serves_until_ctrl_c(tiny_checkpoint, synth_dir, tmp_path):
    (grpc_port,) = free_ports(1)
    address = f"127.0.0.1:{grpc_port}"
    env = {**os.environ, "COLUMNS": "200"}
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [str(GEM_BIN), "up", "--embedded", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_dir),
             "--repo", str(tmp_path / "repo"), "--grpc-port", str(grpc_port)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "serving gRPC at" not in log.read_text() and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert up.poll() is None and "serving gRPC at" in log.read_text(), log.read_text()[-3000:]
        query = subprocess.run(
            [str(GEM_BIN), "query", "--address", address, "--candidates", "2"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert query.returncode == 0, query.stderr
        assert "fm v1" in query.stdout
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=120)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    output = log.read_text()
    assert up.returncode == 0, output[-3000:]
    assert "shutting down" in output
    assert (tmp_path / "repo" / "gem_fm" / "1" / "model.onnx").exists()


def test_gem_up_refuses_a_taken_port_before_starting_anything(tiny_checkpoint, published_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(GEM_BIN), "up", "--embedded", "--checkpoint", str(tiny_checkpoint), "--repo", str(repo),
             "--grpc-port", str(port)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"{port} (--grpc-port)" in result.stderr and "Traceback" not in result.stderr
