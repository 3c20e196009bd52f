"""Where a call's time went on the server, on request: the caller sends the metadata
`gem-server-timing` (any value), and the reply's trailer carries the server's stages in
the W3C Server-Timing syntax, durations in milliseconds:

    gem-server-timing: decode;dur=0.412, model;dur=14.981, encode;dur=0.337

`decode`: from the handler's start to the call assembled (authorization, admission,
protobuf parse, tensor checks); `model`: the data plane (the batch queue and the
backend); `encode`: the reply's checks and tensors (gRPC serializes it after). The
call's time outside them (the network, gRPC, Ray Serve's own steps) is the client's
latency less their sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

SERVER_TIMING_METADATA = "gem-server-timing"


def format_server_timing(stages_ms: Mapping[str, float]) -> str:
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in stages_ms.items())


def parse_server_timing(value: str) -> dict[str, float]:
    """The stages of a trailer `format_server_timing` wrote; a stage without a finite,
    non-negative duration is left out (the trailer is advisory: it never fails a call)."""
    stages: dict[str, float] = {}
    for entry in value.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    ms = float(number)
                except ValueError:
                    continue
                if math.isfinite(ms) and ms >= 0:
                    stages[name] = ms
    return stages
