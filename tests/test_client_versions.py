"""The client's dependency range, tested at both ends in a throwaway venv.

client/pyproject.toml claims a range for grpcio, protobuf and numpy; this installs the
client (a built wheel, as a ranker gets it) with each floor pinned, then upgrades to the
newest releases the range allows, and each time imports it, round-trips a request
through the wire format and the generated code, and builds a channel. Needs the
package registry (pip, as `make setup` does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client"

# Run inside the venv, warnings as errors (protobuf warns about gencode it only half
# supports): one line of JSON with the versions it ran on.
CHECK = """
import json
from importlib import resources

import google.protobuf
import grpc
import numpy as np
from gem.knowledge import KnowledgeClient
from gem.knowledge.client import user_agent
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.v1 import knowledge_pb2_grpc  # noqa: F401  (its grpcio version check)
from gem.knowledge.wire import decode, encode

ids = np.arange(6, dtype=np.int64).reshape(2, 3)
request = pb.GenerateRequest(features={"hist_item_id": encode(ids)}, outputs=[pb.OUTPUT_LABELS])
back = pb.GenerateRequest.FromString(request.SerializeToString())
assert (decode("hist_item_id", back.features["hist_item_id"]) == ids).all() and back.outputs == [pb.OUTPUT_LABELS]
package = resources.files("gem.knowledge")
assert package.joinpath("py.typed").is_file() and package.joinpath("v1", "knowledge_pb2.pyi").is_file()
KnowledgeClient("127.0.0.1:1").close()
print(json.dumps({"protobuf": google.protobuf.__version__, "grpcio": grpc.__version__,
                  "numpy": np.__version__, "user_agent": user_agent()}))
"""


def requirements() -> dict[str, str]:
    """client/pyproject.toml's dependencies: name -> specifier."""
    deps = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", d).groups() for d in deps)


def floor(specifier: str) -> str:
    (version,) = re.findall(r">=\s*([0-9][0-9.]*)", specifier)
    return version


def test_the_client_works_at_both_ends_of_its_range(tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> str:
        result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    def check() -> dict[str, str]:
        return json.loads(run(str(venv / "bin" / "python"), "-W", "error", "-c", CHECK).splitlines()[-1])

    pip = (str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q")
    wanted = requirements()
    oldest = {name: floor(spec) for name, spec in wanted.items()}
    run(sys.executable, "-m", "venv", str(venv))
    run(*pip, "install", str(CLIENT), *(f"{name}=={version}" for name, version in oldest.items()))
    at_floor = check()
    assert all(Version(at_floor[name]) == Version(version) for name, version in oldest.items()), at_floor
    version = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["version"]
    assert at_floor["user_agent"] == f"gem-knowledge-client/{version}"

    run(*pip, "install", "--upgrade", *(f"{name}{spec}" for name, spec in wanted.items()))
    newest = check()
    assert all(Version(newest[name]) > Version(version) for name, version in oldest.items()), newest
    # The top of protobuf's range is the major after the generator's (6): a runtime
    # supports gencode one major older.
    (below,) = re.findall(r"<\s*([0-9]+)", wanted["protobuf"])
    assert Version(newest["protobuf"]).major == int(below) - 1, newest
