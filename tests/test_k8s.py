"""deploy/k8s/ checked without a cluster (there is none on these machines or on CI):
every manifest loads and has what the API server requires, the kustomization lists
every file, and the workloads run what docker-compose.yml runs -- the same images,
commands (parsed by the real `gem` CLI and torch's torchrun parser), ports,
environment names, Triton flags and Serve config; `kubectl kustomize` renders the
folder to the same objects when kubectl is installed.

Each check is a pure function (tests/k8s_checks.py); the negative tests feed broken
copies of the real manifests to them, so every check is shown to fail when it should.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.compose_checks import Compose, load, resolved, services, set_path, triton_services
from tests.k8s_checks import (
    K8S_DIR,
    KUSTOMIZATION,
    RESTRICTED_FLAGS,
    Objects,
    all_problems,
    check_kustomization,
    find,
    kustomization,
    load_folder,
    load_objects,
    workload_containers,
)


@pytest.fixture(scope="module")
def compose() -> Compose:
    """docker-compose.yml with its defaults (test_compose checks it resolves cleanly)."""
    return resolved(load())[0]


def test_the_manifests_match_compose_and_the_code(compose):
    objects = load_objects()
    assert all_problems(objects, compose) == []
    # Not vacuous: every workload of the brief is there.
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("RayService", "frontend"), ("RayJob", "embed"), ("Deployment", "triton"), ("Job", "trainer")} <= kinds
    assert {("Service", "triton"), ("Secret", "gem-knowledge")} <= kinds


def test_the_kustomization_lists_every_file():
    assert check_kustomization(kustomization(), list(load_folder())) == []
    assert len(load_folder()) >= 6


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (the YAML load above still runs)")
def test_kubectl_kustomize_renders_the_same_objects(compose):
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [o for o in yaml.safe_load_all(result.stdout) if o is not None]
    assert all_problems(rendered, compose) == []

    def unlabelled(objects: Objects) -> list[dict]:
        # kustomize adds the common label (and nothing else: the YAML anchors resolve alike).
        out = copy.deepcopy(objects)
        for o in out:
            o["metadata"].get("labels", {}).pop("app.kubernetes.io/part-of", None)
            if not o["metadata"].get("labels"):
                o["metadata"].pop("labels", None)
        return sorted(out, key=lambda o: (o["kind"], o["metadata"]["name"]))

    assert unlabelled(rendered) == unlabelled(load_objects())


def test_triton_restricts_what_compose_restricts(compose):
    (name,) = [n for n in triton_services(compose) if "profiles" not in services(compose)[n]]

    def apis(argv: list[Any]) -> list[str]:
        return [str(a).partition("=")[2].partition(":")[0] for a in argv if str(a).startswith(RESTRICTED_FLAGS)]

    ((_, _, triton),) = workload_containers(load_objects(), "Deployment", "triton", "triton")
    assert apis(triton["command"]) == apis(services(compose)[name]["command"])


# --- every check fails on broken manifests -----------------------------------------


def _set(kind: str, name: str, path: str, value: Any) -> Callable[[Objects], None]:
    """A mutation: sets `path` in object kind/name (compose_checks.set_path)."""
    return lambda objects: set_path(find(objects, kind, name), path, value)


def _drop(kind: str, name: str) -> Callable[[Objects], None]:
    def mutate(objects: Objects) -> None:
        objects.remove(find(objects, kind, name))

    return mutate


TRITON = "spec.template.spec.containers.0"
BOOTSTRAP = "spec.template.spec.initContainers.0"
TRAINER = "spec.template.spec.containers.0"
HEAD = "spec.rayClusterConfig.headGroupSpec"
HEAD_RAY = f"{HEAD}.template.spec.containers.0"
WORKER_RAY = "spec.rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0"
EMBED_HEAD = "spec.rayClusterSpec.headGroupSpec.template.spec"
SERVE = yaml.safe_load((K8S_DIR / "frontend.yaml").read_text())["spec"]["serveConfigV2"]
ENTRYPOINT = yaml.safe_load_all((K8S_DIR / "embed.yaml").read_text()).__next__()["spec"]["entrypoint"]


BROKEN = [
    ("no apiVersion", _set("Job", "trainer", "apiVersion", None), "(Job): no apiVersion"),
    ("no name", _set("Secret", "gem-knowledge", "metadata.name", ""), "no metadata.name"),
    ("twice", lambda o: o.append(copy.deepcopy(find(o, "Service", "triton"))), "two objects Service triton"),
    ("our image", _set("Job", "trainer", f"{TRAINER}.image", "gem-knowledge:dev"), "is not compose trainer's"),
    ("triton image", _set("Deployment", "triton", f"{TRITON}.image", "tritonserver:24.09"), "not compose triton's"),
    ("ray image", _set("RayJob", "embed", f"{EMBED_HEAD}.containers.0.image", "rayproject/ray:2.60.0"), "embed head"),
    ("no workload", _drop("Job", "trainer"), "no container trainer in Job trainer"),
    (
        "literal token",
        _set("RayService", "frontend", f"{HEAD_RAY}.env.0", {"name": "GEM_AUTH_TOKEN", "value": "x"}),
        "is not read from a Secret",
    ),
    ("wrong secret key", _set("Job", "trainer", f"{TRAINER}.env.0.valueFrom.secretKeyRef.key", "key"), "has no key"),
    ("real secret", _set("Secret", "gem-knowledge", "stringData.auth-token", "s3cr3t"), "not the placeholder"),
    (
        "unknown claim",
        _set("Job", "trainer", "spec.template.spec.volumes.0.persistentVolumeClaim.claimName", "repo"),
        "mounts claim 'repo', which is not defined",
    ),
    (
        "shared RWO",
        _set("PersistentVolumeClaim", "model-repo", "spec.accessModes", ["ReadWriteOnce"]),
        "claim model-repo is mounted by",
    ),
    ("moved mount", _set("Job", "trainer", f"{TRAINER}.volumeMounts.0.mountPath", "/repo"), "compose trainer"),
    ("bootstrap", _set("Deployment", "triton", f"{BOOTSTRAP}.command.3", "/repo"), "not compose bootstrap's"),
    ("triton flag", _set("Deployment", "triton", f"{TRITON}.command.2", "--model-control-mode=poll"), "differ from"),
    (
        "restricts config",
        _set(
            "Deployment",
            "triton",
            f"{TRITON}.command.6",
            "--http-restricted-api=model-repository,model-config:gem-admin-key=$(GEM_TRITON_ADMIN_KEY)",
        ),
        "the code restricts",
    ),
    (
        "literal key",
        _set(
            "Deployment",
            "triton",
            f"{TRITON}.command.7",
            "--grpc-restricted-protocol=model-repository,shared-memory,statistics,trace,logging:gem-admin-key=k",
        ),
        "the code restricts",
    ),
    ("no key env", _set("Deployment", "triton", f"{TRITON}.env", []), "is not in its environment"),
    (
        "triton probe",
        _set("Deployment", "triton", f"{TRITON}.readinessProbe.httpGet.path", "/v2/health/live"),
        "not /v2/health/ready",
    ),
    ("triton service", _set("Service", "triton", "spec.ports.0.port", 8000), "are not those compose triton publishes"),
    ("service name", _set("Service", "triton", "metadata.name", "triton-grpc"), "Triton at triton:8001, which is no"),
    (
        "serve config",
        _set("RayService", "frontend", "spec.serveConfigV2", SERVE.replace("4096", "2048", 1)),
        "serveConfigV2 is not",
    ),
    (
        "serve triton",
        _set("RayService", "frontend", "spec.serveConfigV2", SERVE.replace("triton:8001", "127.0.0.1:8001")),
        "serveConfigV2 is not",
    ),
    (
        "serve port",
        _set("RayService", "frontend", "spec.serveService.spec.ports.0.targetPort", 40000),
        "the Service's ports",
    ),
    (
        "metrics port",
        _set("RayService", "frontend", "spec.rayClusterConfig.workerGroupSpecs.0.rayStartParams", {}),
        "metrics-export-port is not compose's 8090",
    ),
    ("no token env", _set("RayService", "frontend", f"{WORKER_RAY}.env.0.name", "TOKEN"), "['GEM_AUTH_TOKEN'] not in"),
    (
        "direct ingress",
        _set("RayService", "frontend", f"{HEAD_RAY}.env.1.value", "1"),
        "RAY_SERVE_ENABLE_DIRECT_INGRESS is '1', not '0'",
    ),
    (
        "message limit",
        _set("RayService", "frontend", f"{HEAD_RAY}.env.2.value", "4194304"),
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE is '4194304'",
    ),
    ("no serve port", _set("RayService", "frontend", f"{HEAD_RAY}.ports.3.containerPort", 8000), "named serve"),
    ("no grpc port", _set("RayService", "frontend", f"{HEAD_RAY}.ports.4.containerPort", 9000), "lack 50051 or 8090"),
    (
        "http probe",
        _set("RayService", "frontend", f"{WORKER_RAY}.readinessProbe", {"httpGet": {"port": 8000}}),
        "worker group replicas ray: the readiness probe is not grpc.health.v1 on 50051",
    ),
    ("no shm", _set("RayService", "frontend", f"{HEAD}.template.spec.volumes.0.emptyDir", {}), "no in-memory /dev/shm"),
    ("torchrun flag", _set("Job", "trainer", f"{TRAINER}.command.1", "--standalone=yes"), "torchrun: error: argument"),
    (
        "head waits for the app",
        _set("RayService", "frontend", f"{HEAD_RAY}.readinessProbe", {"grpc": {"port": 50051}}),
        "readiness must not wait for the application",
    ),
    ("no torchrun", _set("Job", "trainer", f"{TRAINER}.command.0", "python"), "not torchrun"),
    ("python script", _set("Job", "trainer", f"{TRAINER}.command.3", "--max-restarts=0"), "--no-python gem"),
    ("trainer command", _set("Job", "trainer", f"{TRAINER}.command.18", "--procs"), "--no-python gem"),
    ("nproc", _set("Job", "trainer", f"{TRAINER}.command.2", "--nproc-per-node=4"), "is not the command's --procs 2"),
    ("trainer env", _set("Job", "trainer", f"{TRAINER}.env.0.name", "ADMIN_KEY"), "!= compose's"),
    ("trainer port", _set("Job", "trainer", f"{TRAINER}.ports.0.containerPort", 9091), "compose trainer publishes"),
    ("trainer probe", _set("Job", "trainer", f"{TRAINER}.livenessProbe.exec.command.4", "9091"), "healthcheck"),
    ("embed program", _set("RayJob", "embed", "spec.entrypoint", "python -m jobs.embed"), "not gem embed"),
    ("embed flag", _set("RayJob", "embed", "spec.entrypoint", ENTRYPOINT + " --workers 2"), "No such option"),
    (
        "embed backend",
        _set("RayJob", "embed", "spec.entrypoint", ENTRYPOINT.replace("triton:8001", "t:8001")),
        "not on compose's Triton",
    ),
    (
        "embed address",
        _set("RayJob", "embed", "spec.entrypoint", ENTRYPOINT.replace("auto", "ray://head:10001")),
        "not auto",
    ),
    (
        "relative out",
        _set("RayJob", "embed", "spec.entrypoint", ENTRYPOINT.replace("/app/artifacts/k", "artifacts/k")),
        "out artifacts/knowledge is not on a claim",
    ),
    (
        "worker mounts",
        _set("RayJob", "embed", "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.volumes", []),
        "worker group actors ray: source /app/artifacts/data/logged is not on a claim",
    ),
]


@pytest.mark.parametrize("mutate, expected", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_checks_catch_broken_manifests(compose, mutate, expected):
    assert all_problems(load_objects(), compose) == []
    broken = copy.deepcopy(load_objects())
    mutate(broken)
    problems = all_problems(broken, compose)
    assert any(expected in p for p in problems), problems


def test_the_kustomization_check_catches_a_missing_and_an_extra_file():
    listed = kustomization()
    files = list(load_folder())
    assert check_kustomization({**listed, "resources": listed["resources"][1:]}, files) == [
        f"{KUSTOMIZATION} does not list {listed['resources'][0]}"
    ]
    assert check_kustomization(listed, files[1:]) == [f"{KUSTOMIZATION} lists {files[0]}, which is no file here"]
