"""Past one machine, on one machine: a real Ray cluster of two nodes (two raylets, each
with its own object store and workers: `ray.cluster_utils.Cluster`), both on the loopback.
The front end is deployed over it with one replica per node behind Serve's proxy; a
worker node is SIGKILLed mid-traffic and the surviving replica keeps answering. `gem embed`
runs as a Ray job (the Jobs SDK, through the head's dashboard) over both nodes, the worker
node is SIGKILLed mid-job, and the output is every row once, equal to a single-node run."""

from __future__ import annotations

import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import ray
from gem.knowledge import KnowledgeClient

from jobs.embed import EmbedConfig, run_embed
from model.data.reader import resolve_paths
from model.examples import random_batch
from serving.config import FrontendConfig
from serving.local import launcher
from serving.local.ports import free_ports

pytestmark = pytest.mark.stack

REPLICA = "ServeReplica:gem_knowledge:KnowledgeIngress"
STAMPER = "MapWorker(MapBatches(KnowledgeStamper))"
# After the kill: calls in this window may fail (the dead node's replica had them).
KILL_WINDOW_S = 5.0


def _raylet_of(pid: int, raylets: dict[int, str]) -> str | None:
    """Which node (by its raylet's pid) a process runs under."""
    try:
        parents = psutil.Process(pid).parents()
    except psutil.NoSuchProcess:
        return None
    return next((raylets[p.pid] for p in parents if p.pid in raylets), None)


def _actors(name: str, raylets: dict[int, str]) -> dict[int, str]:
    """The Ray actors called `name` on this cluster's nodes (pid: node; other Rays on this
    machine have actors of the same name)."""
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if name in " ".join(p.info["cmdline"] or [])]
    return {pid: node for pid in pids if (node := _raylet_of(pid, raylets))}


def _raylets(cluster, worker) -> dict[int, str]:
    return {
        cluster.head_node.all_processes["raylet"][0].process.pid: "head",
        worker.all_processes["raylet"][0].process.pid: "worker",
    }


@pytest.fixture(scope="module")
def cluster():
    """The head node; each test adds (and may kill) a worker node of its own."""
    from ray.cluster_utils import Cluster

    (dashboard,) = free_ports(1)
    # The dashboard takes the Jobs API. 4 CPUs on the head: after the worker node dies it
    # holds the embed job's whole actor pool and its read tasks.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": True, "dashboard_host": "127.0.0.1",
                                                      "dashboard_port": dashboard})  # fmt: skip
    c.dashboard_url = f"http://127.0.0.1:{dashboard}"
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def worker(cluster):
    node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        yield node
    finally:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)


def test_replicas_on_both_nodes_and_a_killed_node_leaves_the_other_answering(
    cluster, worker, published_repo, schema, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    grpc_port, http_port = free_ports(2)
    cfg = FrontendConfig(backend="onnxruntime", repository=repo)
    # HeadOnly: both nodes share this machine's ports, so only one proxy can have them.
    address = launcher.start(cfg, grpc_port=grpc_port, http_port=http_port, replicas=2, ingress="proxy",
                             address=cluster.address, replicas_per_node=1, proxy_location="HeadOnly")  # fmt: skip
    try:
        launcher.wait_healthy(address, timeout_s=300)
        raylets = _raylets(cluster, worker)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(set(_actors(REPLICA, raylets).values())) < 2:
            time.sleep(0.5)
        placed = _actors(REPLICA, raylets)
        assert sorted(placed.values()) == ["head", "worker"], f"one replica per node: {placed}"

        batch = random_batch(schema, 4, 3, seed=5)
        # What rankers see: the client package, its retries as shipped.
        with KnowledgeClient(address, timeout_s=20) as client:
            want = client.generate(batch).outputs["labels"]
            results: list[tuple[float, str]] = []
            stop = threading.Event()

            def traffic():
                while not stop.is_set():
                    try:
                        got = client.generate(batch).outputs["labels"]
                        results.append((time.monotonic(), "OK" if np.allclose(got, want, atol=1e-6) else "WRONG"))
                    except grpc.RpcError as e:
                        results.append((time.monotonic(), e.code().name))

            thread = threading.Thread(target=traffic, daemon=True)
            thread.start()
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and sum(r == "OK" for _, r in results) < 20:
                    time.sleep(0.1)
                cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: the node's raylet, store and workers
                killed = time.monotonic()
                deadline = killed + 120
                while (
                    time.monotonic() < deadline
                    and sum(r == "OK" for t, r in results if t > killed + KILL_WINDOW_S) < 20
                ):
                    time.sleep(0.1)
            finally:
                stop.set()
                thread.join(timeout=30)
        before = [r for t, r in results if t <= killed]
        window = [r for t, r in results if killed < t <= killed + KILL_WINDOW_S]
        after = [r for t, r in results if t > killed + KILL_WINDOW_S]
        assert before and set(before) == {"OK"}, f"before the kill: {set(before)}"
        assert sum(r == "OK" for r in after) >= 20 and set(after) == {"OK"}, f"after the kill: {after[-20:]}"
        failed = [r for r in window if r != "OK"]
        print(f"killed the worker node: {len(failed)} of {len(window)} call(s) failed in the next "
              f"{KILL_WINDOW_S:.0f} s ({sorted(set(failed))}), {len(after)} OK after")  # fmt: skip
        assert "WRONG" not in window, "a reply that differs from the model's"
        assert set(failed) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, failed
    finally:
        launcher.stop()


def test_embed_as_a_ray_job_over_both_nodes_survives_a_killed_node(
    cluster, worker, published_repo, synth_dir, tmp_path
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tests.test_embed import assert_same_rows, read_out

    out = tmp_path / "out"
    gem = Path(sys.executable).parent / "gem"
    # `--address auto`: the cluster the job runs on (Ray sets RAY_ADDRESS for the entrypoint).
    entrypoint = shlex.join([str(gem), "embed", str(synth_dir), "--out", str(out), "--repo", str(published_repo),
                             "--address", "auto", "--actors", "2", "--batch-size", "256"])  # fmt: skip
    jobs = JobSubmissionClient(cluster.dashboard_url)
    job = jobs.submit_job(entrypoint=entrypoint)
    raylets = _raylets(cluster, worker)
    finished = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    killed_with: set[str] = set()
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and jobs.get_job_status(job) not in finished:
            # Mid-job: the worker node holds one of the pool's actors and parts are staged.
            if not killed_with and any(out.glob(".staging/*/*/data/part-*")):
                killed_with = set(_actors(STAMPER, raylets).values())
                cluster.remove_node(worker, allow_graceful=False)
            time.sleep(0.2)
        status = jobs.get_job_status(job)
        assert status == JobStatus.SUCCEEDED, f"{status}: {jobs.get_job_logs(job)[-2000:]}"
    finally:
        if jobs.get_job_status(job) not in finished:
            jobs.stop_job(job)
    assert killed_with == {"head", "worker"}, f"the pool's actors ran on {killed_with} at the kill"
    reference = tmp_path / "single-node"
    try:
        run_embed(EmbedConfig(source=str(synth_dir), out=reference, repository=published_repo, batch_size=4096))
    finally:
        ray.shutdown()
    for path in resolve_paths(synth_dir):
        got = read_out(out / path.stem)
        assert len(set(got["example_id"].to_pylist())) == got.num_rows, f"{path.name}: a row twice"
        assert_same_rows(got, read_out(reference / path.stem), path.name)
    assert not (out / ".staging").exists()
