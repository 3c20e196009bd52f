"""Admission control on the real front end (Ray Serve, direct ingress, embedded ONNX
Runtime): driven at 3x the calls it admits, refused calls come back at once with a
retryable status and a retry-after, admitted calls succeed with finite outputs, nothing
is UNKNOWN or INTERNAL, and the client's retry policy gets every call through once the
load drops. The limits are small (serving.config.FrontendConfig) so that two cores reach
overload cheaply."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import grpc
import numpy as np
import pytest
from gem.knowledge.client import AsyncKnowledgeClient
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loadtests.probe import Probe, ProbeConfig
from loadtests.sampling import display_name, stack_pids
from model.examples import random_batch
from serving.admission import FULL
from serving.config import FrontendConfig
from serving.errors import PUSHBACK_KEY
from serving.local import launcher
from serving.local.ports import free_ports
from serving.prometheus import REFUSALS
from tests.test_loadtest import locust, poll, total
from tests.test_priority import nice_of_threads

pytestmark = pytest.mark.stack

CALLS_ADMITTED = 4
ROWS = 64
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def overloaded(published_repo, tmp_path_factory):
    """A front end that admits CALLS_ADMITTED calls of ROWS examples at once; yields
    (gRPC address, metrics URL)."""
    repo = tmp_path_factory.mktemp("overload") / "repo"
    shutil.copytree(published_repo, repo)
    grpc_port, http_port, metrics_port = free_ports(3)
    cfg = FrontendConfig(
        backend="onnxruntime",
        repository=repo,
        max_in_flight_calls=CALLS_ADMITTED,
        max_in_flight_examples=CALLS_ADMITTED * ROWS,
    )
    try:
        address = launcher.start(cfg, grpc_port, http_port, metrics_port=metrics_port)
        launcher.wait_healthy(address)
        yield address, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        launcher.stop()


async def _timed(client: AsyncKnowledgeClient, batch: dict) -> tuple[float, object]:
    start = time.perf_counter()
    try:
        reply: object = await client.generate(batch, timeout_s=DEADLINE_S)
    except grpc.aio.AioRpcError as e:
        reply = e
    return time.perf_counter() - start, reply


def test_overload_is_refused_fast_and_retryable_and_admitted_calls_succeed(overloaded, schema):
    address, metrics_url = overloaded
    batch = random_batch(schema, ROWS, 16, seed=5)

    async def drive(concurrency: int, rounds: int, retries: int) -> list[tuple[float, object]]:
        async with AsyncKnowledgeClient(address, retries=retries) as client:
            await client.info()

            async def loop():
                return [await _timed(client, batch) for _ in range(rounds)]

            runs = await asyncio.gather(*(loop() for _ in range(concurrency)))
        return [r for run in runs for r in run]

    # 3x what the front end admits, no retries: every refusal is seen.
    results = asyncio.run(drive(3 * CALLS_ADMITTED, rounds=15, retries=0))
    ok = [(s, r) for s, r in results if not isinstance(r, grpc.aio.AioRpcError)]
    refused = [(s, r) for s, r in results if isinstance(r, grpc.aio.AioRpcError)]
    codes = {r.code() for _, r in refused}
    assert codes <= {grpc.StatusCode.UNAVAILABLE}, codes
    assert ok and refused, f"{len(ok)} admitted, {len(refused)} refused: overload was not reached"
    for _, reply in ok:
        assert set(reply.outputs) >= {"labels", "embedding"}
        assert all(v.shape[0] == ROWS and np.isfinite(v).all() for v in reply.outputs.values())
    for seconds, error in refused:
        assert seconds < DEADLINE_S  # refused, not queued until the deadline
        assert "overloaded" in error.details()
        pushback = dict(error.trailing_metadata())[PUSHBACK_KEY]
        assert int(pushback) >= 1
        status = rpc_status.from_call(error)
        retry = error_details_pb2.RetryInfo()
        assert status is not None and status.details[0].Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == int(pushback)
    ms = np.array([s for s, _ in refused]) * 1e3
    admitted_ms = np.array([s for s, _ in ok]) * 1e3
    print(f"3x load: {len(ok)} admitted (p50 {np.median(admitted_ms):.1f} ms), {len(refused)} refused "
          f"(p50 {np.median(ms):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms)")  # fmt: skip

    counted = REFUSALS.exported
    samples = poll(metrics_url, lambda s: total(s, counted, reason=FULL) >= len(refused))
    assert total(samples, counted) == len(refused)

    # Bursts of 2x, each followed by quiet: the client waits out the pushback, by when
    # the load has dropped, and every call gets through within its deadline.
    async def bursts(count: int, retries: int) -> list[tuple[float, object]]:
        async with AsyncKnowledgeClient(address, retries=retries) as client:
            await client.info()
            results = []
            for _ in range(count):
                results += await asyncio.gather(*(_timed(client, batch) for _ in range(2 * CALLS_ADMITTED)))
            return results

    results = asyncio.run(bursts(3, retries=4))
    failed = [r for _, r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert not failed, [(e.code(), e.details()) for e in failed[:3]]
    assert all(np.isfinite(r.outputs["labels"]).all() for _, r in results)
    # ... and they got through by retrying: the server refused some of them.
    samples = poll(metrics_url, lambda s: total(s, counted) > len(refused))
    assert total(samples, counted) > len(refused)


def test_the_replica_runs_level_with_its_callers_and_its_inference_below(overloaded):
    """Ray starts workers at nice 15; the launcher starts the replica at 0 and its
    inference threads (the pool's and ONNX Runtime's) run inference_nice below it."""
    replicas = [p for p in stack_pids((os.getpid(),)) if display_name(p).startswith("ray::ServeReplica")]
    assert len(replicas) == 1, [display_name(p) for p in stack_pids((os.getpid(),))]
    threads = nice_of_threads(replicas[0])
    assert threads[replicas[0]] == 0, threads  # its main thread: Ray's worker loop
    lowered = [tid for tid, nice in threads.items() if nice == FrontendConfig().inference_nice]
    assert len(lowered) >= 2, threads
    assert set(threads.values()) == {0, FrontendConfig().inference_nice}, threads


def test_locust_times_refusals_apart_from_admitted_calls(overloaded, tmp_path):
    """loadtests.overload's view: with no client retries, each refusal is its own Locust
    entry (the call's entry keeps the admitted calls) and a failed call says it was refused;
    the probe beside Locust sees admitted calls and refusals, and nothing else."""
    address, _ = overloaded
    with Probe(address, ProbeConfig(candidates=ROWS)) as probe:
        done, summary = locust(
            address, tmp_path, "--run-time", "8s", "--users", str(4 * CALLS_ADMITTED), "--rate", "0",
            "--candidates", f"{ROWS},{ROWS}", "--retries", "0", "--exit-code-on-error", "0",
        )  # fmt: skip
    seen = probe.summary()
    assert seen["admitted"] > 0 and seen["refused"] > 0 and seen["failed_by_code"] == {}, seen
    assert seen["calls"] == seen["admitted"] + seen["refused"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["calls"] > 0 and summary["refused"] > 0, summary
    assert summary["failures"] == summary["refused"]  # every failure a refusal, nothing else
    assert 0 < summary["refused_p50_ms"] <= summary["refused_p99_ms"] <= summary["refused_max_ms"]
    assert summary["failed_calls"] and all(f["refused"] and f["code"] == "UNAVAILABLE" for f in summary["failed_calls"])
    assert summary["examples"] == ROWS * summary["calls"]  # examples count the admitted calls only
