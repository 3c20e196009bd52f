"""The side trainer end to end: a regression refused by the gate; a cycle that rolls a new
version out to a real Triton while a client calls it without one failure; the adapter
alone; a quarantined name delivered again; a state folder that cannot be resumed; one-line
errors under --procs 2. (Kills at every commit point: tests/test_trainer_faults.py.)"""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from model.checkpoint import load_checkpoint
from model.examples import random_batch
from serving.backends.triton_client import TritonClient
from serving.local.ports import free_ports
from serving.local.triton import TritonConfig, TritonServer
from tests.trainer_support import gem, ledger, make_stream, shard_lines, shuffle_labels, start_gem
from trainer import distributed as D
from trainer.config import TrainerConfig
from trainer.loop import Trainer
from trainer.stream import QUARANTINE
from trainer.train import TrainConfig, train

# Starts the side trainer's processes (and Triton): `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack


def _trainer_args(stream: Path, repo: Path, state: Path, *extra: str) -> list[str]:
    return [
        "trainer", "run", "--stream", str(stream), "--repo", str(repo), "--state", str(state), "--preset", "tiny",
        "--batch-size", "256", "--tolerance", "0.05", "--poll-s", "0.2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_tiny(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    return train(TrainConfig(data=synth_dir, out=out, preset="tiny", batch_size=256, adapter_epochs=1)).checkpoint


def test_a_shard_of_shuffled_labels_is_refused_and_serving_stays(schema, trained_tiny, tmp_path):
    repo, stream, state = tmp_path / "repo", tmp_path / "stream", tmp_path / "state"
    publish(load_checkpoint(trained_tiny), ModelRepository(repo), PublishPolicy())
    # Shards 4 and 5: other rows than synth_dir's 0-3, which the served model learned from.
    make_stream(stream, schema, shards=6, rows=6_000, start=4)
    shuffle_labels(stream / "part-00004.parquet", schema)
    cfg = TrainerConfig(
        stream=stream, repository=repo, state_dir=state, checkpoint=trained_tiny, tolerance=0.005,
        batch_size=128, exit_when_idle=True,
    )  # fmt: skip
    trainer = Trainer(cfg, D.Runtime())
    before = {k: v.clone() for k, v in trainer.plain.state_dict().items()}
    trainer.run()

    (line,) = shard_lines(state)
    assert line["shard"] == "part-00004.parquet" and line["state"] == "refused", line
    assert "regression beyond tolerance" in line["reason"] and line["serving_version"] == 1
    r = ModelRepository(repo)
    assert r.versions(FM_MODEL) == [1], "the served FM stays"
    assert r.versions(ADAPTER_MODEL) == [1, 2], "the adapter is still refreshed, alone"
    after = trainer.plain.state_dict()
    assert all(
        (before[k] == after[k]).all() for k in before
    ), "the refused weights are dropped"  # fmt: skip
    ckpt = load_checkpoint(state / "checkpoint")
    assert ckpt.metrics["trainer"]["processed"] == {"part-00004.parquet": "refused"}
    m = trainer.coordinator.metrics
    assert m.failures.labels("gate")._value.get() == 1 and m.cycles.labels("refused")._value.get() == 1


def test_a_cycle_rolls_out_to_triton_while_a_client_calls_it_without_a_failure(
    schema, published_repo, tiny_checkpoint, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    stream, state = tmp_path / "stream", tmp_path / "state"
    make_stream(stream, schema, shards=2, rows=3_000)
    http, grpc, metrics, trainer_metrics = free_ports(4)
    cfg = TritonConfig(
        repository=repo, work_dir=tmp_path / "triton", http_port=http, grpc_port=grpc, metrics_port=metrics
    )
    batch = random_batch(schema, 16, 8)

    async def scenario(server: TritonServer):
        seen, failures, stop = [], [], asyncio.Event()

        async def caller(client: TritonClient, who: int):
            while not stop.is_set():
                try:
                    out = await client.infer(batch, outputs=("fm_version",))
                    seen.append((int(out["fm_version"][0, 0]), int(out["adapter_version"][0, 0]), who))
                except Exception as e:  # counted: the test asserts there are none
                    failures.append(e)
                # A short pause: calls all along, yet cores left for the trainer's export.
                await asyncio.sleep(0.02)

        async with TritonClient(server.cfg.grpc_url) as client:
            callers = [asyncio.create_task(caller(client, who)) for who in range(2)]
            while len(seen) < 10:  # serving before the trainer starts
                await asyncio.sleep(0.05)
            log = tmp_path / "trainer.log"
            proc = start_gem(
                *_trainer_args(stream, repo, state, "--checkpoint", str(tiny_checkpoint), "--max-cycles", "1",
                               "--triton-url", server.cfg.grpc_url, "--metrics-port", str(trainer_metrics)),
                cwd=tmp_path, log=log,
            )  # fmt: skip
            scraped = ""
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if "gem_trainer_serving_version" not in scraped:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{trainer_metrics}/metrics", timeout=2) as r:
                            scraped = r.read().decode()
                    except OSError:
                        pass
                await asyncio.sleep(0.2)
            assert proc.returncode == 0, log.read_text()[-3000:]
            switched = len(seen)
            while len(seen) < switched + 10:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*callers)
            return seen, failures, " ".join(log.read_text().split()), scraped

    with TritonServer(cfg) as server:
        seen, failures, log, scraped = asyncio.run(scenario(server))
    assert failures == [], failures[:3]
    assert seen[0][:2] == (1, 1) and seen[-1][:2] == (2, 2), (seen[0], seen[-1])
    # Per caller (its calls one after another): the two callers' replies interleave, and a
    # call sent to the old version may finish after the other caller's first new one.
    for caller in (0, 1):
        fm_versions = [fm for fm, _, who in seen if who == caller]
        assert fm_versions == sorted(fm_versions), "once switched, a caller's calls never go back to the old version"
    assert "published" in log and "gem_fm v2" in log
    assert "gem_trainer_examples_total" in scraped, "the trainer's metrics endpoint answered while it ran"
    assert ModelRepository(repo).versions(FM_MODEL) == [1, 2]


def test_one_new_shard_refreshes_the_adapter_alone_while_the_fm_waits_for_its_gate(
    schema, published_repo, tiny_checkpoint, tmp_path
):
    repo, stream, state = tmp_path / "repo", tmp_path / "stream", tmp_path / "state"
    shutil.copytree(published_repo, repo)
    make_stream(stream, schema, shards=1, rows=2_000)
    cfg = TrainerConfig(
        stream=stream, repository=repo, state_dir=state, checkpoint=tiny_checkpoint, exit_when_idle=True
    )
    before = load_checkpoint(tiny_checkpoint).adapter.state_dict()
    Trainer(cfg, D.Runtime()).run()
    r = ModelRepository(repo)
    assert r.versions(FM_MODEL) == [1] and r.versions(ADAPTER_MODEL) == [1, 2]
    assert shard_lines(state) == [], "no FM cycle without a next shard to validate on"
    assert [(e["kind"], e.get("shard"), e.get(ADAPTER_MODEL)) for e in ledger(state)] == [
        ("adapter", "part-00000.parquet", None),
        ("publish", None, 2),
    ], "committed, then published"
    ckpt = load_checkpoint(state / "checkpoint")
    assert ckpt.metrics["trainer"]["adapter_shard"] == "part-00000.parquet"
    assert any(not (before[k] == v).all() for k, v in ckpt.adapter.state_dict().items()), "the adapter learned"
    Trainer(cfg, D.Runtime()).run()  # restarted: the same shard is not fitted twice
    assert r.versions(ADAPTER_MODEL) == [1, 2] and len(ledger(state)) == 2


def test_a_quarantined_name_delivered_again_completely_is_trained(schema, published_repo, tiny_checkpoint, tmp_path):
    repo, stream, state = tmp_path / "repo", tmp_path / "stream", tmp_path / "state"
    shutil.copytree(published_repo, repo)
    source = tmp_path / "source"
    make_stream(source, schema, shards=3, rows=1_000)
    stream.mkdir()
    for i in (0, 2):
        shutil.copy(source / f"part-0000{i}.parquet", stream)
    # part-00001 is being written under its final name (against the producers' contract):
    # half of it is there and it keeps growing, so it is waited for, not quarantined.
    whole = (source / "part-00001.parquet").read_bytes()
    growing = stream / "part-00001.parquet"
    growing.write_bytes(whole[: len(whole) // 3])
    cfg = TrainerConfig(
        stream=stream, repository=repo, state_dir=state, checkpoint=tiny_checkpoint, tolerance=10.0,
        batch_size=128, poll_s=0.05, exit_when_idle=True,
    )  # fmt: skip
    trainer = Trainer(cfg, D.Runtime())
    coordinator = trainer.coordinator
    assert coordinator.plan().kind == "idle", "an unreadable shard is looked at again before it is quarantined"
    growing.write_bytes(whole[: 2 * len(whole) // 3])
    assert coordinator.plan().kind == "idle" and growing.exists(), "it grew: still waited for"
    # Then it stops changing while still unreadable: a bad shard, quarantined on the next look.
    plan = coordinator.plan()
    assert not growing.exists() and (stream / QUARANTINE / "part-00001.parquet").exists()
    assert (plan.kind, plan.train, plan.eval) == ("fm", "part-00000.parquet", "part-00002.parquet")
    trainer.run()
    assert [e["shard"] for e in shard_lines(state)] == ["part-00000.parquet"]
    (quarantined,) = [e for e in ledger(state) if e["kind"] == "quarantine"]
    assert quarantined["size"] == 2 * len(whole) // 3 and len(quarantined["sha256"]) == 64

    # Delivered again, complete (written aside, renamed into place).
    shutil.copy(source / "part-00001.parquet", stream / ".part-00001.parquet")
    (stream / ".part-00001.parquet").rename(stream / "part-00001.parquet")
    Trainer(cfg, D.Runtime()).run()
    lines = shard_lines(state)
    assert [(e["shard"], e["eval_shard"]) for e in lines] == [
        ("part-00000.parquet", "part-00002.parquet"),
        ("part-00001.parquet", "part-00002.parquet"),
    ], "the name quarantined before is new content: read and trained"
    assert lines[1]["size"] == len(whole)


def test_a_ledger_without_its_checkpoint_refuses_to_start_over_in_one_line(schema, tiny_checkpoint, tmp_path):
    stream, state, repo = tmp_path / "stream", tmp_path / "state", tmp_path / "repo"
    make_stream(stream, schema, shards=1, rows=500)
    state.mkdir()
    (state / "ledger.jsonl").write_text(
        '{"kind": "shard", "shard": "part-00000.parquet", "cycle": 1, "state": "trained", "checkpoint": 1}\n'
    )
    args = ["trainer", "run", "--stream", str(stream), "--repo", str(repo), "--state", str(state), "--preset", "tiny",
            "--checkpoint", str(tiny_checkpoint), "--exit-when-idle"]  # fmt: skip
    for procs in ("1", "2"):
        result = gem(*args, "--procs", procs, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        text = " ".join(result.stderr.split())
        assert "holds no complete checkpoint" in text and "refusing to start over" in text, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    # A corrupt line in the middle of the ledger: one line and exit 2 under --procs 2 too.
    (state / "ledger.jsonl").write_text('{"kind": "shard"}\nnot json\n{"kind": "publish", "cycle": 1}\n')
    result = gem(*args, "--procs", "2", cwd=tmp_path)
    assert result.returncode == 2 and "line 2 is not JSON" in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    # A torn last line (a kill during an append) is skipped by `status`, not repaired.
    torn = b'{"kind": "shard", "shard": "p", "cycle": 1, "state": "trained"}\n{"kind": "pub'
    (state / "ledger.jsonl").write_bytes(torn)
    status = gem("trainer", "status", "--state", str(state), "--repo", str(repo), cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert (state / "ledger.jsonl").read_bytes() == torn, "status never writes"
