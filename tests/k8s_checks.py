"""The Kubernetes checker: deploy/k8s/ read as YAML (or as `kubectl kustomize` renders
it) and held against docker-compose.yml, parsed by tests/compose_checks.py, and the
code: the same images, commands, ports, environment names, Triton flags and Serve
config. Each check is a pure function returning the problems it finds;
tests/test_k8s.py runs them on the real files and on broken copies.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from export.contract import TRITON_GRPC_URL
from model.schema import load_schema
from serving.backends.triton_client import ADMIN_HEADER, ADMIN_KEY_ENV
from serving.config import INGRESS_ENV, MAX_MESSAGE_ENV, TOKEN_ENV, FrontendConfig, max_message_bytes
from serving.local.launcher import WORKER_NICENESS_ENV, ingress_env
from serving.local.triton import RESTRICTED
from tests.compose_checks import (
    ROOT,
    CommandLineError,
    Compose,
    click_command,
    frontend_params,
    healthcheck_argv,
    mounts,
    parse_cli,
    published,
    script_entry_points,
    services,
    triton_services,
)

K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = "kustomization.yaml"
SERVE_CONFIG = ROOT / "serving" / "serve_config.yaml"
# Where each workload's pods come from in compose: (kind, name, container) -> service.
# The RayJob has no compose service; it runs our image, as every service built here.
COUNTERPARTS = {
    ("Deployment", "triton", "bootstrap"): "bootstrap",
    ("Deployment", "triton", "triton"): "triton",
    ("Job", "trainer", "trainer"): "trainer",
    ("RayService", "frontend", "ray"): "frontend",
    ("RayJob", "embed", "ray"): "frontend",
}
# The flags that restrict Triton's admin APIs (HTTP, gRPC).
RESTRICTED_FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol")
# The front end's ingress on Kubernetes (frontend.yaml says why it is not direct).
K8S_INGRESS = "proxy"
Objects = list[dict]


def load_folder(folder: Path = K8S_DIR) -> dict[str, Objects]:
    """Every manifest file of the folder (the kustomization apart), by file name."""
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        for p in sorted(folder.glob("*.yaml"))
        if p.name != KUSTOMIZATION
    }


def load_objects(folder: Path = K8S_DIR) -> Objects:
    return [o for docs in load_folder(folder).values() for o in docs]


def kustomization(folder: Path = K8S_DIR) -> dict:
    return yaml.safe_load((folder / KUSTOMIZATION).read_text())


# --- helpers ------------------------------------------------------------------------


def find(objects: Objects, kind: str, name: str) -> dict | None:
    return next((o for o in objects if o.get("kind") == kind and o.get("metadata", {}).get("name") == name), None)


def ray_cluster(obj: dict) -> dict | None:
    """The RayCluster spec inside a RayService or RayJob."""
    return obj.get("spec", {}).get({"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}.get(obj["kind"], ""))


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) of every pod template of a workload."""
    if (cluster := ray_cluster(obj)) is not None:
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]["spec"]
    elif "template" in obj.get("spec", {}):
        yield "pod", obj["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def workload_containers(objects: Objects, kind: str, name: str, container: str) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every pod of the workload that runs `container`."""
    obj = find(objects, kind, name)
    if obj is None:
        return []
    return [
        (f"{kind} {name} {where} {c['name']}", spec, c)
        for where, spec in pod_specs(obj)
        for c in containers(spec)
        if c["name"] == container
    ]


def env_names(service: dict) -> set[str]:
    """The variable names of a compose service's `environment` (list or mapping form)."""
    env = service.get("environment") or {}
    return {str(e).partition("=")[0] for e in env} if isinstance(env, list) else set(env)


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def mount_paths(spec: dict, container: dict) -> dict[str, str]:
    """mountPath -> the claim (or other volume type) mounted there."""
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName", "") for v in spec.get("volumes", [])}
    return {m["mountPath"]: volumes.get(m["name"], "") for m in container.get("volumeMounts", [])}


def container_ports(container: dict) -> set[int]:
    return {p["containerPort"] for p in container.get("ports", [])}


def argv_of(container: dict) -> list[str]:
    return [str(a) for a in [*container.get("command", []), *container.get("args", [])]]


# --- structure ----------------------------------------------------------------------


def check_required_fields(objects: Objects) -> list[str]:
    """What the API server refuses an object without, and one object per kind and name."""
    problems, seen = [], set()
    for i, o in enumerate(objects):
        missing = [f for f in ("apiVersion", "kind") if not o.get(f)]
        if not (o.get("metadata") or {}).get("name"):
            missing.append("metadata.name")
        if missing:
            problems.append(f"object {i} ({o.get('kind')}): no {', '.join(missing)}")
            continue
        key = (o["kind"], o["metadata"]["name"])
        if key in seen:
            problems.append(f"two objects {o['kind']} {key[1]}")
        seen.add(key)
    return problems


def check_kustomization(kustomization: dict, files: list[str]) -> list[str]:
    """The kustomization lists every manifest file of the folder, and only those."""
    listed = kustomization.get("resources", [])
    problems = [f"{KUSTOMIZATION} does not list {f}" for f in files if f not in listed]
    return problems + [f"{KUSTOMIZATION} lists {f}, which is no file here" for f in listed if f not in files]


def check_images(objects: Objects, compose: Compose) -> list[str]:
    """Each container runs the image of its compose counterpart, and every compose
    service of ours has its counterpart here."""
    problems = []
    for (kind, name, container), service in COUNTERPARTS.items():
        found = workload_containers(objects, kind, name, container)
        if not found:
            problems.append(f"no container {container} in {kind} {name} (compose's {service})")
        for where, _, c in found:
            if c.get("image") != services(compose)[service]["image"]:
                problems.append(f"{where}: image {c.get('image')!r} is not compose {service}'s")
    return problems


def check_secrets(objects: Objects) -> list[str]:
    """The token and the admin key come from a Secret of these manifests, by
    secretKeyRef, and the Secrets hold placeholders only."""
    problems = []
    secrets = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "Secret"}
    for o in objects:
        for where, spec in pod_specs(o):
            for c in containers(spec):
                for name, e in container_env(c).items():
                    if name not in (TOKEN_ENV, ADMIN_KEY_ENV):
                        continue
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    at = f"{o['kind']} {o['metadata']['name']} {where} {c['name']}: ${name}"
                    if ref is None:
                        problems.append(f"{at} is not read from a Secret (secretKeyRef)")
                    elif ref.get("key") not in secrets.get(ref.get("name"), {}).get("stringData", {}):
                        problems.append(f"{at}: Secret {ref.get('name')} has no key {ref.get('key')!r}")
    for name, s in secrets.items():
        for key, value in {**s.get("stringData", {}), **s.get("data", {})}.items():
            if value != "change-me":
                problems.append(f"Secret {name}: {key} holds a value, not the placeholder 'change-me'")
    return problems


def check_volumes(objects: Objects) -> list[str]:
    """Every claim a pod mounts exists, and one that several workloads mount can be
    mounted on several nodes (ReadWriteMany)."""
    claims = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "PersistentVolumeClaim"}
    users: dict[str, set[str]] = {}
    problems = []
    for o in objects:
        for _, spec in pod_specs(o):
            for v in spec.get("volumes", []):
                if (claim := v.get("persistentVolumeClaim", {}).get("claimName")) is not None:
                    users.setdefault(claim, set()).add(f"{o['kind']} {o['metadata']['name']}")
    for claim, by in sorted(users.items()):
        if claim not in claims:
            problems.append(f"{', '.join(sorted(by))}: mounts claim {claim!r}, which is not defined")
        elif len(by) > 1 and "ReadWriteMany" not in claims[claim]["spec"].get("accessModes", []):
            problems.append(f"claim {claim} is mounted by {', '.join(sorted(by))} but is not ReadWriteMany")
    return problems


# --- the workloads against compose ------------------------------------------------


def check_mounts(objects: Objects, compose: Compose) -> list[str]:
    """Each container mounts storage where its compose counterpart does."""
    problems = []
    for (kind, name, container), service in COUNTERPARTS.items():
        if kind.startswith("Ray"):
            continue  # the Ray pods have no compose mounts; check_frontend/check_embed
        wanted = {t for _, t in mounts(services(compose)[service])}
        for where, spec, c in workload_containers(objects, kind, name, container):
            if set(mount_paths(spec, c)) != wanted:
                problems.append(f"{where}: mounts {sorted(mount_paths(spec, c))}, compose {service} {sorted(wanted)}")
    return problems


def check_bootstrap(objects: Objects, compose: Compose) -> list[str]:
    """Triton's init container is compose's one-shot `bootstrap`, run before Triton."""
    problems = []
    for where, _, c in workload_containers(objects, "Deployment", "triton", "bootstrap"):
        if argv_of(c) != [str(a) for a in services(compose)["bootstrap"]["command"]]:
            problems.append(f"{where}: runs {argv_of(c)}, not compose bootstrap's command")
    return problems


def unrestricted(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith(RESTRICTED_FLAGS)]


def check_triton(objects: Objects, compose: Compose) -> list[str]:
    """compose's tritonserver command line; its admin APIs restricted as the code does
    it (serving/local/triton.py: the model config stays open) with the key from the
    environment; the ports compose publishes in the Service; probed on readiness."""
    problems = []
    (compose_name,) = [n for n in triton_services(compose) if "profiles" not in services(compose)[n]]
    compose_argv = [str(a) for a in services(compose)[compose_name]["command"]]
    found = workload_containers(objects, "Deployment", "triton", "triton")
    for where, _, c in found:
        argv = argv_of(c)
        if unrestricted(argv) != unrestricted(compose_argv):
            problems.append(f"{where}: flags {unrestricted(argv)} differ from compose {compose_name}'s")
        rule = f"{RESTRICTED}:{ADMIN_HEADER}=$({ADMIN_KEY_ENV})"
        restricted = [a for a in argv if a.startswith(RESTRICTED_FLAGS)]
        if restricted != [f"{flag}={rule}" for flag in RESTRICTED_FLAGS]:
            problems.append(f"{where}: restricts {restricted}, the code restricts {rule!r} (HTTP and gRPC)")
        if ADMIN_KEY_ENV not in container_env(c):
            problems.append(f"{where}: ${ADMIN_KEY_ENV} (the admin key of its flags) is not in its environment")
        probe = c.get("readinessProbe", {}).get("httpGet", {})
        if probe.get("path") != "/v2/health/ready":
            problems.append(f"{where}: the readiness probe asks {probe.get('path')}, not /v2/health/ready")
    service = find(objects, "Service", "triton") or {}
    ports = {p["port"] for p in service.get("spec", {}).get("ports", [])}
    if ports != {c for _, c in published(services(compose)[compose_name])}:
        problems.append(f"Service triton: ports {sorted(ports)} are not those compose {compose_name} publishes")
    return problems


def serve_config_for(compose: Compose) -> dict:
    """serving/serve_config.yaml with Triton where compose's front end finds it."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    found = frontend_params(compose)
    assert found is not None, "compose runs no `gem serve`"
    (app,) = config["applications"]
    app["args"]["triton_url"] = found[1]["triton_url"]
    return config


def check_frontend(objects: Objects, compose: Compose) -> list[str]:
    """The RayService serves serve_config.yaml's application on compose's Triton, on
    compose's gRPC and metrics ports, with compose's environment (its ingress as Ray's
    own variables) and the message limit `gem serve` sets; ready on grpc.health.v1."""
    obj = find(objects, "RayService", "frontend")
    found = frontend_params(compose)
    if obj is None or found is None:
        return ["no RayService frontend, or compose runs no `gem serve`"]
    name, params = found
    grpc_port, metrics_port = params["grpc_port"], params["metrics_port"]
    problems = []
    serve_config, expected = yaml.safe_load(obj["spec"].get("serveConfigV2", "")) or {}, serve_config_for(compose)
    if serve_config != expected:
        problems.append("RayService frontend: serveConfigV2 is not serving/serve_config.yaml on compose's Triton")
    if serve_config.get("grpc_options", {}).get("port") != grpc_port:
        problems.append(f"RayService frontend: Serve's gRPC port is not compose {name}'s {grpc_port}")
    ports = obj["spec"].get("serveService", {}).get("spec", {}).get("ports", [])
    if [(p.get("port"), p.get("targetPort")) for p in ports] != [(grpc_port, grpc_port)]:
        problems.append(f"RayService frontend: the Service's ports {ports} are not {grpc_port} -> {grpc_port}")
    # The limit for the application's settings as serve_config.yaml has them.
    limit = FrontendConfig.from_args(expected["applications"][0]["args"])
    wanted_env = {
        MAX_MESSAGE_ENV: str(max_message_bytes(load_schema(limit.schema_path), limit.max_examples_per_call)),
        WORKER_NICENESS_ENV: "0",
        **ingress_env(K8S_INGRESS, grpc_port, 1),
    }
    # $GEM_INGRESS is read by `gem serve`; the RayService says the same in Ray's variables.
    names = env_names(services(compose)[name]) - {INGRESS_ENV}
    cluster = ray_cluster(obj) or {}
    groups = [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        if group.get("rayStartParams", {}).get("metrics-export-port") != str(metrics_port):
            problems.append(f"RayService frontend: a group's metrics-export-port is not compose's {metrics_port}")
    for where, spec, c in workload_containers(objects, "RayService", "frontend", "ray"):
        env = container_env(c)
        if missing := sorted(names - set(env)):
            problems.append(f"{where}: compose {name}'s {missing} not in its environment")
        for key, value in wanted_env.items():
            if env.get(key, {}).get("value") != value:
                problems.append(f"{where}: ${key} is {env.get(key, {}).get('value')!r}, not {value!r}")
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if named.get("serve") != expected["http_options"]["port"]:
            # KubeRay probes the head's proxy on the port named `serve` (8000 if none).
            problems.append(
                f"{where}: the port named serve is not Serve's HTTP port {expected['http_options']['port']}"
            )
        if not {grpc_port, metrics_port} <= container_ports(c):
            problems.append(f"{where}: ports {sorted(container_ports(c))} lack {grpc_port} or {metrics_port}")
        probe = c.get("readinessProbe", {})
        if " head " in where and ("grpc" in probe or not probe.get("httpGet")):
            # KubeRay submits the Serve config only once the head is ready: a head that
            # waited for the application would wait forever.
            problems.append(f"{where}: readiness must not wait for the application (KubeRay deploys it after)")
        if " head " not in where and probe.get("grpc", {}).get("port") != grpc_port:
            problems.append(f"{where}: the readiness probe is not grpc.health.v1 on {grpc_port}")
        shm = {v["name"] for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        if not any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in c.get("volumeMounts", [])):
            problems.append(f"{where}: no in-memory /dev/shm for Ray's object store (compose: shm_size)")
    return problems


def gem_params(argv: list[str]) -> dict[str, Any]:
    """A `gem ...` command line parsed by the real CLI (CommandLineError if it fails)."""
    return parse_cli(click_command(script_entry_points()["gem"]), "gem", argv[1:])


def torchrun_args(argv: list[str]) -> Any:
    """A `torchrun ...` command line parsed by torch's own parser."""
    import contextlib
    import io

    from torch.distributed.run import get_args_parser

    parser, err = get_args_parser(), io.StringIO()
    parser.prog = "torchrun"
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv[1:])
    except SystemExit:  # argparse's way of refusing
        raise CommandLineError(err.getvalue().strip().splitlines()[-1]) from None


def torchrun_command(argv: list[str]) -> list[str]:
    """The command torchrun runs in each of its processes."""
    run = torchrun_args(argv)
    return [run.training_script, *run.training_script_args]


def check_trainer(objects: Objects, compose: Compose) -> list[str]:
    """The Job runs compose's trainer command under torchrun, one process per --procs,
    with compose's environment names, ports and healthcheck."""
    service = services(compose)["trainer"]
    compose_argv = [str(a) for a in service["command"]]
    problems = []
    found = workload_containers(objects, "Job", "trainer", "trainer")
    for where, _, c in found:
        argv = argv_of(c)
        if argv[:1] != ["torchrun"]:
            problems.append(f"{where}: runs {argv[:1]}, not torchrun")
            continue
        try:
            run = torchrun_args(argv)
            procs = gem_params(compose_argv)["procs"]  # test_compose checks that it parses
        except CommandLineError as e:
            problems.append(f"{where}: {e}")
            continue
        if not run.no_python or torchrun_command(argv) != compose_argv:
            problems.append(f"{where}: torchrun does not run compose trainer's command (`--no-python gem ...`)")
            continue
        if str(run.nproc_per_node) != str(procs):
            problems.append(f"{where}: --nproc-per-node {run.nproc_per_node} is not the command's --procs {procs}")
        if set(container_env(c)) != env_names(service):
            problems.append(
                f"{where}: environment {sorted(container_env(c))} != compose's {sorted(env_names(service))}"
            )
        if container_ports(c) != {p for _, p in published(service)}:
            problems.append(f"{where}: ports {sorted(container_ports(c))} are not those compose trainer publishes")
        if c.get("livenessProbe", {}).get("exec", {}).get("command") != healthcheck_argv(service):
            problems.append(f"{where}: the liveness probe is not compose trainer's healthcheck")
    return problems


def check_embed(objects: Objects, compose: Compose) -> list[str]:
    """The RayJob's entrypoint is a `gem embed` the CLI accepts, on compose's Triton,
    joining the job's cluster; input, output and repository are absolute paths on
    claims every pod of the cluster mounts."""
    obj = find(objects, "RayJob", "embed")
    found = frontend_params(compose)
    if obj is None or found is None:
        return ["no RayJob embed, or compose runs no `gem serve`"]
    argv = shlex.split(obj["spec"].get("entrypoint", ""))
    if argv[:2] != ["gem", "embed"]:
        return [f"RayJob embed: the entrypoint runs {argv[:2]}, not gem embed"]
    try:
        params = gem_params(argv)
    except CommandLineError as e:
        return [f"RayJob embed: {e}"]
    problems = []
    if params["backend"] != "triton" or params["triton_url"] != found[1]["triton_url"]:
        problems.append(f"RayJob embed: not on compose's Triton ({params['backend']} {params['triton_url']})")
    if params["address"] != "auto":
        problems.append(f"RayJob embed: --address {params['address']!r}, not auto (the job's own cluster)")
    for where, spec, c in workload_containers(objects, "RayJob", "embed", "ray"):
        shared = [PurePosixPath(p) for p, claim in mount_paths(spec, c).items() if claim]
        for key in ("source", "out", "repo"):
            path = PurePosixPath(str(params[key]))
            if not path.is_absolute() or not any(path.is_relative_to(p) for p in shared):
                problems.append(f"{where}: {key} {path} is not on a claim this pod mounts")
    return problems


def triton_urls(objects: Objects) -> dict[str, str]:
    """where -> the Triton address each workload calls (parsed as the code reads it)."""
    urls = {}
    if (frontend := find(objects, "RayService", "frontend")) is not None:
        config = yaml.safe_load(frontend["spec"].get("serveConfigV2", "")) or {}
        for app in config.get("applications", []):
            # FrontendConfig's default where the args leave it out.
            urls[f"RayService frontend {app.get('name')}"] = app.get("args", {}).get("triton_url", TRITON_GRPC_URL)
    commands = [("Job trainer", argv_of(c)) for _, _, c in workload_containers(objects, "Job", "trainer", "trainer")]
    if (embed := find(objects, "RayJob", "embed")) is not None:
        commands.append(("RayJob embed", shlex.split(embed["spec"].get("entrypoint", ""))))
    for where, argv in commands:
        try:
            command = torchrun_command(argv) if argv[:1] == ["torchrun"] else argv
            url = gem_params(command)["triton_url"]
        except (CommandLineError, KeyError):
            continue  # check_trainer / check_embed report it
        # The trainer's --triton-url repeats (one per Triton), the embed job's does not.
        for i, each in enumerate([url] if isinstance(url, str) else url or []):
            urls[f"{where} #{i + 1}" if i else where] = each
    return urls


def check_addresses(objects: Objects) -> list[str]:
    """Every Triton address a workload calls is a Service of these manifests on a port
    it serves: the pods find each other by the Services' names."""
    ports = {
        o["metadata"]["name"]: {p["port"] for p in o.get("spec", {}).get("ports", [])}
        for o in objects
        if o.get("kind") == "Service"
    }
    problems = []
    for where, url in triton_urls(objects).items():
        host, _, port = url.rpartition(":")
        if not port.isdigit() or int(port) not in ports.get(host, set()):
            problems.append(f"{where}: Triton at {url}, which is no Service port here")
    return problems


def all_problems(objects: Objects, compose: Compose) -> list[str]:
    problems = check_required_fields(objects)
    for check in (check_secrets, check_volumes, check_addresses):
        problems += check(objects)
    for workload in (check_images, check_mounts, check_bootstrap, check_triton, check_frontend, check_trainer):
        problems += workload(objects, compose)
    return problems + check_embed(objects, compose)
