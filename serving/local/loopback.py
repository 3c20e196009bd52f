"""Where the local stack's Ray Serve front end listens.

Ray Serve's HTTP proxy takes a host (`http_options.host`), but its gRPC proxy binds
`[::]:<port>` unconditionally (ray 2.60: `ray/serve/_private/grpc_util.py`,
`start_grpc_server` -> `default_impl.add_grpc_address(server, f"[::]:{port}")`; no option
or variable changes it). The local stack must listen on 127.0.0.1 only, so every Ray
worker of the local stack runs `setup_worker` (Ray's documented `worker_process_setup_hook`
of the job's runtime_env) and, when `GEM_SERVE_GRPC_HOST` is set, the proxy's gRPC
address and each replica's inter-deployment gRPC server use that host (both are private
Ray functions, patched by name: a Ray upgrade that renames them makes the patch a no-op,
and the socket-table tests fail). Clusters (`serve deploy`) do not set it and keep Ray's default.
tests/test_hostile.py checks the socket table, so an upgrade that breaks this shows.
"""

from __future__ import annotations

import os

HOST_ENV = "GEM_SERVE_GRPC_HOST"
# ray._private.ray_constants.ENABLE_RAY_CLUSTER: "0" keeps Ray on this machine's loopback.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _rebind(module, name: str, rewrite) -> None:
    """Replaces `module.name(server, address)` by one that binds `rewrite(address)`
    (idempotent: a second call wraps the original, not the wrapper)."""
    original = getattr(getattr(module, name), "__wrapped__", getattr(module, name))

    def bind(server, address: str):
        return original(server, rewrite(address))

    bind.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(module, name, bind)


def setup_worker() -> None:
    host = os.environ.get(HOST_ENV)
    if not host:
        return
    try:
        from ray.serve._private import default_impl
    except ImportError:
        return
    _rebind(default_impl, "add_grpc_address", lambda address: f"{host}:{address.rsplit(':', 1)[-1]}")
    # Each Serve replica's inter-deployment gRPC server binds "[::]:0" the same way
    # (ray/serve/_private/replica.py, `add_port_to_grpc_server(self._server, "[::]:0")`).
    # Others reach it at the node's address, so only in Ray's single-machine mode (node
    # address = loopback, serving/local/launcher.py) may it move there.
    if os.environ.get(LOCAL_ONLY_ENV) != "0":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    _rebind(
        replica,
        "add_port_to_grpc_server",
        lambda address: f"{host}:{address.rsplit(':', 1)[-1]}" if address.startswith("[::]:") else address,
    )
