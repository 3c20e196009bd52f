"""Through the real Ray Serve gRPC proxy: both backends (Triton and embedded ONNX
Runtime) against the in-process model, the shared-user form, concurrent calls merged
into batches, every bad-input case, Triton going away and coming back, GetModelInfo."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from gem.knowledge.client import AsyncKnowledgeClient, KnowledgeClient
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.v1 import knowledge_pb2_grpc as pb_grpc
from gem.knowledge.wire import decode, encode
from ray import serve

from export.contract import FM_MODEL
from model.checkpoint import load_checkpoint
from model.data.reader import resolve_paths, table_to_batch
from model.examples import random_batch
from model.features import input_specs
from model.outputs import sigmoid
from model.user_index import graph_feeds
from serving.backends.triton_client import TritonClient
from serving.config import INGRESSES, SERVICER_FUNCTIONS, FrontendConfig
from serving.local import launcher
from serving.local.ports import free_port_run, free_ports
from serving.local.triton import TritonServer
from serving.servicer import KnowledgeIngress

# Starts Triton and/or Ray: `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
APPS = ("triton", "embedded")
TOKEN = "s3cret-token"


@pytest.fixture(scope="module", params=INGRESSES)
def stack(request, triton_config, published_repo, tmp_path_factory):
    """Triton on a copy of the repository, and one Serve instance with three applications:
    `triton` (the default backend), `embedded` (in-process ONNX Runtime) and `secured`
    (embedded, with a token); yields ({application: its gRPC address}, Triton, the
    repository). Once per ingress: under direct ingress each application's replica
    answers a port of its own, through the proxy all share one."""
    work = tmp_path_factory.mktemp("stack")
    repo = work / "repo"
    shutil.copytree(published_repo, repo)
    triton = TritonServer(triton_config(repo, work / "triton")).start()
    grpc_port, (http_port,) = free_port_run(len(APPS) + 1), free_ports(1)
    try:
        cfg = FrontendConfig(triton_url=triton.cfg.grpc_url, max_examples_per_call=1000, max_batch_examples=2048)
        launcher.start(cfg, grpc_port, http_port, name="triton", ingress=request.param, apps=len(APPS) + 1)
        embedded = FrontendConfig(backend="onnxruntime", repository=repo, max_examples_per_call=1000)
        secured = FrontendConfig(backend="onnxruntime", repository=repo, auth_token=TOKEN)
        # Replicas reserve a CPU by default; three applications on two cores need less.
        light = KnowledgeIngress.options(ray_actor_options={"num_cpus": 0})
        serve.run(light.bind(embedded), name="embedded", route_prefix="/embedded", blocking=False)
        serve.run(light.bind(secured), name="secured", route_prefix="/secured", blocking=False)
        addresses = {app: launcher.address_of(app) for app in (*APPS, "secured")}
        for app in APPS:
            launcher.wait_healthy(addresses[app], application=app)
        yield addresses, triton, repo
    finally:
        launcher.stop()
        triton.stop()


def stub(address: str) -> pb_grpc.KnowledgeServiceStub:
    return pb_grpc.KnowledgeServiceStub(grpc.insecure_channel(address))


def generate(addresses, app, features, shared=None, outputs=(), timeout=60):
    request = pb.GenerateRequest(
        features={k: encode(v) for k, v in features.items()},
        shared={k: encode(v) for k, v in (shared or {}).items()},
        outputs=list(outputs),
    )
    reply = stub(addresses[app]).Generate(request, timeout=timeout, metadata=[("application", app)])
    return {k: decode(k, v) for k, v in reply.outputs.items()}, reply.versions


@pytest.mark.parametrize("app", APPS)
def test_results_equal_the_in_process_model(stack, app, tiny_checkpoint, schema):
    addresses, _, _ = stack
    ckpt = load_checkpoint(tiny_checkpoint)
    batch = random_batch(schema, 40, 12, seed=5)
    out, versions = generate(addresses, app, batch)
    with torch.no_grad():
        want = ckpt.model({k: torch.from_numpy(v) for k, v in batch.items()})
        adapted = ckpt.adapter(want["logits"], torch.from_numpy(batch["surface"]))
    np.testing.assert_allclose(out["labels"], sigmoid(want["logits"].numpy()), atol=1e-4)
    np.testing.assert_allclose(out["adapted_labels"], sigmoid(adapted.numpy()), atol=1e-4)
    # `after:` tasks (ESMM in the FM, the adapter's cap): never above their parent, row by row.
    for t, parent in enumerate(schema.task_parents):
        if parent is not None:
            for key in ("labels", "adapted_labels"):
                assert (out[key][:, t] <= out[key][:, parent]).all(), key
    np.testing.assert_allclose(out["embedding"], want["embedding"].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["user_embedding"], want["user_embedding"].numpy(), atol=1e-4)
    assert (versions.fm, versions.adapter) == (1, 1)


@pytest.mark.parametrize("app", APPS)
def test_shared_user_form_equals_repeated_rows(stack, app, schema):
    addresses, _, _ = stack
    user = {s.name for s in input_specs(schema) if s.side == "user"}
    one = random_batch(schema, 1, 20, seed=1)
    ads = random_batch(schema, 30, 20, seed=2)
    shared = {k: v for k, v in one.items() if k in user}
    per_ad = {k: v for k, v in ads.items() if k not in user}
    repeated = {**per_ad, **{k: np.repeat(v, 30, axis=0) for k, v in shared.items()}}
    got, _ = generate(addresses, app, per_ad, shared)
    want, _ = generate(addresses, app, repeated)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)


def test_200_concurrent_calls_get_their_own_rows(stack, repo_session, schema):
    addresses, _, _ = stack
    rng = np.random.default_rng(0)
    batches = [
        random_batch(schema, int(n), int(rng.integers(1, 40)), seed=i) for i, n in enumerate(rng.integers(1, 64, 200))
    ]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(lambda b: generate(addresses, "triton", b, outputs=[pb.OUTPUT_LABELS])[0], batches))
    for batch, reply in zip(batches, replies, strict=True):
        (want,) = repo_session.run(["logits"], graph_feeds(batch, repo_session.get_inputs()))
        np.testing.assert_allclose(reply["labels"], sigmoid(want), atol=1e-5)


@pytest.mark.parametrize("app", APPS)
def test_merged_calls_of_different_users_keep_their_users_apart(stack, repo_session, schema, app):
    """Shared-form calls (U = 1) of different users, interleaved with per-example calls of
    1 to 12 users (some users repeated within the call), all in flight at once so the
    front end merges them: every call gets the rows of its own users, as the served FM
    computes them on that call alone."""
    addresses, _, _ = stack
    user = {s.name for s in input_specs(schema) if s.side == "user"}
    rng = np.random.default_rng(3)
    calls = []
    for i in range(48):
        sample = random_batch(schema, int(rng.integers(1, 40)), int(rng.integers(1, 24)), seed=100 + i)
        rows = len(sample["surface"])
        if i % 2 == 0:  # shared form: one user for every candidate
            ads = {k: v for k, v in sample.items() if k not in user}
            calls.append((ads, {k: v[:1] for k, v in sample.items() if k in user}))
        else:  # per example: rows drawn from a handful of users
            owner = rng.integers(0, min(rows, 12), rows)
            calls.append(({k: (v[owner] if k in user else v) for k, v in sample.items()}, {}))
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        replies = list(pool.map(lambda c: generate(addresses, app, c[0], c[1], outputs=[pb.OUTPUT_LABELS])[0], calls))
    for (features, shared), reply in zip(calls, replies, strict=True):
        rows = len(features["surface"])
        batch = {**features, **{k: np.repeat(v, rows, axis=0) for k, v in shared.items()}}
        (want,) = repo_session.run(["logits"], graph_feeds(batch, repo_session.get_inputs()))
        np.testing.assert_allclose(reply["labels"], sigmoid(want), atol=1e-5)


@pytest.fixture(scope="module")
def repo_session(published_repo):
    return ort.InferenceSession(str(published_repo / FM_MODEL / "1" / "model.onnx"))


BAD_CASES = (
    "wrong dtype", "wrong shape", "unknown feature", "missing feature", "surface out of range", "rows disagree",
    "too long sequence", "empty batch", "oversized call", "non-finite dense", "shared column of 0 rows",
    "shared column of 2 rows",
)  # fmt: skip


def bad_request(schema, case):
    """(features, or (features, shared), and what the refusal must name)."""
    good = random_batch(schema, 4, 3)
    per_ad = {k: v for k, v in good.items() if k != "user_id"}
    return {
        "wrong dtype": ({**good, "user_id": good["user_id"].astype(np.float32)}, "user_id"),
        "wrong shape": ({**good, "hist_item_id": good["hist_item_id"][:, 0]}, "hist_item_id"),
        "unknown feature": ({**good, "favourite_color": good["user_id"]}, "favourite_color"),
        "missing feature": ({k: v for k, v in good.items() if k != "ad_id"}, "ad_id"),
        "surface out of range": ({**good, "surface": good["surface"] + 7}, "surface"),
        "rows disagree": ({**good, "ad_id": good["ad_id"][:2]}, "ad_id"),
        "too long sequence": (random_batch(schema, 2, 300), "user_history"),
        "empty batch": ({k: v[:0] for k, v in good.items()}, "empty batch"),
        "oversized call": (random_batch(schema, 1001, 1), "limit of 1000"),
        "non-finite dense": ({**good, "ad_bid_log": np.full(4, np.nan, np.float32)}, "ad_bid_log"),
        # The shared form: one row per shared column, whatever the rows of `features`.
        "shared column of 0 rows": ((per_ad, {"user_id": good["user_id"][:0]}), "'user_id' must have exactly one row"),
        "shared column of 2 rows": ((per_ad, {"user_id": good["user_id"][:2]}), "'user_id' must have exactly one row"),
    }[case]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_invalid_argument_and_others_succeed(stack, schema, case):
    addresses, _, _ = stack
    bad, named = bad_request(schema, case)
    features, shared = bad if isinstance(bad, tuple) else (bad, None)
    good = random_batch(schema, 8, 5)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(generate, addresses, "triton", good) for _ in range(6)]
        with pytest.raises(grpc.RpcError) as e:
            generate(addresses, "triton", features, shared)
        assert all(f.result()[0]["labels"].shape == (8, 2) for f in goods)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in e.value.details()


def test_get_model_info_matches_the_schema(stack, schema):
    addresses, _, _ = stack
    info = stub(addresses["triton"]).GetModelInfo(
        pb.GetModelInfoRequest(), metadata=[("application", "triton")], timeout=30
    )
    assert [i.name for i in info.inputs] == [s.name for s in input_specs(schema)]
    assert list(info.tasks) == list(schema.task_names) and list(info.surfaces) == list(schema.surfaces)
    assert {o.name for o in info.outputs} == {"labels", "adapted_labels", "embedding", "user_embedding"}
    assert info.backend == "triton" and info.versions.fm == 1 and info.max_examples_per_call == 1000
    assert "hist_item_id" in info.schema_yaml


def test_triton_down_is_unavailable_and_recovers_without_restart(stack, schema):
    addresses, triton, _ = stack
    batch = random_batch(schema, 3, 3)
    triton.stop()
    try:
        with pytest.raises(grpc.RpcError) as e:
            generate(addresses, "triton", batch, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # The embedded application does not depend on Triton.
        assert generate(addresses, "embedded", batch)[0]["labels"].shape == (3, 2)
    finally:
        triton.start()
    launcher.wait_healthy(addresses["triton"], timeout_s=30, application="triton")
    out, _ = generate(addresses, "triton", batch)
    assert out["labels"].shape == (3, 2)


def test_deadline_is_honoured(stack, schema):
    addresses, _, _ = stack
    with pytest.raises(grpc.RpcError) as e:
        generate(addresses, "triton", random_batch(schema, 900, 200), timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert generate(addresses, "triton", random_batch(schema, 2, 2))[0]["labels"].shape == (2, 2)


def test_bearer_token_is_checked_before_any_work(stack, schema):
    addresses, _, _ = stack
    batch = random_batch(schema, 2, 2)
    request = pb.GenerateRequest(features={k: encode(v) for k, v in batch.items()})
    for metadata in ([], [("authorization", "Bearer wrong")]):
        with pytest.raises(grpc.RpcError) as e:
            stub(addresses["secured"]).Generate(request, metadata=[("application", "secured"), *metadata], timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in e.value.details()
    reply = stub(addresses["secured"]).Generate(
        request, metadata=[("application", "secured"), ("authorization", f"Bearer {TOKEN}")], timeout=30
    )
    assert decode("labels", reply.outputs["labels"]).shape == (2, 2)


def test_client_takes_numpy_pandas_and_arrow_alike(stack, synth_dir, schema):
    addresses, _, _ = stack
    table = pq.read_table(resolve_paths(synth_dir)[-1]).slice(0, 25)
    not_features = {"example_id", "event_ts", *(t.label_column for t in schema.tasks)}
    features = table.select([c for c in table.column_names if c not in not_features])
    want = table_to_batch(table, schema, labels=False)
    with KnowledgeClient(addresses["triton"], application="triton", timeout_s=30) as client:
        from_numpy = client.generate(want)
        from_arrow = client.generate(features)
        from_pandas = client.generate(features.to_pandas(), outputs=["labels"])
    for reply in (from_arrow, from_pandas):
        np.testing.assert_allclose(reply.outputs["labels"], from_numpy.outputs["labels"], atol=1e-6)
    assert set(from_pandas.outputs) == {"labels"} and from_numpy.fm_version == 1


def test_async_client_shared_form_and_deadline(stack, schema):
    addresses, _, _ = stack
    user = {s.name for s in input_specs(schema) if s.side == "user"}
    sample = random_batch(schema, 12, 9, seed=4)

    async def calls():
        async with AsyncKnowledgeClient(addresses["embedded"], application="embedded", timeout_s=30) as client:
            shared = await client.generate(
                {k: v for k, v in sample.items() if k not in user},
                shared={k: v[:1] for k, v in sample.items() if k in user},
            )
            full = await client.generate({**sample, **{k: np.repeat(sample[k][:1], 12, axis=0) for k in user}})
            once = await client.generate(
                {k: v for k, v in sample.items() if k not in user},
                shared={k: v[:1] for k, v in sample.items() if k in user},
                user_embedding_once=True,
            )
            with pytest.raises(grpc.aio.AioRpcError) as per_example:
                await client.generate(sample, user_embedding_once=True)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.generate(random_batch(schema, 900, 200), timeout_s=0.001)
            return shared, full, once, per_example.value, e.value.code()

    shared, full, once, per_example, code = asyncio.run(calls())
    np.testing.assert_allclose(shared.outputs["labels"], full.outputs["labels"], atol=1e-6)
    # user_embedding_once: the one user's row, not one per candidate; the rest unchanged.
    user_embedding = full.outputs["user_embedding"]
    assert once.outputs["user_embedding"].shape == (1, user_embedding.shape[1])
    np.testing.assert_allclose(once.outputs["user_embedding"], user_embedding[:1], atol=1e-6)
    np.testing.assert_allclose(user_embedding, np.repeat(user_embedding[:1], 12, axis=0), atol=1e-6)
    np.testing.assert_allclose(once.outputs["embedding"], full.outputs["embedding"], atol=1e-6)
    assert per_example.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_embedding_once" in per_example.details()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


class FlakyService(pb_grpc.KnowledgeServiceServicer):
    """A real gRPC server that answers UNAVAILABLE to the first `failures` calls."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def Generate(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "backend restarting")
        return pb.GenerateResponse(versions=pb.ModelVersions(fm=7, adapter=3))


@pytest.mark.parametrize(("failures", "retries", "ok"), [(2, 3, True), (4, 3, False)])
def test_client_retries_unavailable(failures, retries, ok, schema, tiny_checkpoint):
    service = FlakyService(failures)
    server, port = flaky_server(service)
    try:
        client = KnowledgeClient(f"127.0.0.1:{port}", retries=retries, timeout_s=10)
        client._remember(pb.GetModelInfoResponse(schema_yaml=schema.to_yaml()))
        if ok:
            assert client.generate({}).fm_version == 7
        else:
            with pytest.raises(grpc.RpcError) as e:
                client.generate({})
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert service.calls == min(failures + 1, retries + 1)
        client.close()
    finally:
        server.stop(None)


def flaky_server(service: FlakyService, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    pb_grpc.add_KnowledgeServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


@pytest.mark.parametrize("retries", [3, 0])
def test_a_call_waits_for_a_server_that_comes_up_within_its_deadline(retries, schema):
    """A replica restarting refuses connections for seconds: with retries the call waits
    for it (gRPC's waitForReady) within its deadline; with retries=0 it fails at once."""
    (port,) = free_ports(1)
    client = KnowledgeClient(f"127.0.0.1:{port}", retries=retries, timeout_s=20)
    client._remember(pb.GetModelInfoResponse(schema_yaml=schema.to_yaml()))
    refused = threading.Event()  # the channel found nothing listening: the call is waiting
    client._channel.subscribe(lambda state: state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and refused.set())
    server = None
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.generate, {})
            assert refused.wait(15), "the channel never tried the closed port"
            if retries:
                # Down for 3 s, past what the retry policy's backoff spans (< 1.5 s).
                assert not concurrent.futures.wait([call], timeout=3).done, "the call did not wait"
                server, _ = flaky_server(FlakyService(0), port)
                assert call.result(timeout=20).fm_version == 7
            else:
                with pytest.raises(grpc.RpcError) as e:
                    call.result(timeout=20)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        if server is not None:
            server.stop(None)


def test_gem_query_prints_labels(gem_bin, stack):
    addresses, _, _ = stack
    result = subprocess.run(
        [str(gem_bin), "query", "--address", addresses["triton"], "--application", "triton", "--candidates", "3"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "click label" in result.stdout and "fm v1" in result.stdout


def test_serve_config_file_is_valid_and_matches_the_code():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    config = ServeDeploySchema(**raw)
    assert tuple(config.grpc_options.grpc_servicer_functions) == SERVICER_FUNCTIONS
    # Said, not left to Serve's default: as serving/local/launcher.py starts Serve.
    assert raw["grpc_options"]["enable_reflection"] is True
    (app,) = config.applications
    assert app.import_path == "serving.servicer:app_builder"
    FrontendConfig.from_args(app.args)  # every arg is a known setting
    assert app.deployments[0].max_ongoing_requests >= 512


def test_unknown_output_is_invalid_argument(stack, schema):
    addresses, _, _ = stack
    with pytest.raises(grpc.RpcError) as e:
        generate(addresses, "triton", random_batch(schema, 2, 2), outputs=[99])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 99" in e.value.details()


@pytest.mark.parametrize("app", APPS)
def test_server_timing_on_request(stack, app, schema):
    """Asked for, the reply's trailer says where the call's time went on the server (both
    ingresses, both clients), within the time the caller saw; not asked, nothing."""
    addresses, triton, _ = stack
    batch = random_batch(schema, 8, 6, seed=3)

    async def triton_requests() -> tuple[int, int]:
        async with TritonClient(triton.cfg.grpc_url, admin_key=triton.cfg.admin_key) as control:
            return await control.served_requests()

    before = asyncio.run(triton_requests()) if app == "triton" else None
    with KnowledgeClient(addresses[app], application=app, timeout_s=30) as client:
        assert client.generate(batch).server_timing == {}
        start = time.perf_counter()
        timed = client.generate(batch, server_timing=True)
        seen_ms = (time.perf_counter() - start) * 1000
    assert set(timed.server_timing) == {"decode", "model", "encode"}, timed.server_timing
    assert all(ms >= 0 for ms in timed.server_timing.values())
    assert sum(timed.server_timing.values()) <= seen_ms
    assert timed.server_timing["model"] > 0
    if app == "triton":
        # Triton's statistics (bench.breakdown's Triton-side time) count both calls (and
        # the health probes of the `triton` application, every few seconds).
        after = asyncio.run(triton_requests())
        assert after[0] - before[0] >= 2 and after[1] > before[1], (before, after)

    async def async_call():
        async with AsyncKnowledgeClient(addresses[app], application=app, timeout_s=30) as client:
            return await client.generate(batch, server_timing=True)

    assert set(asyncio.run(async_call()).server_timing) == {"decode", "model", "encode"}
