"""Object storage: `gem embed`, `gem train` and the side trainer read and write `s3://`
on a real S3 API server on the loopback (moto's server mode), not a mock of the client.
The storage module on both kinds of place; `gem embed` s3 -> s3 equals the local-folder
run, and killed after its first commit then rerun ends the same, every row once; the
manifest-last commit counts only complete outputs; one-line errors for a missing bucket,
an unreachable endpoint, missing and refused credentials."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from moto.server import ThreadedMotoServer

from jobs.embed import EmbedConfig, run_embed
from jobs.embed.commit import STAGING
from jobs.embed.manifest import MANIFEST, committed
from model import storage
from model.checkpoint import load_checkpoint
from model.data.reader import resolve_paths
from serving.local.ports import free_ports
from tests.test_embed import assert_same_rows, read_out
from tests.trainer_support import ledger, make_stream
from trainer.stream import load_shard

# Starts a local S3 server, Ray, `gem` and the side trainer's processes.
pytestmark = pytest.mark.stack

BUCKET = "gem-logs"
ROWS_PER_FILE = 1_500


@dataclass(frozen=True)
class S3:
    """The running server: its settings (as a user sets them), a boto3 client for the
    test's own uploads and listings."""

    env: dict[str, str]
    client: object

    def upload(self, folder: Path, prefix: str) -> str:
        for path in sorted(folder.glob("*.parquet")):
            self.client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")  # type: ignore[attr-defined]
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _wait_until(ready, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what}: not ready after {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # The Ray of an earlier module was started without these settings: its workers
    # (which write the parts) would not reach the server.
    ray.shutdown()
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        _wait_until(lambda: client.list_buckets() is not None, "the S3 server")
        client.create_bucket(Bucket=BUCKET)
        yield S3(env, client)
    finally:
        ray.shutdown()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_s3(uri: str) -> pa.Table:
    where = storage.place(uri)
    return read_out(where.path, where.fs)


# -- the storage module --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_storage_on_both_kinds_of_place(kind, s3, tmp_path):
    root = storage.place(tmp_path / "root" if kind == "local" else f"s3://{BUCKET}/unit")
    assert root.remote == (kind == "s3")
    a, b = root / "in" / "a.parquet", root / "in" / "b.parquet"
    storage.make_dirs(a.parent)
    for i, f in enumerate((a, b)):
        pq.write_table(pa.table({"x": [i]}), f.path, filesystem=f.fs)
    storage.write_bytes(root / "in" / "notes.txt", b"not a shard")
    assert storage.parquet_files(root / "in") == [a, b]
    assert storage.parquet_files(root / "in" / "b*.parquet") == [b]
    assert storage.parquet_files(a) == [a] and storage.exists(root / "in") and not storage.exists(root / "nope")
    assert storage.sha256(a) == hashlib.sha256(storage.read_bytes(a)).hexdigest()
    assert a.is_relative_to(root) and not root.is_relative_to(a) and (a.name, a.stem) == ("a.parquet", "a")

    # publish: the named files and the marker replace what the target held.
    target = root / "out"
    storage.write_bytes(target / "stale.parquet", b"old")
    storage.publish(root / "in", ["a.parquet"], target, ("_marker", b"done"))
    assert sorted(e.base_name for e in storage.listing(target)) == ["_marker", "a.parquet"]
    assert storage.read_bytes(target / "_marker") == b"done"

    storage.move(b, root / "moved.parquet")
    assert not storage.exists(b) and storage.exists(root / "moved.parquet")
    storage.remove(root)
    assert not storage.exists(root / "out" / "a.parquet")


def test_a_commit_counts_only_when_its_manifest_names_parts_that_exist(s3):
    out = storage.place(f"s3://{BUCKET}/commits/part-1")
    part = out / "part-x.parquet"
    pq.write_table(pa.table({"example_id": [1]}), part.path, filesystem=part.fs)
    assert committed(out, None, None) is None, "parts without a manifest: an interrupted commit"
    manifest = {"limit": None, "pinned_fm_version": None, "parts": ["part-x.parquet", "part-y.parquet"]}
    storage.write_bytes(out / MANIFEST, json.dumps(manifest).encode())
    assert committed(out, None, None) is None, "a part it names is missing"
    manifest["parts"] = ["part-x.parquet"]
    storage.write_bytes(out / MANIFEST, json.dumps(manifest).encode())
    assert committed(out, None, None) == manifest


# -- gem embed -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(synth_dir, tmp_path_factory) -> Path:
    """Three small files of the synthetic shards."""
    folder = tmp_path_factory.mktemp("s3_logged")
    for path in resolve_paths(synth_dir)[:3]:
        pq.write_table(pq.read_table(path).slice(0, ROWS_PER_FILE), folder / path.name)
    return folder


@pytest.fixture(scope="module")
def local_run(logged, published_repo, tmp_path_factory, s3) -> Path:
    out = tmp_path_factory.mktemp("s3_reference")
    summary = run_embed(EmbedConfig(source=str(logged), out=out, repository=published_repo, batch_size=512))
    assert not summary.failed_files
    return out


def test_embed_from_s3_to_s3_equals_the_local_folder_run(s3, logged, local_run, published_repo):
    source, out = s3.upload(logged, "embed-in"), f"s3://{BUCKET}/embed-out"
    summary = run_embed(EmbedConfig(source=source, out=out, repository=published_repo, batch_size=512))
    assert not summary.failed_files and summary.rows_out == 3 * ROWS_PER_FILE
    for path in resolve_paths(logged):
        assert_same_rows(read_s3(f"{out}/{path.stem}"), read_out(local_run / path.stem), path.name)
        manifest = json.loads(storage.read_bytes(storage.place(f"{out}/{path.stem}/{MANIFEST}")))
        want = json.loads((local_run / path.stem / MANIFEST).read_text())
        assert manifest == {**want, "source": f"{source}/{path.name}", "parts": manifest["parts"]}
        assert sorted(k.rsplit("/", 1)[1] for k in s3.keys(f"embed-out/{path.stem}/")) == sorted(
            [*manifest["parts"], MANIFEST]
        )
    assert not s3.keys(f"embed-out/{STAGING}/")
    again = run_embed(EmbedConfig(source=source, out=out, repository=published_repo))
    assert all(f.skipped for f in again.files)


def test_embed_killed_after_its_first_commit_and_rerun_equals_the_local_run(gem_bin, s3, logged, local_run,
                                                                           published_repo, tmp_path):  # fmt: skip
    source, out = s3.upload(logged, "kill-in"), f"s3://{BUCKET}/kill-out"
    args = [str(gem_bin), "embed", source, "--out", out, "--repo", str(published_repo), "--actors", "2",
            "--batch-size", "128"]  # fmt: skip
    env = {**os.environ, **s3.env, "COLUMNS": "200"}
    job = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)  # fmt: skip
    try:
        manifests = lambda: [k for k in s3.keys("kill-out/") if k.endswith(MANIFEST)]  # noqa: E731
        _wait_until(lambda: manifests() or job.poll() is not None, "the first commit", timeout_s=300)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    first = manifests()
    assert len(first) == 1, f"killed after the first commit, not later: {first}"
    rerun = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("skipped (committed before") == 1
    for path in resolve_paths(logged):
        got = read_s3(f"{out}/{path.stem}")
        assert len(np.unique(got["example_id"])) == got.num_rows == ROWS_PER_FILE, "every row exactly once"
        assert_same_rows(got, read_out(local_run / path.stem), path.name)
    assert not s3.keys(f"kill-out/{STAGING}/"), "what the killed run staged is gone"


def test_storage_errors_are_one_line(gem, s3, logged, published_repo, tmp_path):
    missing = gem("embed", "s3://no-such-bucket/logs", "--out", str(tmp_path / "o"), "--repo", str(published_repo),
                  env=s3.env)  # fmt: skip
    assert missing.returncode == 2 and "no bucket 'no-such-bucket'" in missing.stderr, missing.stderr
    closed = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_ports(1)[0]}"}
    unreachable = gem("train", "--data", f"s3://{BUCKET}/x", "--out", str(tmp_path / "c"), env=closed)
    assert unreachable.returncode == 2 and "cannot reach the S3 endpoint" in unreachable.stderr, unreachable.stderr
    for run in (missing, unreachable):
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr


def test_a_shard_the_trainer_cannot_reach_is_an_outage_not_a_bad_shard(s3, schema, monkeypatch):
    """A read that fails because S3 is away raises StorageError, so the trainer stops
    (and is restarted) rather than quarantining a good shard as unreadable."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        load_shard(f"s3://{BUCKET}/stream/part-00000.parquet", schema, 32)


@pytest.fixture
def auth_s3() -> Iterator[str]:
    """A second server that checks credentials (moto's IAM auth from the first request)."""
    port = free_ports(1)[0]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until(lambda: urllib.request.urlopen(f"{url}/moto-api/", timeout=1).status == 200, "moto with auth")
        yield url
    finally:
        server.kill()
        server.wait()


def test_missing_and_refused_credentials_are_one_line(auth_s3, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    with pytest.raises(storage.StorageError, match="refused the credentials"):
        storage.parquet_files(f"s3://{BUCKET}/logs")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError, match="no AWS credentials"):
        storage.parquet_files(f"s3://{BUCKET}/logs")


# -- gem train and the side trainer --------------------------------------------------


def test_gem_train_reads_its_data_from_s3(gem, s3, logged, schema, tmp_path):
    source = s3.upload(logged, "train-in")
    common = ["--preset", "tiny", "--epochs", "1", "--progress-every", "0"]
    from_s3 = gem("train", "--data", source, "--out", str(tmp_path / "s3"), *common, env=s3.env)
    assert from_s3.returncode == 0, from_s3.stdout[-2000:] + from_s3.stderr[-2000:]
    local = gem("train", "--data", str(logged), "--out", str(tmp_path / "local"), *common)
    assert local.returncode == 0, local.stderr[-2000:]
    # The same shards, in the same order: the same model, to the metric (examples/s aside).
    got, want = (load_checkpoint(tmp_path / name).metrics["gem"] for name in ("s3", "local"))
    assert {t: got[t] for t in schema.task_names} == {t: want[t] for t in schema.task_names}


def test_the_side_trainer_streams_from_s3_and_writes_its_knowledge_there(gem, s3, schema, published_repo,
                                                                         tiny_checkpoint, tmp_path):  # fmt: skip
    """One FM cycle (train part-00000, gate on part-00002) over a stream on S3 with a
    corrupt part-00001 (quarantined on S3), --knowledge-out on S3: the knowledge equals
    `gem embed` of the gated shard with the same served versions."""
    local = tmp_path / "stream"
    make_stream(local, schema, shards=3, rows=1_000)
    (local / "part-00001.parquet").write_bytes(b"not a Parquet file")
    stream, knowledge = s3.upload(local, "stream"), f"s3://{BUCKET}/knowledge"
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    result = gem(
        "trainer", "run", "--stream", stream, "--repo", str(repo), "--state", str(tmp_path / "state"),
        "--checkpoint", str(tiny_checkpoint), "--preset", "tiny", "--batch-size", "128", "--tolerance", "10",
        "--poll-s", "0.2", "--exit-when-idle", "--knowledge-out", knowledge, cwd=tmp_path, env=s3.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stream/.quarantine/part-00001.parquet" in s3.keys("stream/.quarantine/")
    assert [e["shard"] for e in ledger(tmp_path / "state") if e["kind"] == "quarantine"] == ["part-00001.parquet"]
    assert [k for k in s3.keys("knowledge/") if k.endswith(MANIFEST)] == [f"knowledge/part-00002/{MANIFEST}"]
    assert not s3.keys(f"knowledge/{STAGING}/")
    embedded = tmp_path / "embed"
    run_embed(EmbedConfig(source=str(local / "part-00002.parquet"), out=embedded, repository=published_repo))
    got = read_s3(f"{knowledge}/part-00002")
    assert got.num_rows == 1_000
    assert_same_rows(got, read_out(embedded / "part-00002"), "part-00002")
