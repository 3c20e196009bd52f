"""The compose checker: docker-compose.yml and the Dockerfile read without Docker (there
is no engine on these machines or on CI). Each check is a pure function returning the
problems it finds; tests/test_compose.py runs them on the real files and on broken
copies, so every check is shown to fail when it should.
"""

from __future__ import annotations

import dataclasses
import functools
import graphlib
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import click
import typer
import yaml

from export.contract import DEFAULT_FLAVOUR, FLAVOURS, MODELS
from export.tensorrt import TRITON_IMAGE
from export.triton_config import config_filename
from serving.backends.triton_client import ADMIN_KEY_ENV
from serving.config import INGRESS_ENV, TOKEN_ENV
from serving.local.triton import TritonConfig, serving_flags

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
Compose = dict[str, Any]

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
# Triton's default ports, which the local launcher's defaults are too (the commands below
# do not move them).
_TRITON_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TritonConfig)}
TRITON_GRPC_PORT, TRITON_METRICS_PORT = _TRITON_DEFAULTS["grpc_port"], _TRITON_DEFAULTS["metrics_port"]
# artifacts/ is gitignored, so its folders exist only once something wrote them; the
# README has `mkdir -p` them before the stack starts (Docker would create them owned by
# root, where the image's user cannot write).
CREATED_AT_RUN_TIME = ("artifacts",)


def load(path: Path = COMPOSE_FILE) -> Compose:
    return yaml.safe_load(path.read_text())


# --- interpolation: Compose's ${VAR:-default}, resolved to the defaults ----------------

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: Any, problems: list[str], where: str = "", env: Mapping[str, str] | None = None) -> Any:
    """The file as Compose sees it with the variables of `env` set (none by default):
    each other `${VAR:-default}` becomes its default, so that the file works without
    any environment."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, problems, f"{where}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, problems, f"{where}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def default(m: re.Match) -> str:
        if m["op"] is None:
            problems.append(f"{where}: ${{{m['name']}}} has no default")
            return ""
        return env.get(m["name"]) or m["default"]

    return _VARIABLE.sub(default, value).replace("$$", "$")


def resolved(compose: Compose, env: Mapping[str, str] | None = None) -> tuple[Compose, list[str]]:
    problems: list[str] = []
    return interpolate(compose, problems, env=env), problems


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


def set_path(node: Any, path: str, value: Any) -> None:
    """Sets `path` (dotted; numbers index lists, missing mappings are made) below
    `node`; None deletes the key. The negative tests' mutation of a broken copy."""
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None:
        del node[last]
    else:
        node[last] = value


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


def trainer_services(compose: Compose) -> dict[str, dict]:
    """The side trainers: our code that loads versions through Triton's model control."""
    return {
        n: s for n, s in services(compose).items() if ours(s) and s.get("command", [])[:3] == ["gem", "trainer", "run"]
    }


def environment(service: dict) -> dict[str, str | None]:
    """A service's `environment`, list or mapping form; None: passed on from the host."""
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {k: None if v is None else str(v) for k, v in env.items()}
    return {k: (v if eq else None) for k, eq, v in (str(e).partition("=") for e in env)}


def admin_key(compose: Compose) -> tuple[str, list[str]]:
    """The key compose's Triton restricts model control to: the one the side trainers
    send in $GEM_TRITON_ADMIN_KEY (serving/backends/triton_client.py reads that name)."""
    problems, keys = [], set()
    for name, s in trainer_services(compose).items():
        key = environment(s).get(ADMIN_KEY_ENV)
        if not key:
            problems.append(f"{name}: sets no {ADMIN_KEY_ENV}, the key of Triton's restricted model control")
        else:
            keys.add(key)
    if len(keys) > 1:
        problems.append(f"the side trainers send different {ADMIN_KEY_ENV}s")
    return (keys.pop() if len(keys) == 1 else ""), problems


def cli_envvars(command: Any) -> set[str]:
    """Every environment variable a click command (and its subcommands) reads."""
    names = {e for p in command.params for e in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or [])}
    for sub in getattr(command, "commands", {}).values():
        names |= cli_envvars(sub)
    return names


def check_environment(compose: Compose) -> list[str]:
    """Each variable our services are given is one our code reads under that name: an
    option of the `gem` CLI, the token, ingress and admin-key settings, and Locust's own
    LOCUST_* options for its services (the local run in test_container_commands.py uses them)."""
    known = cli_envvars(click_command(script_entry_points()["gem"])) | {ADMIN_KEY_ENV, TOKEN_ENV, INGRESS_ENV}
    problems = []
    for name, s in services(compose).items():
        locust = s.get("command", [None])[0] == "locust"
        for variable in environment(s) if ours(s) else ():
            if variable not in known and not (locust and variable.startswith("LOCUST_")):
                problems.append(f"{name}: {variable} is read by none of our code")
    return problems


def check_triton(compose: Compose) -> list[str]:
    """Each tritonserver runs the image whose TensorRT builds the plans, serves and guards
    the repository's models with the local launcher's own flags (serving/local/triton.py
    `serving_flags`: explicit model control, the restricted APIs, the models loaded) and the
    side trainers' key, from where ./model_repo is mounted, and picks a config flavour that
    export/triton_config.py writes; the TensorRT one needs a GPU."""
    all_services = services(compose)
    key, problems = admin_key(compose)
    if not triton_services(compose):
        problems.append("no service runs tritonserver")
    local = TritonConfig(repository=Path("."), work_dir=Path("."), admin_key=key)
    want = serving_flags(local, list(MODELS))
    for name, s in triton_services(compose).items():
        argv = [str(a) for a in s["command"]]
        if s.get("image") != TRITON_IMAGE:
            problems.append(f"{name}: image {s.get('image')!r} is not export/tensorrt.py's {TRITON_IMAGE!r}")
        for flag in dict.fromkeys(f.partition("=")[0] for f in want):
            got, expected = sorted(many(argv, flag)), sorted(many(want, flag))
            if got != expected:
                problems.append(f"{name}: {flag} {got} != the local launcher's {expected} (serving_flags)")
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
    for name, s in trainer_services(compose).items():
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
    checks = (check_top_level, check_images, check_mounts, check_ports, check_healthchecks, check_depends_on)
    checks += (check_profiles, check_commands, check_environment, check_triton, check_tensorrt_pipeline)
    for check in checks:
        problems += check(compose)
    return problems + check_addresses(compose, prometheus)


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


# --- a service as a local process (tests/test_container_commands.py) ----------------------


def local_command(argv: list[Any], at: Mapping[str, Path], addresses: Mapping[str, str]) -> list[str]:
    """A compose command as a process on this machine runs it: a path under a mount
    target becomes that path under the host folder `at` gives for the target; a word
    `addresses` names (a `service:port`, a container port) its local counterpart; and
    0.0.0.0 the loopback (nothing here listens beyond it)."""
    out = []
    for arg in map(str, argv):
        target = next((t for t in sorted(at, key=len, reverse=True) if arg == t or arg.startswith(f"{t}/")), None)
        if target is not None:
            arg = f"{at[target]}{arg[len(target) :]}"
        out.append(addresses.get(arg, "127.0.0.1" if arg == "0.0.0.0" else arg))
    return out


def local_environment(service: dict, host: Mapping[str, str]) -> dict[str, str]:
    """What compose puts in the container's environment: the values it sets, and the
    names it passes on from `host` where they are set there."""
    env = {}
    for name, value in environment(service).items():
        if value is not None:
            env[name] = value
        elif name in host:
            env[name] = host[name]
    return env
