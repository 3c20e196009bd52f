"""Ports and addresses for servers started side by side (the stack, tests, benchmarks)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports are chosen below the kernel's ephemeral range and above Ray's worker ports
# (10002-19999): a port the kernel hands out for bind(0) or an outgoing connection can be
# taken by another process between our choice and the server's bind (seen in CI: a Serve
# proxy could not bind its port).
LOWEST = 20000
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _chosen_range() -> range:
    try:
        low = int(EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(LOWEST, max(low, LOWEST + 1024))


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now, drawn at random from outside
    the ephemeral range (held open together while chosen, so they differ)."""
    socks: list[socket.socket] = []
    ports = _chosen_range()
    try:
        for port in random.sample(ports, len(ports)):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise OSError(f"no {n} free ports in {ports.start}-{ports.stop - 1}")
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
