"""Generates the Python gRPC code for protos/ into the client package,
client/gem/knowledge/... (committed).

    .venv/bin/python protos/generate.py          # or: make protos

tests/test_api.py checks that the committed code is what this produces, so the code
can never drift from the .proto. grpcio-tools is pinned in pyproject.toml for that, and
its version sets the client's floors: the generated code checks for a protobuf runtime at
least as new as its protoc, and a grpcio at least as new as itself (client/pyproject.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
CLIENT = ROOT / "client"


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under `out`; returns them."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for proto in proto_files():
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = out / proto.relative_to(PROTOS).with_suffix("")
        written += [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


if __name__ == "__main__":
    written = generate(CLIENT)
    print("\n".join(str(p.relative_to(ROOT)) for p in written), file=sys.stderr)
