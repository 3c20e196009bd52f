"""The side trainer's publish in a child process (trainer/export_child.py): it publishes
what the bundle holds, the exporter is never loaded into the trainer, the child's errors
arrive as the same exceptions, and a killed trainer takes its export child with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from tests.trainer_support import wait_for

# The trainer's side: a tiny bundle published through publish_in_child, the outcome as JSON.
TRAINER = """
import json, sys
from pathlib import Path
import torch
from export.publish import PublishPolicy
from export.repository import ModelRepository
from model.adapter import StudentAdapter
from model.checkpoint import ModelBundle
from model.config import preset
from model.gem import GEM
from model.schema import load_schema
from trainer.export_child import publish_in_child

root, data = Path(sys.argv[1]), Path(sys.argv[2])
schema, cfg = load_schema(), preset("tiny")
torch.manual_seed(0)
adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces)).eval()
bundle = ModelBundle(schema, cfg, GEM(schema, cfg).eval(), adapter)
try:
    report = publish_in_child(bundle, ModelRepository(root / "repo"), PublishPolicy(data=data, work_dir=root), [])
    out = {"versions": report.versions, "parity_checked": report.fm_parity is not None}
except Exception as e:
    out = {"error": type(e).__name__, "message": str(e)}
out["exporter_loaded_here"] = "onnxscript" in sys.modules
print(json.dumps(out))
"""


def _trainer(root: Path, data: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(root), str(data)],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def _outcome(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_the_child_publishes_the_bundle_and_the_trainer_never_loads_the_exporter(synth_dir, tmp_path):
    outcome = _outcome(_trainer(tmp_path, synth_dir))
    assert outcome == {
        "versions": {FM_MODEL: 1, ADAPTER_MODEL: 1}, "parity_checked": True, "exporter_loaded_here": False,
    }  # fmt: skip
    repo = ModelRepository(tmp_path / "repo")
    assert repo.versions(FM_MODEL) == [1] and repo.versions(ADAPTER_MODEL) == [1]
    assert (tmp_path / "repo" / FM_MODEL / "1" / "model.onnx").is_file()
    assert not list(tmp_path.glob("gem-export-*")), "the child left its export folder behind"


def test_an_error_in_the_child_arrives_as_the_same_exception(tmp_path):
    bad = tmp_path / "logged.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), bad)
    outcome = _outcome(_trainer(tmp_path, bad))
    assert outcome["error"] == "DataError", outcome
    assert "column" in outcome["message"] and outcome["exporter_loaded_here"] is False
    assert ModelRepository(tmp_path / "repo").versions(FM_MODEL) == []


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in state  # dead, not yet reaped by whoever inherited it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_trainer_takes_its_export_child_with_it(synth_dir, hold_env, tmp_path):
    held = tmp_path / "held"
    # The child holds just before it renames the FM version into the repository.
    env = hold_env("export.repository:ModelRepository._install:before:1", held)
    trainer, child = _trainer(tmp_path, synth_dir, env=env), None
    try:
        wait_for(held.exists, 240, "the export child to reach the repository", proc=trainer)
        child = int(held.read_text().split()[1])
        assert child != trainer.pid
        trainer.send_signal(signal.SIGKILL)  # the trainer alone, not its process group
        trainer.wait(timeout=30)
        wait_for(lambda: _gone(child), 30, "the export child to die with the trainer")
    finally:
        if trainer.poll() is None:
            trainer.kill()
        trainer.communicate()
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)
    assert ModelRepository(tmp_path / "repo").versions(FM_MODEL) == []
