"""The pieces of issue 15's hardening that need no running stack: wire and schema checks,
status details, the raw-bytes servicer, the message-size bound, the non-finite output
check, Triton's command line, the client's retry policy and the supervisor's restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.wire import WireError, cut, decode, encode
from google.rpc import error_details_pb2, status_pb2

from model.examples import random_batch, random_user_batch
from model.features import USER_INDEX, input_specs
from serving.backends.base import Knowledge
from serving.config import max_message_bytes
from serving.dataplane import Call, check_finite
from serving.errors import Refusal, Violation, status_details
from serving.servicer import parse
from serving.validation import Limits, RequestError, assemble


def test_shape_arithmetic_cannot_overflow():
    with pytest.raises(WireError, match="far beyond"):
        decode("hist_item_id", pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2**62, 8]))
    with pytest.raises(WireError, match="far beyond"):
        decode("x", pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2**32, 2**32, 2**32]))


def test_width_zero_sequences_are_refused_whatever_the_partners(schema):
    batch = random_batch(schema, 4, 3)
    for seq in schema.sequences:
        for f in seq.fields:
            batch[f.name] = np.zeros((4, 0), np.int64)
        batch[seq.length_name] = np.zeros(4, np.int64)
    with pytest.raises(RequestError, match="width 0") as e:
        assemble(schema, batch, {}, Limits())
    assert e.value.field.startswith("features[")


def test_user_input_in_messages_is_bounded(schema):
    batch = {**random_batch(schema, 2, 2), "x" * 20_000: np.zeros(2, np.float32)}
    with pytest.raises(RequestError) as e:
        assemble(schema, batch, {}, Limits())
    assert len(str(e.value)) < 300 and "20000 chars" in str(e.value)
    assert len(cut("y" * 10_000)) < 80


def test_status_details_carry_bad_request_field_violations():
    raw = status_details(grpc.StatusCode.INVALID_ARGUMENT, "bad", [Violation("features['a']", "unknown")])
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status.message == "bad"
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "features['a']"


def test_malformed_bytes_are_a_refusal_and_good_bytes_a_message():
    with pytest.raises(Refusal) as e:
        parse(pb.GenerateRequest, b"\x08" + b"\xff" * 11)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = pb.GenerateRequest(outputs=[pb.OUTPUT_LABELS])
    assert parse(pb.GenerateRequest, message.SerializeToString()) == message


def test_raw_servicer_hands_the_bytes_over(tmp_path):
    """The servicer function registers handlers that do not parse: a plain gRPC server
    with it passes the request bytes through unchanged."""
    import concurrent.futures

    from serving.grpc_api import add_KnowledgeServiceServicer_to_server

    class Echo:
        def Generate(self, request, context):
            assert isinstance(request, bytes)
            return request

        def GetModelInfo(self, request, context):
            return b""

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    add_KnowledgeServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            rpc = channel.unary_unary("/gem.knowledge.v1.KnowledgeService/Generate")
            assert rpc(b"\xff\x00garbage", timeout=10) == b"\xff\x00garbage"
    finally:
        server.stop(None)


def test_message_limit_covers_the_largest_legal_call(schema):
    rows = 512
    batch = {}
    max_length = {q.name: q.max_length for q in schema.sequences}
    for s in input_specs(schema):
        shape = (rows, max_length[s.sequence]) if s.rank == 2 else (rows,)
        batch[s.name] = np.zeros(shape, s.dtype)
    size = pb.GenerateRequest(features={k: encode(v) for k, v in batch.items()}).ByteSize()
    limit = max_message_bytes(schema, rows)
    assert size < limit < 2 * size + (2 << 20)


def test_non_finite_outputs_refuse_the_call_and_name_the_dense_feature(schema):
    batch = random_batch(schema, 3, 2)
    batch["ad_bid_log"] = np.array([0.0, 3e38, 0.0], np.float32)
    call = Call(batch, ("logits",))
    dense = [s.name for s in input_specs(schema) if s.kind == "dense"]
    check_finite(call, Knowledge({"logits": np.zeros((3, 2), np.float32)}, 1, 1), dense)
    with pytest.raises(Refusal) as e:
        check_finite(call, Knowledge({"logits": np.array([[0, 0], [np.nan, 0], [0, 0]], np.float32)}, 1, 1), dense)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'ad_bid_log'" in e.value.message


def test_non_finite_outputs_of_a_user_indexed_call_name_the_user_dense_feature(schema):
    batch = random_user_batch(schema, 2, 4, 3, seed=5)
    batch["user_ctr_7d"] = np.array([0.0, 3e38], np.float32)  # the second user's row
    bad_row = int(np.flatnonzero(batch[USER_INDEX] == 1)[0])
    logits = np.zeros((4, 2), np.float32)
    logits[bad_row] = np.inf
    dense = [s.name for s in input_specs(schema) if s.kind == "dense"]
    with pytest.raises(Refusal) as e:
        check_finite(Call(batch, ("logits",)), Knowledge({"logits": logits}, 1, 1), dense)
    assert "'user_ctr_7d'" in e.value.message and f"first: row {bad_row}" in e.value.message


def test_triton_listens_on_loopback_with_a_restricted_control_api(tmp_path):
    from serving.local.triton import TritonConfig, command

    cfg = TritonConfig(repository=tmp_path, work_dir=tmp_path, admin_key="k3y")
    args = command(cfg, tmp_path, [])
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in args
    assert any(a.startswith("--http-restricted-api=model-repository") and a.endswith(":gem-admin-key=k3y")
               for a in args)  # fmt: skip
    assert any(a.startswith("--grpc-restricted-protocol=model-repository") for a in args)


def test_client_retries_only_unavailable():
    from gem.knowledge.client import RETRYABLE, channel_options

    policy = json.loads(dict(channel_options(3))["grpc.service_config"])
    assert policy["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"] == list(RETRYABLE)


class FakeServer:
    """Stands in for TritonServer: a `sleep` in its own process group."""

    starts = 0

    def __init__(self, cfg, owner=None):
        self.cfg, self.owner, self.process = cfg, owner, None

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    def start(self):
        FakeServer.starts += 1
        self.process = subprocess.Popen(["sleep", "300"], start_new_session=True)
        return self

    def stop(self):
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


def test_supervisor_restarts_an_exited_triton_with_backoff(monkeypatch, tmp_path):
    from serving.local import supervisor
    from serving.local.triton import TritonConfig

    monkeypatch.setattr(supervisor, "TritonServer", FakeServer)
    monkeypatch.setattr(supervisor, "clean_shared_memory", lambda pid=None: [])
    cfg = TritonConfig(repository=tmp_path, work_dir=tmp_path)
    with supervisor.SupervisedTriton(cfg, backoff_s=(0.1,)) as s:
        first = s.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while s.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.restarts == 1 and s.pid != first
        second = s.pid
    assert not Path(f"/proc/{second}").exists() or "Z" in Path(f"/proc/{second}/stat").read_text().split()[2]


def test_bootstrap_trains_gem_only(monkeypatch, tmp_path):
    import export.publish
    import model.checkpoint
    import model.data.synth
    import trainer.train
    from trainer.bootstrap import BootstrapConfig, bootstrap

    seen = {}

    def synth(cfg, schema, out, progress=None):
        out.mkdir(parents=True)
        (out / "part-00000.parquet").touch()

    def train(cfg, progress=None):
        seen["baselines"] = cfg.baselines
        return SimpleNamespace(metrics={})

    monkeypatch.setattr(model.data.synth, "write_shards", synth)
    monkeypatch.setattr(trainer.train, "train", train)
    monkeypatch.setattr(model.checkpoint, "load_checkpoint", lambda path: path)
    monkeypatch.setattr(export.publish, "publish", lambda ckpt, repo, policy, **_: None)
    bootstrap(BootstrapConfig(tmp_path / "ckpt", tmp_path / "data", tmp_path / "repo"))
    assert seen == {"baselines": False}


def test_ready_message_has_absolute_paths_one_command_a_line(capsys):
    from gem.cli.serve import _ready_message

    _ready_message("127.0.0.1:50051", 8090)
    err = capsys.readouterr().err
    commands = [line.strip() for line in err.splitlines() if line.startswith("    ")]
    assert any(c.split()[0].endswith("/gem") and Path(c.split()[0]).is_absolute() for c in commands)
    locust = next(c for c in commands if "locust" in c)
    assert all(Path(p).is_absolute() for p in locust.split() if p.endswith((".py", ".conf")))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"admin_key": "x"}'])
def test_a_corrupt_triton_state_file_is_a_clear_error_not_no_server(gem, tmp_path, content):
    """`gem triton down` on an unreadable server.json must not say "no Triton was started"
    (a running server would be left behind): it names the file, without a traceback."""
    from serving.local.state import StateError, read_state, state_file
    from serving.local.triton import stored_admin_key

    assert read_state(tmp_path) is None, "no file: no server"
    state_file(tmp_path).write_text(content)
    with pytest.raises(StateError, match=r"server\.json"):
        read_state(tmp_path)
    assert stored_admin_key(tmp_path) == ""
    done = gem("triton", "down", "--work-dir", str(tmp_path))
    assert done.returncode == 2 and "server.json" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "no Triton was started" not in done.stderr
