"""One question to a server's standard gRPC health service (grpc.health.v1): the probe
behind `gem health`, the front end's healthcheck in docker-compose.yml."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout_s: float = 5.0, application: str | None = None) -> tuple[bool, str]:
    """(True, "SERVING") when the server says so; otherwise False and why, on one line:
    the status it answered (NOT_SERVING, ...) or the gRPC error (`UNAVAILABLE: ...`).
    `application`: the Serve application to ask, when one Serve instance runs several."""
    metadata = [("application", application)] if application else None
    with grpc.insecure_channel(address) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            return False, " ".join(f"{e.code().name}: {e.details()}".split())
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return serving, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
