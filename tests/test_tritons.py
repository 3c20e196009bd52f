"""Every Triton updated: a publish loads the new versions on each Triton the stack names
(two real local Tritons on one repository); one that is down during the publish is left
out, named in the report and the ledger, and serves the new versions once it starts
again, while the other switched meanwhile. A refusal by any Triton rejects the version
and puts every Triton back on the version serving before (export.rollout)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from export.rollout import ModelRefused, roll_out_on, triton_servers
from model.checkpoint import load_checkpoint
from model.examples import random_batch
from serving.backends.errors import BackendUnavailable
from serving.backends.triton_client import TritonClient
from serving.local.triton import TritonServer
from trainer.config import TrainerConfig
from trainer.ledger import Committed, Ledger
from trainer.prometheus import TrainerMetrics
from trainer.publish import Publisher


@pytest.fixture(scope="module")
def tritons(tmp_path_factory, published_repo, triton_config):
    """Two real Tritons on one copy of the repository (version 1 of each model)."""
    work = tmp_path_factory.mktemp("tritons")
    root = work / "repo"
    shutil.copytree(published_repo, root)
    servers = [TritonServer(triton_config(root, work / f"triton-{i}")) for i in range(2)]
    try:
        # Started side by side: each start waits for its own readiness.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(TritonServer.start, servers))
        yield servers, ModelRepository(root)
    finally:
        for server in servers:
            server.stop()


def served_versions(server: TritonServer, schema) -> tuple[set[int], set[int]]:
    """The FM and adapter versions a real inference on `server` answers with."""

    async def infer():
        async with TritonClient(server.cfg.grpc_url) as client:
            return await client.infer(random_batch(schema, 3, 2, seed=1))

    out = asyncio.run(infer())
    return set(np.unique(out["fm_version"]).tolist()), set(np.unique(out["adapter_version"]).tolist())


def served_once_back(server: TritonServer, schema, deadline_s: float = 30.0) -> tuple[set[int], set[int]]:
    """`served_versions` of a Triton just started again: its HTTP readiness can come
    before gRPC's reconnect backoff (up to a second, serving's client) lets a call through."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return served_versions(server, schema)
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.stack
def test_gem_export_loads_the_new_versions_on_every_triton(gem, tritons, tiny_checkpoint, schema, tmp_path):
    servers, repo = tritons
    before = repo.latest(FM_MODEL)
    loads = [arg for s in servers for arg in ("--load", s.cfg.grpc_url)]
    result = gem("export", "--checkpoint", str(tiny_checkpoint), "--repo", str(repo.root), *loads, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    new = repo.latest(FM_MODEL)
    assert new == before + 1
    for server in servers:
        assert served_versions(server, schema) == ({new}, {repo.latest(ADAPTER_MODEL)}), server.cfg.grpc_url
    window = re.search(rf"{FM_MODEL} version {new}: the Tritons switched within ([0-9.]+)s", result.stderr)
    assert window is not None, result.stderr
    print(f"\ntwo Tritons served different FM versions for {window.group(1)}s after `gem export`")


@pytest.mark.stack
def test_a_triton_down_during_a_publish_catches_up_when_it_starts_again(tritons, tiny_checkpoint, schema, tmp_path):
    servers, repo = tritons
    up, down = servers
    down.stop()
    try:
        cfg = TrainerConfig(
            stream=tmp_path / "stream", repository=repo.root, state_dir=tmp_path / "state",
            triton_urls=tuple(s.cfg.grpc_url for s in servers),
        )  # fmt: skip
        ledger = Ledger(cfg.ledger_path)
        publisher = Publisher(cfg, repo, ledger, TrainerMetrics.create())
        versions = publisher.publish(Committed("shard", "s0", 1, 1), None, load_checkpoint(tiny_checkpoint), True, None)
        new = (repo.latest(FM_MODEL), repo.latest(ADAPTER_MODEL))
        assert versions == {FM_MODEL: new[0], ADAPTER_MODEL: new[1]}, "served by the Triton that is up"
        line = Ledger(cfg.ledger_path).entries[-1]
        assert line["kind"] == "publish" and line["error"] is None
        assert list(line["missed"]) == [down.cfg.grpc_url], json.dumps(line)
        assert served_versions(up, schema) == ({new[0]}, {new[1]}), "the other Triton was updated meanwhile"
        with pytest.raises(BackendUnavailable):
            served_versions(down, schema)
    finally:
        down.start()
    assert served_once_back(down, schema) == ({new[0]}, {new[1]}), "started again, it serves the new versions"


def test_no_triton_reached_publishes_without_rejecting(published_repo, tiny_checkpoint, tmp_path):
    """Unreachable is not a refusal: the versions stay in the repository for the Tritons
    to load when they are back."""
    shutil.copytree(published_repo, tmp_path / "repo")
    repo = ModelRepository(tmp_path / "repo")
    report = publish(
        load_checkpoint(tiny_checkpoint), repo, PublishPolicy(keep_versions=10), triton_servers(["127.0.0.1:1"])
    )
    assert [r.loaded for r in report.rollouts] == [False, False]
    assert all(not r.reason for r in report.rollouts)
    assert list(report.missed) == ["127.0.0.1:1"]
    assert repo.latest(FM_MODEL) == report.fm.version, "nothing moved aside"


def test_the_trainer_records_a_publish_no_triton_loaded_as_published(published_repo, tiny_checkpoint, tmp_path):
    """The only Triton down (killed mid-publish): the ledger line names the versions it
    will load at its start, and the Triton it missed; not "published nothing"."""
    shutil.copytree(published_repo, tmp_path / "repo")
    repo = ModelRepository(tmp_path / "repo")
    cfg = TrainerConfig(
        stream=tmp_path / "stream", repository=repo.root, state_dir=tmp_path / "state", triton_urls=("127.0.0.1:1",)
    )
    publisher = Publisher(cfg, repo, Ledger(cfg.ledger_path), TrainerMetrics.create())
    versions = publisher.publish(Committed("shard", "s0", 1, 1), None, load_checkpoint(tiny_checkpoint), True, None)
    assert versions == {FM_MODEL: repo.latest(FM_MODEL), ADAPTER_MODEL: repo.latest(ADAPTER_MODEL)}
    line = Ledger(cfg.ledger_path).entries[-1]
    assert line["kind"] == "publish" and line["error"] is None, json.dumps(line)
    assert (line[FM_MODEL], line[ADAPTER_MODEL]) == (versions[FM_MODEL], versions[ADAPTER_MODEL])
    assert list(line["missed"]) == ["127.0.0.1:1"], json.dumps(line)


@dataclass
class Control:
    """A server's model control that answers as told, recording its calls: for the
    outcomes two real Tritons on one repository cannot give (one refuses, one loads)."""

    answer: Exception | None = None
    calls: list[str] = field(default_factory=list)

    async def load(self, model: str) -> None:
        self.calls.append(model)
        if self.answer is not None:
            error, self.answer = self.answer, None  # refused once: the reload of the old version works
            raise error


def test_one_refusal_rejects_the_version_and_puts_every_server_back(published_repo, tmp_path):
    shutil.copytree(published_repo, tmp_path / "repo")
    repo = ModelRepository(tmp_path / "repo")
    repo.publish(FM_MODEL, repo.root / FM_MODEL / "1" / "model.onnx")
    controls = {"a": Control(), "b": Control(ModelRefused("out of memory")), "c": Control(BackendUnavailable("down"))}
    rollout = asyncio.run(roll_out_on(controls, repo, FM_MODEL, keep=3))
    assert not rollout.loaded and rollout.reason == "b: out of memory"
    assert dict(rollout.missed) == {"c": "down"}
    assert repo.versions(FM_MODEL) == [1], "rejected for every server"
    assert controls["a"].calls == [FM_MODEL, FM_MODEL], "the server that switched reloads the old version"
    assert controls["b"].calls == [FM_MODEL, FM_MODEL]
    assert controls["c"].calls == [FM_MODEL], "the unreachable one loads the repository's version at its start"


def test_every_server_reached_switches_and_the_window_is_measured(published_repo, tmp_path):
    shutil.copytree(published_repo, tmp_path / "repo")
    repo = ModelRepository(tmp_path / "repo")
    repo.publish(FM_MODEL, repo.root / FM_MODEL / "1" / "model.onnx")
    controls = {"a": Control(), "b": Control(BackendUnavailable("down"))}
    rollout = asyncio.run(roll_out_on(controls, repo, FM_MODEL, keep=3))
    assert rollout.loaded and rollout.version == 2 and dict(rollout.missed) == {"b": "down"}
    assert len(rollout.ready_s) == 1 and rollout.window_s == 0.0
    assert repo.versions(FM_MODEL) == [1, 2]
