"""Past one machine, on one machine: a real Ray cluster of two nodes (two raylets, each
with its own object store and workers: `ray.cluster_utils.Cluster`), both on the loopback.
The front end is deployed over it with one replica per node behind Serve's proxy; a
worker node is SIGKILLed mid-traffic and the surviving replica keeps answering."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import psutil
import pytest
from gem.knowledge import KnowledgeClient

from model.examples import random_batch
from serving.config import FrontendConfig
from serving.local import launcher
from serving.local.ports import free_ports

pytestmark = pytest.mark.stack

REPLICA = "ServeReplica:gem_knowledge:KnowledgeIngress"
# After the kill: calls in this window may fail (the dead node's replica had them).
KILL_WINDOW_S = 5.0


def _raylet_of(pid: int, raylets: dict[int, str]) -> str | None:
    """Which node (by its raylet's pid) a process runs under."""
    try:
        parents = psutil.Process(pid).parents()
    except psutil.NoSuchProcess:
        return None
    return next((raylets[p.pid] for p in parents if p.pid in raylets), None)


def _replicas(raylets: dict[int, str]) -> dict[int, str]:
    """The front end's replicas on this cluster's nodes (pid: node; other agents' Rays on
    this machine have replicas of the same name)."""
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if REPLICA in " ".join(p.info["cmdline"] or [])]
    return {pid: node for pid in pids if (node := _raylet_of(pid, raylets))}


@pytest.fixture(scope="module")
def cluster():
    """The head node; each test adds (and may kill) a worker node of its own."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})  # fmt: skip
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
        raylets = {
            cluster.head_node.all_processes["raylet"][0].process.pid: "head",
            worker.all_processes["raylet"][0].process.pid: "worker",
        }
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(set(_replicas(raylets).values())) < 2:
            time.sleep(0.5)
        placed = _replicas(raylets)
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
