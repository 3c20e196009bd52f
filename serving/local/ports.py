"""Ports and addresses for servers started side by side (the stack, tests, benchmarks)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now (held open together while
    chosen, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_run(n: int) -> int:
    """The first of `n` consecutive TCP ports free on 127.0.0.1 right now (direct
    ingress gives several applications consecutive ports, serving/local/launcher.py)."""
    for _ in range(100):
        (first,) = free_ports(1)
        if first + n <= 65536 and not any(port_in_use(p) for p in range(first, first + n)):
            return first
    raise OSError(f"no {n} consecutive free ports found")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def connect_host(host: str) -> str:
    """The address a client on this machine dials for a server bound to `host` (a
    wildcard bind answers on the loopback address)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
