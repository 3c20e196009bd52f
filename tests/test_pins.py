"""Pinned FM versions: two FM versions loaded, each with the adapter published for it;
pinned calls get that version's outputs (equal to its graphs run directly), unpinned
calls the newest; an adapter-only refresh serves the latest FM only; a pin to a version
no longer loaded is refused (FAILED_PRECONDITION naming the versions), never served by
another. The embedded backend and the data plane here; Triton in the `stack` tests."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch
from gem.knowledge.client import KnowledgeClient
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.v1 import knowledge_pb2_grpc as pb_grpc
from gem.knowledge.wire import encode
from ray import serve

from export.contract import (
    ADAPTER_INPUTS,
    ADAPTER_MODEL,
    FM_ADAPTERS_PARAMETER,
    FM_MODEL,
    paired_adapter,
    parse_pairs,
)
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from export.rollout import roll_out
from export.triton_config import from_pbtxt
from jobs.embed import EmbedConfig, run_embed
from jobs.embed.manifest import MANIFEST
from model.adapter import StudentAdapter
from model.checkpoint import ModelBundle
from model.config import preset
from model.data.reader import resolve_paths, table_to_batch
from model.examples import random_batch
from model.features import user_input_names
from model.gem import GEM
from model.outputs import FM_OUTPUTS, LOGITS, sigmoid
from model.user_index import graph_feeds
from serving.backends.errors import VersionNotLoaded, status_of
from serving.backends.onnx import OnnxBackend
from serving.backends.triton import TritonBackend
from serving.backends.triton_client import TritonClient
from serving.config import FrontendConfig
from serving.dataplane import Call, DataPlane
from serving.local import launcher
from serving.local.ports import free_port_run, free_ports
from serving.local.triton import TritonServer
from serving.prometheus import FrontendMetrics
from serving.servicer import KnowledgeIngress

OUTPUTS = (*FM_OUTPUTS, "adapted_logits")


def bundle(schema, seed: int) -> ModelBundle:
    torch.manual_seed(seed)
    model = GEM(schema, preset("tiny")).eval()
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents).eval()
    torch.nn.init.normal_(adapter.last.weight, std=0.5)
    return ModelBundle(schema, preset("tiny"), model, adapter)


@pytest.fixture(scope="module")
def pinned_repo(tmp_path_factory, published_repo, schema, synth_dir) -> Path:
    """FM v1 + adapter v1 (published together), FM v2 + adapter v2, then an adapter-only
    refresh: adapter v3, for FM v2 (read-only: copy it)."""
    root = tmp_path_factory.mktemp("pinned") / "repo"
    shutil.copytree(published_repo, root)
    repo = ModelRepository(root)
    publish(bundle(schema, 1), repo, PublishPolicy(data=synth_dir))
    publish(bundle(schema, 2), repo, PublishPolicy(data=synth_dir, with_fm=False))
    return root


def direct(root: Path, fm: int, adapter: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FM version `fm` and adapter version `adapter` run from their files, no backend."""
    fm_session = ort.InferenceSession(str(root / FM_MODEL / str(fm) / "model.onnx"))
    feeds = graph_feeds(batch, fm_session.get_inputs())
    out = dict(zip(FM_OUTPUTS, fm_session.run(list(FM_OUTPUTS), feeds), strict=True))
    adapter_session = ort.InferenceSession(str(root / ADAPTER_MODEL / str(adapter) / "model.onnx"))
    logits, surface = ADAPTER_INPUTS
    (out["adapted_logits"],) = adapter_session.run(["adapted_logits"], {logits: out[LOGITS], surface: feeds[surface]})
    return out


def assert_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in OUTPUTS:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


def test_each_fm_version_runs_with_the_adapter_published_for_it(pinned_repo):
    assert paired_adapter(pinned_repo, 1) == 1
    assert paired_adapter(pinned_repo, 2) == 3, "the adapter-only refresh applies to the latest FM"
    config = from_pbtxt((pinned_repo / ADAPTER_MODEL / "config.pbtxt").read_text())
    assert parse_pairs(config.parameters[FM_ADAPTERS_PARAMETER].string_value) == {2: 3, 1: 1}
    assert config.version_policy.HasField("all"), "an older FM's adapter loads though it is not the newest"
    fm_config = from_pbtxt((pinned_repo / FM_MODEL / "config.pbtxt").read_text())
    assert fm_config.version_policy.latest.num_versions == 2


def test_pruning_keeps_the_loaded_versions_and_their_adapters(pinned_repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(pinned_repo, root)
    repo = ModelRepository(root)
    assert repo.prune(FM_MODEL, 1) == [], "the newest 2 FM versions are never pruned"
    assert repo.prune(ADAPTER_MODEL, 1) == [2], "adapter v2 serves no loaded FM; v1 and v3 do"
    assert repo.versions(ADAPTER_MODEL) == [1, 3]


def test_a_rollback_keeps_pins_to_the_versions_it_keeps(pinned_repo, schema, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(pinned_repo, root)
    ModelRepository(root).rollback(FM_MODEL, 1)
    config = from_pbtxt((root / ADAPTER_MODEL / "config.pbtxt").read_text())
    assert parse_pairs(config.parameters[FM_ADAPTERS_PARAMETER].string_value) == {1: 1}
    backend = OnnxBackend(root)
    batch = random_batch(schema, 4, 4, seed=1)
    knowledge = backend.run(batch, OUTPUTS, fm_version=1)
    assert (knowledge.fm_version, knowledge.adapter_version) == (1, 1)
    assert_outputs(knowledge.outputs, direct(root, 1, 1, batch))
    with pytest.raises(VersionNotLoaded, match="FM version 2 is not loaded; the loaded versions are 1"):
        backend.run(batch, OUTPUTS, fm_version=2)


def test_embedded_backend_pins_each_version_and_defaults_to_the_newest(pinned_repo, schema):
    backend = OnnxBackend(pinned_repo)
    assert asyncio.run(backend.loaded()) == [(2, 3), (1, 1)]
    batch = random_batch(schema, 20, 8, seed=5)
    one, two = direct(pinned_repo, 1, 1, batch), direct(pinned_repo, 2, 3, batch)
    assert not np.allclose(one[LOGITS], two[LOGITS], atol=1e-3), "the two FM versions must differ"
    for pin, want, versions in ((1, one, (1, 1)), (2, two, (2, 3)), (None, two, (2, 3))):
        knowledge = backend.run(batch, OUTPUTS, fm_version=pin)
        assert_outputs(knowledge.outputs, want)
        assert (knowledge.fm_version, knowledge.adapter_version) == versions


def test_a_pin_to_a_version_not_loaded_is_refused_naming_the_versions(pinned_repo, schema):
    backend = OnnxBackend(pinned_repo, loaded_versions=1)
    assert asyncio.run(backend.loaded()) == [(2, 3)]
    with pytest.raises(VersionNotLoaded) as refused:
        backend.run(random_batch(schema, 2, 2), OUTPUTS, fm_version=1)
    code, public = status_of(refused.value, 1.0)
    assert code.name == "FAILED_PRECONDITION"
    assert public == "FM version 1 is not loaded; the loaded versions are 2"


def test_merged_calls_pinned_to_different_versions_never_share_a_run(pinned_repo, schema):
    backend = OnnxBackend(pinned_repo)
    runs: list[int | None] = []
    infer = backend.infer

    async def counted(batch, outputs, timeout_s=None, chunk=None, fm_version=None):
        runs.append(fm_version)
        return await infer(batch, outputs, timeout_s, chunk, fm_version)

    backend.infer = counted  # type: ignore[method-assign]  # observes the real backend's runs
    cfg = FrontendConfig(backend="onnxruntime", repository=pinned_repo)
    plane = DataPlane(backend, cfg, FrontendMetrics("t"), user_input_names(schema))
    pins = [1, 2, None, 1, 7, 2]
    calls = [Call(random_batch(schema, 3 + i, 4, seed=i), OUTPUTS, pin) for i, pin in enumerate(pins)]
    results = asyncio.run(plane._merged(calls))
    assert sorted(runs, key=str) == sorted([1, 2, None, 7], key=str), "one backend run per pinned version"
    pairs = {1: (1, 1), 2: (2, 3), None: (2, 3)}
    for call, result in zip(calls, results, strict=True):
        if call.fm_version == 7:
            assert isinstance(result, VersionNotLoaded) and result.available == (2, 1)
            continue
        assert not isinstance(result, Exception)
        assert (result.fm_version, result.adapter_version) == pairs[call.fm_version]
        assert_outputs(result.outputs, direct(pinned_repo, *pairs[call.fm_version], call.batch))


@pytest.fixture
def triton(triton_config, pinned_repo, tmp_path):
    """A real Triton on a copy of the two-version repository."""
    root = tmp_path / "repo"
    shutil.copytree(pinned_repo, root)
    with TritonServer(triton_config(root, tmp_path / "triton")) as server:
        yield server, ModelRepository(root)


@pytest.mark.stack
def test_triton_pins_each_version_and_defaults_to_the_newest(triton, schema):
    server, repo = triton
    batch = random_batch(schema, 20, 8, seed=5)

    async def scenario():
        backend = TritonBackend(server.cfg.grpc_url)
        try:
            loaded = await backend.loaded()
            replies = [await backend.infer(batch, OUTPUTS, fm_version=pin) for pin in (1, 2, None)]
            return loaded, replies
        finally:
            await backend.close()

    loaded, (one, two, latest) = asyncio.run(scenario())
    assert loaded == [(2, 3), (1, 1)]
    for knowledge, (fm, adapter) in ((one, (1, 1)), (two, (2, 3)), (latest, (2, 3))):
        assert (knowledge.fm_version, knowledge.adapter_version) == (fm, adapter)
        assert_outputs(knowledge.outputs, direct(repo.root, fm, adapter, batch))


@pytest.mark.stack
def test_triton_publish_during_pinned_traffic_fails_no_call_and_prunes_to_a_refusal(triton, schema):
    server, repo = triton
    batch = random_batch(schema, 16, 8, seed=9)

    async def scenario():
        backend = TritonBackend(server.cfg.grpc_url)
        seen: list[tuple[int | None, int, int]] = []
        failures: list[Exception] = []
        stop = asyncio.Event()

        async def caller(pin: int | None):
            while not stop.is_set():
                try:
                    k = await backend.infer(batch, OUTPUTS, fm_version=pin)
                    seen.append((pin, k.fm_version, k.adapter_version))
                except Exception as e:  # counted, the test asserts none
                    failures.append(e)

        try:
            callers = [asyncio.create_task(caller(pin)) for pin in (2, 2, None)]
            while len(seen) < 10:
                await asyncio.sleep(0.05)
            # A new FM (a copy of v2's graph, stamped 3) with its adapter, rolled out as
            # the side trainer does: FM first, then the adapter, pruning to one on disk.
            repo.publish(FM_MODEL, repo.root / FM_MODEL / "2" / "model.onnx")
            repo.publish(ADAPTER_MODEL, repo.root / ADAPTER_MODEL / "3" / "model.onnx")
            async with TritonClient(server.cfg.grpc_url) as control:
                rollouts = [await roll_out(control, repo, m, keep=1) for m in (FM_MODEL, ADAPTER_MODEL)]
            count = len(seen)
            while len(seen) < count + 10:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*callers)
            with pytest.raises(VersionNotLoaded) as refused:
                await backend.infer(batch, OUTPUTS, fm_version=1)
            return rollouts, seen, failures, refused.value, await backend.loaded()
        finally:
            await backend.close()

    rollouts, seen, failures, refused, loaded = asyncio.run(scenario())
    assert all(r.loaded for r in rollouts)
    assert failures == []
    assert {s for s in seen if s[0] == 2} == {(2, 2, 3)}, "pinned calls kept v2 and its adapter throughout"
    assert (None, 3, 4) in seen, "unpinned calls moved to the new version"
    assert repo.versions(FM_MODEL) == [2, 3], "v1 is pruned: the newest two stay"
    assert loaded == [(3, 4), (2, 3)]
    assert refused.asked == 1 and refused.available == (3, 2)


@pytest.fixture
def ray_session():
    yield
    ray.shutdown()


def test_gem_embed_stamps_the_pinned_version_and_records_it(ray_session, pinned_repo, synth_dir, schema, tmp_path):
    source = resolve_paths(synth_dir)[0]
    rows = 200
    out = tmp_path / "out"
    run_embed(EmbedConfig(source=str(source), out=out, repository=pinned_repo, limit=rows, fm_version=1))
    got = pq.read_table(out / source.stem).sort_by("example_id")
    table = pq.read_table(source).sort_by("example_id").slice(0, rows)
    table = table.filter(pc.is_in(table["example_id"], got["example_id"]))
    want = direct(pinned_repo, 1, 1, table_to_batch(table, schema, labels=False))
    assert set(got["fm_version"].to_pylist()) == {1} and set(got["adapter_version"].to_pylist()) == {1}
    embedding = np.stack(got["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(embedding, want["embedding"], atol=1e-5)
    manifest = json.loads((out / source.stem / MANIFEST).read_text())
    assert manifest["pinned_fm_version"] == 1 and manifest["fm_versions"] == [1]
    # Another pin does not count the file as done: it is stamped again, with v2.
    summary = run_embed(EmbedConfig(source=str(source), out=out, repository=pinned_repo, limit=rows, overwrite=False))
    assert not any(f.skipped for f in summary.files)
    assert set(pq.read_table(out / source.stem)["fm_version"].to_pylist()) == {2}


def test_gem_embed_refuses_a_pin_not_loaded_in_one_line(gem, pinned_repo, synth_dir, tmp_path):
    source = resolve_paths(synth_dir)[0]
    result = gem("embed", str(source), "--out", str(tmp_path / "out"), "--repo", str(pinned_repo), "--fm-version", "9")
    assert result.returncode == 2
    assert "FM version 9 is not loaded; the loaded versions are 2, 1" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


APPS = ("triton", "embedded")


@pytest.fixture(scope="module")
def pinned_stack(triton_config, pinned_repo, tmp_path_factory):
    """Triton on a copy of the two-version repository and one Serve instance with two
    applications on it: `triton` and `embedded`; yields ({application: address}, repo)."""
    work = tmp_path_factory.mktemp("pinned-stack")
    repo = work / "repo"
    shutil.copytree(pinned_repo, repo)
    triton = TritonServer(triton_config(repo, work / "triton")).start()
    grpc_port, (http_port,) = free_port_run(len(APPS)), free_ports(1)
    try:
        launcher.start(
            FrontendConfig(triton_url=triton.cfg.grpc_url), grpc_port, http_port, name="triton", apps=len(APPS)
        )
        light = KnowledgeIngress.options(ray_actor_options={"num_cpus": 0})
        embedded = FrontendConfig(backend="onnxruntime", repository=repo)
        serve.run(light.bind(embedded), name="embedded", route_prefix="/embedded", blocking=False)
        addresses = {app: launcher.address_of(app) for app in APPS}
        for app in APPS:
            launcher.wait_healthy(addresses[app], application=app)
        yield addresses, repo
    finally:
        launcher.stop()
        triton.stop()


@pytest.mark.stack
@pytest.mark.parametrize("app", APPS)
def test_the_front_end_serves_pins_lists_versions_and_refuses_a_pin_not_loaded(pinned_stack, app, schema):
    addresses, repo = pinned_stack
    batch = random_batch(schema, 6, 4, seed=2)
    with KnowledgeClient(addresses[app], application=app, timeout_s=60) as client:
        info = client.info()
        assert [(v.fm, v.adapter) for v in info.available] == [(2, 3), (1, 1)]
        assert (info.versions.fm, info.versions.adapter) == (2, 3), "the default is the newest"
        for pin, (fm, adapter) in ((1, (1, 1)), (2, (2, 3)), (None, (2, 3))):
            reply = client.generate(batch, fm_version=pin)
            assert (reply.fm_version, reply.adapter_version) == (fm, adapter)
            want = direct(repo, fm, adapter, batch)
            np.testing.assert_allclose(reply.outputs["embedding"], want["embedding"], atol=1e-5)
            np.testing.assert_allclose(reply.outputs["adapted_labels"], sigmoid(want["adapted_logits"]), atol=1e-5)
        # A call of one user in the shared form (handed over user-indexed) runs the pinned
        # version as the same rows repeated do.
        user = set(user_input_names(schema))
        one, ads = random_batch(schema, 1, 4, seed=3), random_batch(schema, 6, 4, seed=4)
        shared = {k: v for k, v in one.items() if k in user}
        per_ad = {k: v for k, v in ads.items() if k not in user}
        repeated = {**per_ad, **{k: np.repeat(v, 6, axis=0) for k, v in shared.items()}}
        got = client.generate(per_ad, shared=shared, fm_version=1)
        assert (got.fm_version, got.adapter_version) == (1, 1)
        want = direct(repo, 1, 1, repeated)
        np.testing.assert_allclose(got.outputs["embedding"], want["embedding"], atol=1e-5)
        np.testing.assert_allclose(got.outputs["adapted_labels"], sigmoid(want["adapted_logits"]), atol=1e-5)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(batch, fm_version=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details().startswith("FM version 5 is not loaded; the loaded versions are 2, 1")
    # An old client's request (no fm_version field) and an explicit 0 both mean the latest;
    # a negative version is the caller's error.
    stub = pb_grpc.KnowledgeServiceStub(grpc.insecure_channel(addresses[app]))
    features = {k: encode(v) for k, v in batch.items()}
    metadata = [("application", app)]
    for request in (pb.GenerateRequest(features=features), pb.GenerateRequest(features=features, fm_version=0)):
        assert stub.Generate(request, timeout=60, metadata=metadata).versions.fm == 2
    with pytest.raises(grpc.RpcError) as negative:
        stub.Generate(pb.GenerateRequest(features=features, fm_version=-1), timeout=60, metadata=metadata)
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fm_version" in negative.value.details()
