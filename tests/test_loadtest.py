"""The Locust load test against the real local stack (Triton + Ray Serve), and the front
end's Prometheus metrics it leaves behind."""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from gem.knowledge import KnowledgeClient
from prometheus_client.parser import text_string_to_metric_families

from loadtests.report import slo_violations
from loadtests.sweep import backend_list
from model.examples import random_batch
from model.schema import load_schema
from serving.config import FrontendConfig
from serving.local.ports import free_ports
from serving.local.stack import StackConfig, local_stack
from serving.local.triton import TritonConfig
from serving.prometheus import CALLS, DOCUMENTED, EXAMPLES_SERVED, MODEL_VERSION, REFUSALS

# Starts Triton and/or Ray: `pytest -m "not stack"` leaves it out.
pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
LOCUST = Path(sys.executable).with_name("locust")
LOCUSTFILE, CONF = ROOT / "loadtests" / "locustfile.py", ROOT / "loadtests" / "locust.conf"


@pytest.fixture(scope="module")
def stack(published_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loadtest-stack")
    shutil.copytree(published_repo, tmp / "repo")
    grpc_port, http, metrics, triton_http, triton_grpc, triton_metrics = free_ports(6)
    triton = TritonConfig(tmp / "repo", tmp / "triton", triton_http, triton_grpc, triton_metrics)
    cfg = StackConfig(FrontendConfig(), triton, grpc_port, http, metrics)
    with local_stack(cfg) as address:
        yield address, f"http://127.0.0.1:{metrics}/metrics", f"http://127.0.0.1:{triton_metrics}/metrics"


def locust(address: str, out: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    args = [str(LOCUST), "-f", str(LOCUSTFILE), "--config", str(CONF), "--host", address, "--csv", str(out / "gem"),
            "--html", str(out / "report.html"), "--summary-file", str(out / "summary.json"), *flags]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=out)
    return done, json.loads((out / "summary.json").read_text())


def scrape(url: str) -> dict[str, list]:
    """Samples by name, from the front end's Prometheus endpoint."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def poll(url: str, check, deadline_s: float = 60.0) -> dict[str, list]:
    """Ray's metrics agent exports every few seconds: scrape until `check` holds."""
    deadline = time.monotonic() + deadline_s
    while True:
        samples = scrape(url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_headless_run_with_two_worker_processes(stack, tmp_path):
    """Zero failures, the summary has the figures, the SLO (generous) holds, and the
    examples Locust counted over two processes equal those the front end counted."""
    address, metrics_url, _ = stack
    done, summary = locust(address, tmp_path, "--run-time", "12s", "--users", "4", "--rate", "6", "--processes", "2",
                           "--slo-p99-ms", "60000", "--slo-error-rate", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["calls"] > 10 and summary["failures"] == 0 and summary["slo"]["violations"] == []
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert summary["examples"] >= 16 * summary["calls"] and summary["examples_per_s"] > summary["calls_per_s"]
    with (tmp_path / "gem_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Generate"]["Request Count"]) == summary["calls"] and rows["Generate"]["Failure Count"] == "0"
    assert (tmp_path / "report.html").stat().st_size > 0
    served = EXAMPLES_SERVED.exported
    samples = poll(metrics_url, lambda s: total(s, served, method="Generate") >= summary["examples"])
    assert total(samples, served, method="Generate") == summary["examples"]


def test_slo_mode_fails_on_an_impossible_bound(stack, tmp_path):
    address, _, _ = stack
    done, summary = locust(address, tmp_path, "--run-time", "4s", "--users", "2", "--rate", "4",
                           "--slo-p99-ms", "0.001")  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "SLO violated: p99" in done.stderr and summary["slo"]["violations"]


def test_metrics_endpoint_exposes_the_documented_metrics(stack):
    address, metrics_url, _ = stack
    with KnowledgeClient(address) as client:
        client.info()
        with pytest.raises(grpc.RpcError) as refused:
            client.generate({"ad_id": np.arange(3), "no_such_feature": np.zeros(3, np.float32)})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    calls = CALLS.exported
    samples = poll(metrics_url, lambda s: total(s, calls, method="Generate", code="INVALID_ARGUMENT") >= 1)
    assert total(samples, calls, method="Generate", code="INVALID_ARGUMENT") == 1
    # A counter is exported from its first increment: no call here is refused by admission
    # control (tests/test_overload.py checks that counter).
    for metric in (m for m in DOCUMENTED if m is not REFUSALS):
        names = {metric.exported, f"{metric.exported}_bucket", f"{metric.exported}_count"}
        assert names & samples.keys(), f"{metric.exported} is not exported"
    assert total(samples, MODEL_VERSION.exported, model="fm") == 1
    assert {s.labels["backend"] for s in samples["ray_gem_backend_latency_ms_count"]} == {"triton"}


def dashboard_metrics(path: Path) -> set[str]:
    """The metric names a Grafana dashboard's PromQL queries (ours, Triton's, Ray's)."""
    exprs = [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p["targets"]]
    assert exprs, f"{path} queries nothing"
    names = {m for e in exprs for m in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e)}
    return {n for n in names if n.startswith(("ray_", "gem_", "nv_"))}


def exported_names(url: str, declared: bool = False) -> set[str]:
    """Every series name an endpoint exports, as Prometheus stores it: the names of its
    sample lines as written (prometheus_client's parser renames some counters). With
    `declared`, also the families declared without samples yet (prometheus-client's
    labelled counters, e.g. failures by stage, have none until the first failure), a
    counter `x` as `x_total` as that library writes its samples."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, flags=re.MULTILINE))
    if declared:
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, flags=re.MULTILINE):
            names.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return names


def test_the_grafana_dashboard_queries_only_exported_metrics(stack):
    """Every metric of deploy/grafana/dashboards/gem.json exists on a running stack: the
    front end's and Triton's endpoints after traffic, and the side trainer's endpoint."""
    from trainer.prometheus import TrainerMetrics

    address, metrics_url, triton_url = stack
    wanted = dashboard_metrics(ROOT / "deploy" / "grafana" / "dashboards" / "gem.json")
    assert {"ray_gem_calls_total", "nv_inference_count", "gem_trainer_cycles_total"} <= wanted
    with KnowledgeClient(address) as client:
        client.generate(random_batch(load_schema(), 4, 3))
    trainer = TrainerMetrics.create()
    (port,) = free_ports(1)
    trainer.serve(port, addr="127.0.0.1")
    ours = {n for n in wanted if n.startswith("ray_")}
    deadline = time.monotonic() + 60
    while not ours <= (front := exported_names(metrics_url)) and time.monotonic() < deadline:
        time.sleep(0.5)  # Ray's metrics agent exports every few seconds
    exported = front | exported_names(triton_url) | exported_names(f"http://127.0.0.1:{port}/metrics", declared=True)
    assert not wanted - exported, f"the dashboard queries metrics nothing exports: {sorted(wanted - exported)}"


def test_readme_documents_every_metric():
    readme = (ROOT / "README.md").read_text()
    missing = [m.exported for m in DOCUMENTED if m.exported not in readme]
    assert not missing, f"README.md does not document {missing}"


@pytest.mark.parametrize(
    ("result", "p99_ms", "error_rate", "broken"),
    [
        ({"calls": 10, "p99_ms": 40, "error_rate": 0.0}, 50, 0.0, []),
        ({"calls": 10, "p99_ms": 60, "error_rate": 0.0}, 50, -1, ["p99 60.0 ms > 50 ms"]),
        ({"calls": 10, "p99_ms": 60, "error_rate": 0.2}, 0, 0.1, ["error rate 0.2000 > 0.1"]),
        ({"calls": 0, "p99_ms": 0, "error_rate": 0.0}, 0, -1, ["no calls were made"]),
    ],
)
def test_slo_verdict(result, p99_ms, error_rate, broken):
    assert slo_violations(result, p99_ms, error_rate) == broken


def test_sweep_backends_keep_their_order_and_an_unknown_one_is_named():
    assert backend_list("onnxruntime,triton") == ["onnxruntime", "triton"]
    known = r"\(known: triton, onnxruntime\)"
    with pytest.raises(argparse.ArgumentTypeError, match=rf"unknown backend\(s\) tritonn {known}"):
        backend_list("onnxruntime,tritonn")
