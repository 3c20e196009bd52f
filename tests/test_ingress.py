"""Both ingresses of the front end (serving/local/launcher.py): the replica's own gRPC
server (direct ingress, the default) refuses what Serve's gRPC proxy refuses, with the
same statuses, a killed replica is replaced on the same port, and stopping either
leaves no listener behind."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import psutil
import pytest
from gem.knowledge.v1 import knowledge_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.config import INGRESSES, FrontendConfig
from serving.local import launcher
from serving.local.ports import free_ports, port_in_use
from tests.test_hostile import AUTH, GENERATE, INFO, TOKEN, good_batch, raw_call, request, varint

pytestmark = pytest.mark.stack

CALLER_DEADLINE_S = 0.01
REPLICA, PROXY = "ServeReplica:", "ProxyActor"
OK = grpc.StatusCode.OK


def cases(info: pb.GetModelInfoResponse) -> dict[str, tuple[str, bytes, list, float, grpc.StatusCode]]:
    """name -> (method, request bytes, metadata, caller deadline, the status both ingresses give)."""
    valid = request(good_batch(info, 4, 3, seed=1)).SerializeToString()
    oversized = valid + b"\x7a" + varint(40 << 20) + b"\0" * (40 << 20)  # a 40 MB unknown field
    big = request(good_batch(info, 1000, 64, seed=9)).SerializeToString()
    invalid, unauthenticated = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED
    late = grpc.StatusCode.DEADLINE_EXCEEDED
    return {
        "good call": (GENERATE, valid, AUTH, 60.0, grpc.StatusCode.OK),
        "oversized": (GENERATE, oversized, AUTH, 60.0, grpc.StatusCode.RESOURCE_EXHAUSTED),
        "malformed Generate": (GENERATE, b"\x08" + b"\xff" * 11, AUTH, 60.0, invalid),
        "malformed GetModelInfo": (INFO, b"\xff\xff", AUTH, 60.0, invalid),
        "no token": (GENERATE, valid, [], 60.0, unauthenticated),
        "wrong token": (GENERATE, valid, [("authorization", "Bearer nope")], 60.0, unauthenticated),
        "malformed without a token": (GENERATE, b"\xff\xff\xff", [], 60.0, unauthenticated),
        "server-side deadline 1 ms": (GENERATE, big, [*AUTH, ("gem-timeout-ms", "1")], 60.0, late),
        "caller deadline 10 ms": (GENERATE, big, AUTH, CALLER_DEADLINE_S, late),
    }


def kill_replica(app: str) -> None:
    """Kills the replica of `app` and returns once its process is gone."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]
    (process,) = [
        p for p in psutil.process_iter(["cmdline"]) if f"ServeReplica:{app}:" in " ".join(p.info["cmdline"] or ())
    ]
    ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
    # ray.kill returns at once: wait for the process, so that what answers next is the new replica.
    _, alive = psutil.wait_procs([process], timeout=30)
    assert not alive, "the killed replica is still running"


def listener(port: int) -> str:
    """The process title of what listens on `port` (Ray names its actors' processes)."""
    pids = {
        c.pid for c in psutil.net_connections(kind="inet") if c.laddr.port == port and c.status == psutil.CONN_LISTEN
    }
    return " ".join(" ".join(psutil.Process(pid).cmdline()) for pid in pids if pid)


def listening(ports: list[int]) -> list[int]:
    return [p for p in ports if port_in_use(p)]


@pytest.mark.parametrize("ingress", INGRESSES)
def test_ingress_refuses_like_the_proxy_and_leaves_nothing_behind(ingress, published_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    grpc_port, http_port = free_ports(2)
    cfg = FrontendConfig(backend="onnxruntime", repository=repo, auth_token=TOKEN, max_examples_per_call=1000)
    try:
        address = launcher.start(cfg, grpc_port=grpc_port, http_port=http_port, ingress=ingress)
        assert address == f"127.0.0.1:{grpc_port}"
        launcher.wait_healthy(address)
        assert launcher.address_of(launcher.APP_NAME) == address
        # Who answers the public port: the replica itself, or Serve's proxy.
        assert (REPLICA if ingress == "direct" else PROXY) in listener(grpc_port)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        info = pb.GetModelInfoResponse.FromString(raw_call(address, INFO, b"", AUTH)[2])
        got = {}
        for name, (method, payload, metadata, timeout, want) in cases(info).items():
            code, details, reply = raw_call(address, method, payload, metadata, timeout)
            got[name] = (code, want, details[:200])
            if code == grpc.StatusCode.OK:
                outputs = pb.GenerateResponse.FromString(reply).outputs
                assert all(np.isfinite(np.frombuffer(t.data, np.float32)).all() for t in outputs.values())
        print(f"\n{ingress}:", "\n".join(f"  {n}: {c.name} ({d})" for n, (c, _, d) in got.items()))
        assert {n: c for n, (c, _, _) in got.items()} == {n: w for n, (_, w, _) in got.items()}
        # A replica that dies is replaced by Serve, and the new one answers the same port.
        kill_replica(launcher.APP_NAME)
        started = time.monotonic()
        launcher.wait_healthy(address, timeout_s=90)
        print(f"{ingress}: a new replica answered {address} {time.monotonic() - started:.1f}s after the kill")
        assert raw_call(address, GENERATE, request(good_batch(info, 2, 2, seed=3)).SerializeToString())[0] == OK
    finally:
        start = time.monotonic()
        launcher.stop()
    # Nothing listens on the stack's ports within 15 s of the stop (no 30 s drain).
    deadline = start + 15
    while listening([grpc_port, http_port]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not listening([grpc_port, http_port]), f"still listening {time.monotonic() - start:.1f}s after stop"
    print(f"{ingress}: stopped in {time.monotonic() - start:.1f}s")
