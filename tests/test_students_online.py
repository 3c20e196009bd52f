"""The online example (examples/student_ranker.py) against the real local stack: Triton
and the Ray Serve gRPC front end. It asks the service for `embedding` and
`user_embedding` for one user's candidates and scores them with a `repr` student; the
scores equal the student's on the in-process model's embeddings."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.data.reader import table_to_batch
from model.features import input_specs
from model.outputs import EMBEDDING, USER_EMBEDDING
from serving.backends.onnx import OnnxBackend
from serving.config import FrontendConfig
from serving.local import launcher
from serving.local.ports import free_ports
from serving.local.triton import TritonServer
from students.config import load_student_config
from students.model import SERVING
from students.train import build_student, save_student
from students.variants import parse_variant

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "student_ranker.py"
pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack(triton_config, published_repo, tmp_path_factory):
    """Triton on a copy of the published tiny model, the front end in front of it."""
    work = tmp_path_factory.mktemp("student-stack")
    repo = work / "repo"
    shutil.copytree(published_repo, repo)
    triton = TritonServer(triton_config(repo, work / "triton")).start()
    grpc_port, http_port = free_ports(2)
    try:
        cfg = FrontendConfig(triton_url=triton.cfg.grpc_url, max_examples_per_call=1000)
        address = launcher.start(cfg, grpc_port=grpc_port, http_port=http_port)
        launcher.wait_healthy(address)
        yield address, repo
    finally:
        launcher.stop()
        triton.stop()


def example_module():
    spec = importlib.util.spec_from_file_location("student_ranker", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_online_example_answers_through_the_front_end(stack, schema, synth_dir, tmp_path):
    address, repo = stack
    torch.manual_seed(0)
    cfg = load_student_config()
    variant = parse_variant("repr")
    student = build_student(cfg, schema, variant, (32, 16)).eval()  # the tiny FM's widths
    path = save_student(tmp_path / "repr", student, variant, {})
    data = synth_dir / "part-00003.parquet"
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--address", address, "--student", str(path), "--data", str(data),
         "--candidates", "12", "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout)
    scores = np.array(answer["scores"])
    assert scores.shape == (len(answer["example_id"]), 2) and len(answer["example_id"]) > 1
    assert ((scores > 0) & (scores < 1)).all()

    # The same candidates, the same user row for each, through the in-process model.
    rows = example_module().candidates_of_one_user(data, student, 12)
    assert rows.column("example_id").to_pylist() == answer["example_id"]
    user_cols = [s.name for s in input_specs(schema) if s.side == "user" and s.kind != "length"]
    zeros = pa.array(np.zeros(rows.num_rows, np.int64))
    same_user = rows.drop_columns(user_cols)
    for name in user_cols:
        same_user = same_user.append_column(name, rows.column(name).take(zeros))
    knowledge = OnnxBackend(repo).run(table_to_batch(same_user, schema, labels=False), [EMBEDDING, USER_EMBEDDING])
    batch = table_to_batch(same_user, student.schema, max_seq_len=cfg.sequence_events, labels=False)
    batch.update(knowledge.outputs)
    with torch.no_grad():
        inputs = {n: torch.from_numpy(np.require(batch[n], requirements=("C", "W"))) for n in student.input_names()}
        expected = torch.sigmoid(student(inputs)[SERVING])
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-4)


def test_the_example_refuses_a_student_without_embeddings(stack, schema, synth_dir, tmp_path):
    address, _ = stack
    cfg = load_student_config()
    path = save_student(tmp_path / "hard", build_student(cfg, schema, parse_variant("hard")), parse_variant("hard"), {})
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--address", address, "--student", str(path), "--data",
         str(synth_dir / "part-00003.parquet")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2 and "takes no GEM embeddings" in run.stderr


def test_the_example_pins_the_students_fm_version(stack, schema, synth_dir, tmp_path):
    """A student records the FM version of its embedding inputs; the example pins it: a
    loaded version answers, one no longer loaded is refused, never served by another."""
    address, _ = stack
    variant = parse_variant("repr")
    student = build_student(load_student_config(), schema, variant, (32, 16)).eval()
    data = synth_dir / "part-00003.parquet"
    runs = {}
    for version in (1, 7):
        path = save_student(tmp_path / f"repr-v{version}", student, variant, {"fm_version": version})
        runs[version] = subprocess.run(
            [sys.executable, str(EXAMPLE), "--address", address, "--student", str(path), "--data", str(data),
             "--candidates", "4", "--json"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
    assert runs[1].returncode == 0, runs[1].stderr[-3000:]
    assert runs[7].returncode == 2
    assert "FAILED_PRECONDITION: FM version 7 is not loaded; the loaded versions are 1" in runs[7].stderr
    assert "Traceback" not in runs[7].stderr
