"""The data plane's batcher on the real embedded backend: merged batches run side by
side up to `concurrent_batches`, and every call still gets its own rows back."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from ray import serve

from model.examples import random_batch
from model.features import user_input_names
from model.outputs import FM_OUTPUTS
from serving.backends.onnx import OnnxBackend
from serving.config import FrontendConfig
from serving.dataplane import Call, DataPlane
from serving.prometheus import FrontendMetrics

DEADLINE_S = 30.0


async def until(condition, what: str) -> None:
    """Yield to the loop until `condition()` holds, or fail after DEADLINE_S."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {DEADLINE_S:g}s: {what}")
        await asyncio.sleep(0.005)


def test_merged_batches_run_side_by_side(published_repo, schema, monkeypatch):
    # Serve's batch queue reads its replica's max_ongoing_requests, only to warn when
    # batches cannot fill; outside a replica it has none, so this test hands it the
    # value serving/serve_config.yaml gives. The batcher itself is Serve's own.
    deployment = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=1024))
    monkeypatch.setattr(serve, "get_replica_context", lambda: deployment)
    backend = OnnxBackend(published_repo)
    infer, running, most, release = backend.infer, [0], [0], asyncio.Event()

    async def held(batch, outputs, timeout_s=None, chunk=None, fm_version=None):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            await release.wait()  # every run stays in flight until the test lets go
            return await infer(batch, outputs, timeout_s, chunk, fm_version)
        finally:
            running[0] -= 1

    backend.infer = held  # type: ignore[method-assign]  # observes the real backend's runs
    cfg = FrontendConfig(backend="onnxruntime", repository=published_repo, concurrent_batches=2)
    plane = DataPlane(backend, cfg, FrontendMetrics("t"), user_input_names(schema))
    calls = [Call(random_batch(schema, 2 + i, 4, seed=i), FM_OUTPUTS) for i in range(3)]

    async def scenario():
        # The first call finds nothing in flight and runs alone; each later one finds
        # company and goes to the batcher, whose batches are held until released.
        tasks = []
        for i, call in enumerate(calls):
            tasks.append(asyncio.create_task(plane.run(call, DEADLINE_S)))
            await until(lambda n=i + 1: running[0] == n, f"{i + 1} backend runs in flight")
        release.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert most[0] == 3, "the lone call and two batches side by side"
    for call, knowledge in zip(calls, results, strict=True):
        assert not isinstance(knowledge, Exception), knowledge
        want = backend.run(call.batch, FM_OUTPUTS)
        for name in FM_OUTPUTS:
            np.testing.assert_allclose(knowledge.outputs[name], want.outputs[name], rtol=1e-5, atol=1e-6)


def test_concurrent_batches_below_one_is_refused(published_repo):
    with pytest.raises(ValueError, match="concurrent_batches must be at least 1"):
        FrontendConfig(backend="onnxruntime", repository=published_repo, concurrent_batches=0)
