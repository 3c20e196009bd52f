"""JSON logs on request (`gem --log-format json`): the CLI's lines, and Ray Serve's with
each call's request id, which the front end also returns in the call's trailing metadata."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import grpc
import pytest
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.v1 import knowledge_pb2_grpc as pb_grpc
from gem.knowledge.wire import encode

from model.examples import random_batch
from serving.local.logs import JSONFormatter
from serving.local.ports import free_ports
from tests.stack_support import gem_up


def test_json_formatter_writes_one_object_with_the_extras():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("gem.test").makeRecord(
            "gem.test",
            logging.ERROR,
            __file__,
            1,
            "call %s failed",
            ("r-1",),
            sys.exc_info(),
            extra={"request_id": "r-1"},
        )
    doc = json.loads(JSONFormatter().format(record))
    assert doc["level"] == "ERROR" and doc["logger"] == "gem.test" and doc["message"] == "call r-1 failed"
    assert doc["request_id"] == "r-1" and "ValueError: boom" in doc["exception"] and doc["ts"].endswith("Z")


def test_cli_logs_json_lines_and_refuses_an_unknown_format(gem, tmp_path):
    done = gem("--log-format", "json", "triton", "down", "--work-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert any("no Triton was started" in line["message"] for line in lines), done.stderr
    env_chosen = gem("triton", "down", "--work-dir", str(tmp_path), env={"GEM_LOG_FORMAT": "json"})
    assert json.loads(env_chosen.stderr.splitlines()[0])["level"] == "INFO"
    bad = gem("--log-format", "xml", "triton", "down", "--work-dir", str(tmp_path))
    assert bad.returncode == 2 and "--log-format" in bad.stderr and "Traceback" not in bad.stderr


def _json(line: str, path: Path) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        raise AssertionError(f"not a JSON line of {path.name}: {line[:300]!r}") from None


@pytest.mark.stack
def test_serve_logs_json_with_the_callers_request_id(tiny_checkpoint, published_repo, schema, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    grpc_port, http_port, metrics_port = free_ports(3)
    log = tmp_path / "up.log"
    with gem_up("--log-format", "json", "up", "--embedded", "--checkpoint", str(tiny_checkpoint),
                "--repo", str(repo), "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                "--metrics-port", str(metrics_port), cwd=tmp_path, log=log) as ray_tmp:  # fmt: skip
        stub = pb_grpc.KnowledgeServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        request = pb.GenerateRequest(features={k: encode(v) for k, v in random_batch(schema, 3, 2).items()})
        _, call = stub.Generate.with_call(request, timeout=60, metadata=[("request_id", "ranker-42-abc")])
        assert ("request_id", "ranker-42-abc") in call.trailing_metadata()
        # Serve's access line of the call, in JSON, with its request id (written within seconds).
        found, deadline = [], time.monotonic() + 30
        while not found and time.monotonic() < deadline:
            for path in ray_tmp.rglob("logs/serve/replica_*.log"):
                for line in path.read_text(errors="replace").splitlines():
                    if "ranker-42-abc" in line:
                        found.append(_json(line, path))
            time.sleep(0.5)
        assert found and all(doc["request_id"] == "ranker-42-abc" for doc in found), list(ray_tmp.rglob("*.log"))
        ours = [line for line in log.read_text().splitlines() if line.startswith("{")]
        assert ours and all(_json(line, log)["message"] for line in ours), "gem up's own lines are JSON"
