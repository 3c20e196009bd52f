"""Against a real tritonserver process (the nvidia-pytriton wheel's binary): inference
parity, concurrent merged batches, malformed requests, hot version switch under load,
a corrupt version, and the `gem triton` / `gem export` commands."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from export.rollout import roll_out
from model.checkpoint import load_checkpoint
from model.examples import random_batch
from model.outputs import FM_OUTPUTS
from model.user_index import graph_feeds
from serving.backends.errors import BackendUnavailable, InvalidRequest
from serving.backends.triton_client import TritonClient
from serving.local.ports import free_ports
from serving.local.triton import TritonError, TritonServer

# Starts Triton and/or Ray: `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack


@pytest.fixture
def repo(published_repo, tmp_path) -> ModelRepository:
    shutil.copytree(published_repo, tmp_path / "repo")
    return ModelRepository(tmp_path / "repo")


@pytest.fixture
def server(triton_config, repo, tmp_path):
    with TritonServer(triton_config(repo.root, tmp_path / "triton")) as server:
        yield server


def run(coro):
    return asyncio.run(coro)


async def infer(server, batch, **kw):
    async with TritonClient(server.cfg.grpc_url) as client:
        return await client.infer(batch, **kw)


def test_ensemble_equals_onnx_runtime_and_pytorch(server, repo, tiny_checkpoint, schema):
    ckpt = load_checkpoint(tiny_checkpoint)
    batch = random_batch(schema, 50, 24, seed=11)
    out = run(infer(server, batch))
    session = ort.InferenceSession(str(repo.root / FM_MODEL / "1" / "model.onnx"))
    feeds = graph_feeds(batch, session.get_inputs())
    for name, want in zip(FM_OUTPUTS, session.run(list(FM_OUTPUTS), feeds), strict=True):
        np.testing.assert_allclose(out[name], want, atol=1e-5, err_msg=name)
    with torch.no_grad():
        torch_out = ckpt.model({k: torch.from_numpy(v) for k, v in batch.items()})
        adapted = ckpt.adapter(torch_out["logits"], torch.from_numpy(batch["surface"]))
    for name in FM_OUTPUTS:
        np.testing.assert_allclose(out[name], torch_out[name].numpy(), atol=1e-4, err_msg=name)
    # The ensemble's adapted labels are the adapter applied to the FM's logits.
    np.testing.assert_allclose(out["adapted_logits"], adapted.numpy(), atol=1e-4)
    assert not np.allclose(out["adapted_logits"], out["logits"], atol=1e-3), "adapter must not be the identity"
    assert (out["fm_version"] == 1).all() and (out["adapter_version"] == 1).all()


def test_concurrent_calls_of_different_shapes_get_their_own_rows(server, repo, schema):
    session = ort.InferenceSession(str(repo.root / FM_MODEL / "1" / "model.onnx"))
    batches = [random_batch(schema, rows, length, seed=i) for i, (rows, length) in enumerate(
        [(1, 1), (3, 64), (200, 17), (17, 2), (64, 128), (5, 5), (128, 32), (9, 1)] * 3
    )]  # fmt: skip

    async def all_at_once():
        async with TritonClient(server.cfg.grpc_url) as client:
            return await asyncio.gather(*(client.infer(b, outputs=("logits",)) for b in batches))

    for batch, out in zip(batches, run(all_at_once()), strict=True):
        (want,) = session.run(["logits"], graph_feeds(batch, session.get_inputs()))
        np.testing.assert_allclose(out["logits"], want, atol=1e-5)


def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(server, schema):
    good = random_batch(schema, 4, 3)
    wrong_dtype = {**good, "user_id": good["user_id"].astype(np.float32)}
    wrong_shape = {**good, "hist_item_id": good["hist_item_id"][:, :, None]}
    missing = {k: v for k, v in good.items() if k != "ad_id"}
    for bad, match in ((wrong_dtype, "user_id.*INT64"), (wrong_shape, "hist_item_id"), (missing, "ad_id")):
        with pytest.raises(InvalidRequest, match=match):
            run(infer(server, bad))
    with pytest.raises(BackendUnavailable, match="unknown model"):
        run(infer(server, good, model="no_such_model"))
    assert run(infer(server, good))["logits"].shape == (4, len(schema.tasks))


def test_new_version_switches_under_load_without_a_failed_call(server, repo, schema):
    batch = random_batch(schema, 32, 16)

    async def scenario():
        async with TritonClient(server.cfg.grpc_url) as client:
            seen, failures, stop = [], [], asyncio.Event()  # seen: (call start, version)

            async def caller():
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        out = await client.infer(batch, outputs=("fm_version",))
                        seen.append((start, int(out["fm_version"][0, 0])))
                    except Exception as e:  # counted, the test asserts none
                        failures.append(e)

            callers = [asyncio.create_task(caller()) for _ in range(4)]
            while len(seen) < 20:
                await asyncio.sleep(0.05)
            repo.publish(FM_MODEL, repo.root / FM_MODEL / "1" / "model.onnx")
            rollout = await roll_out(client, repo, FM_MODEL, keep=1)
            switched = time.monotonic()
            while sum(start > switched for start, _ in seen) < 20:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*callers)
            return rollout, seen, failures, switched

    rollout, seen, failures, switched = run(scenario())
    assert rollout.loaded and rollout.version == 2
    assert failures == []
    assert {v for start, v in seen if start < seen[10][0]} == {1}
    assert {v for start, v in seen if start > switched} == {2}, "calls sent after the switch use the new version"
    assert repo.versions(FM_MODEL) == [1, 2], "the old version stays loaded for pinned calls"


def test_corrupt_version_is_rejected_and_the_serving_version_stays(server, repo, schema):
    batch = random_batch(schema, 8, 4)
    published = repo.publish(FM_MODEL, repo.root / FM_MODEL / "1" / "model.onnx")
    (published.path / "model.onnx").write_bytes(b"\x00garbage")
    rollout = run(_roll_out(server, repo))
    assert not rollout.loaded and "model.onnx" in rollout.reason
    assert repo.versions(FM_MODEL) == [1]
    assert (repo.root / FM_MODEL / ".rejected" / "2" / "REASON").exists()
    out = run(infer(server, batch))
    assert (out["fm_version"] == 1).all()


async def _roll_out(server, repo):
    async with TritonClient(server.cfg.grpc_url) as client:
        return await roll_out(client, repo, FM_MODEL, keep=3)


def test_stopped_server_is_unavailable_and_start_refuses_a_taken_port(triton_config, repo, tmp_path, schema):
    cfg = triton_config(repo.root, tmp_path / "triton")
    with TritonServer(cfg) as server:
        with pytest.raises(TritonError, match="already answers"):
            TritonServer(cfg).start()
        pid = server.process.pid
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    with pytest.raises(BackendUnavailable):
        run(infer(server, random_batch(schema, 2, 2)))


def test_start_fails_fast_with_the_log_when_a_model_cannot_load(triton_config, repo, tmp_path):
    (repo.root / ADAPTER_MODEL / "1" / "model.onnx").write_bytes(b"broken")
    with pytest.raises(TritonError, match="exited with code") as e:
        TritonServer(triton_config(repo.root, tmp_path / "triton")).start()
    assert "student_adapter" in str(e.value)


def test_gem_triton_up_status_down(gem, repo, tmp_path):
    http, grpc, metrics = free_ports(3)
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    up = gem("triton", "up", "--repo", str(repo.root), *ports, cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        status = gem("triton", "status", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert "gem_knowledge" in status.stdout and "READY" in status.stdout
    finally:
        down = gem("triton", "down", cwd=tmp_path)
    assert down.returncode == 0 and "stopped Triton" in down.stderr
    after = gem("triton", "status", cwd=tmp_path)
    assert after.returncode == 2 and "Traceback" not in after.stderr


def test_gem_export_publishes_and_loads_into_a_running_triton(gem, server, repo, tiny_checkpoint, tmp_path):
    result = gem(
        "export", "--checkpoint", str(tiny_checkpoint), "--repo", str(repo.root), "--load", server.cfg.grpc_url,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "max |diff|" in result.stdout and "gem_fm" in result.stdout
    assert repo.versions(FM_MODEL) == [1, 2] and repo.versions(ADAPTER_MODEL) == [1, 2]
    out = run(infer(server, random_batch(load_checkpoint(tiny_checkpoint).schema, 3, 3)))
    assert (out["fm_version"] == 2).all() and (out["adapter_version"] == 2).all()


def test_gem_export_of_a_corrupt_checkpoint_is_one_line(gem, tiny_checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.pt").write_bytes(b"nope")
    result = gem("export", "--checkpoint", str(broken), "--repo", str(tmp_path / "repo"), cwd=tmp_path)
    assert result.returncode == 2
    assert "model.pt is corrupt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "repo").exists()
