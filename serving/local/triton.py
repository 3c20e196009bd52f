"""Runs the local Triton server: the `tritonserver` binary of the nvidia-pytriton wheel.

That build has only the python backend, so models run there in their `python` flavour
(ONNX Runtime inside a python-backend model, see the repository's python model). The launcher

- finds the binary in the installed wheel,
- prepares a backend folder whose python backend has the stub for this Python next to
  `libtriton_python.so` (the wheel ships stubs per Python version beside it),
- passes this environment's site-packages in `GEM_PYTHONPATH` (the stub ignores
  PYTHONPATH),
- starts Triton in explicit model-control mode, logging to a file,
- waits for readiness with a deadline, failing early with the log's tail if Triton
  exits, and stops it with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import util
from pathlib import Path

from export.contract import MODELS
from serving.backends.triton_client import ADMIN_HEADER, ADMIN_KEY_ENV
from serving.local.ports import connect_host
from serving.local.shm import clean_shared_memory
from serving.local.state import DEFAULT_WORK_DIR, StateError, read_state, remove_state, state_file, write_state
from serving.tracing import triton_trace_args

log = logging.getLogger(__name__)


class TritonError(RuntimeError):
    """The local Triton could not be started, reached or stopped."""


@dataclass(frozen=True)
class TritonConfig:
    repository: Path
    # Scratch space: the prepared backend folder, the log and the state file.
    work_dir: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # Where all three listen; 127.0.0.1 unless opened deliberately (compose: 0.0.0.0).
    host: str = "127.0.0.1"
    # Key of the restricted model-control, repository and other admin APIs (HTTP and
    # gRPC): only callers sending header `gem-admin-key: <key>` reach them. Empty: a
    # fresh random key per start ($GEM_TRITON_ADMIN_KEY when set), kept in the state
    # file (mode 600) and this process's environment for our own rollout code.
    admin_key: str = field(default="", repr=False)
    # Which configs/<name>.pbtxt each model uses; the wheel's server needs `python`.
    model_config_name: str = "python"
    # Loaded at start when they have a version; more are loaded through the client.
    models: tuple[str, ...] = MODELS
    startup_timeout_s: float = 180.0
    stop_timeout_s: float = 30.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # OTLP/HTTP traces endpoint: Triton traces every inference there (serving/tracing.py).
    trace_url: str | None = None

    @property
    def log_file(self) -> Path:
        return self.work_dir / "tritonserver.log"

    @property
    def state_file(self) -> Path:
        return state_file(self.work_dir)

    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.http_port}"


def _wheel_dir() -> Path:
    spec = util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("nvidia-pytriton is not installed; its wheel ships the local tritonserver")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def find_binary() -> Path:
    binary = _wheel_dir() / "bin" / "tritonserver"
    if not os.access(binary, os.X_OK):
        raise TritonError(f"{binary} is missing or not executable; reinstall nvidia-pytriton")
    return binary


def prepare_backends(work_dir: Path) -> Path:
    """A backend folder whose python backend carries the stub built for this Python."""
    wheel = _wheel_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonError(f"nvidia-pytriton has no python backend stub for Python {version}")
    target = work_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    # Symlinks, not copies: the binaries find their libraries relative to their real path.
    for src in [*(p for p in (wheel / "backends" / "python").iterdir() if p.is_file()), stub]:
        link = target / src.name
        link.unlink(missing_ok=True)
        link.symlink_to(src)
    return target.parent


def _site_packages() -> str:
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return os.pathsep.join(paths)


# Triton's APIs that only our own control code may call (the key in ADMIN_HEADER). The
# model config stays readable: the front end reads the FM's user inputs from it.
RESTRICTED = "model-repository,shared-memory,statistics,trace,logging"


def serving_flags(cfg: TritonConfig, models: list[str]) -> list[str]:
    """The flags that decide what Triton serves and who may control it: the local server's
    and, with compose's key, the `triton` services' of docker-compose.yml
    (tests/compose_checks.py compares them, so that the two cannot drift apart)."""
    restricted = []
    if cfg.admin_key:
        rule = f"{RESTRICTED}:{ADMIN_HEADER}={cfg.admin_key}"
        restricted = [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
    return ["--model-control-mode=explicit", *restricted, *(f"--load-model={m}" for m in models)]


def command(cfg: TritonConfig, backend_dir: Path, models: list[str]) -> list[str]:
    return [
        str(find_binary()),
        f"--model-repository={cfg.repository.resolve()}",
        f"--backend-directory={backend_dir.resolve()}",
        f"--model-config-name={cfg.model_config_name}",
        f"--http-address={cfg.host}",
        f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.host}",
        f"--metrics-port={cfg.metrics_port}",
        "--allow-metrics=true",
        f"--log-file={cfg.log_file.resolve()}",
        "--exit-timeout-secs=10",
        *triton_trace_args(cfg.trace_url),
        *cfg.extra_args,
        *serving_flags(cfg, models),
    ]


def redacted(args: list[str], secret: str) -> str:
    """The command line for the log, with the admin key cut out (Triton takes the key
    only as an argument; the state file that holds it is mode 600)."""
    line = " ".join(args)
    return line.replace(secret, "<admin key>") if secret else line


def loadable_models(cfg: TritonConfig) -> list[str]:
    """The configured models that have at least one version folder."""
    return [m for m in cfg.models if any(p.name.isdigit() for p in (cfg.repository / m).glob("*"))]


def _ready(cfg: TritonConfig) -> bool:
    try:
        with urllib.request.urlopen(f"{cfg.http_url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


# Logged at every start on a machine without a GPU driver; not a problem.
_HARMLESS = ("CudaDriverHelper", "unable to create stream", "DCGM", "pinned")


def log_errors(cfg: TritonConfig, limit: int = 10) -> str:
    """The error lines of the server log (the reason a start failed), else its tail."""
    if not cfg.log_file.exists():
        return "(no log)"
    lines = cfg.log_file.read_text(errors="replace").splitlines()
    errors = [line[:400] for line in lines if line.startswith("E") and not any(h in line for h in _HARMLESS)]
    return "\n".join(errors[:limit] or lines[-limit:])


def admin_key(cfg: TritonConfig) -> TritonConfig:
    """`cfg` with its admin key: given, else $GEM_TRITON_ADMIN_KEY, else a fresh one. The
    key is put in this process's environment, so our own control code (rollout, export
    --load, the trainer) run from here or its children sends it."""
    import dataclasses
    import secrets

    key = cfg.admin_key or os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
    os.environ[ADMIN_KEY_ENV] = key
    return dataclasses.replace(cfg, admin_key=key)


def stored_admin_key(work_dir: Path) -> str:
    """The admin key of the server started from `work_dir` (its state file), or "" (also
    for an unreadable file: the caller then goes on without a key, and says so)."""
    try:
        return (read_state(work_dir) or {}).get("admin_key", "")
    except StateError as e:
        log.warning("%s", e)
        return ""


class TritonServer:
    """One tritonserver process. A context manager: stopped on exit, also on errors."""

    def __init__(self, cfg: TritonConfig, owner: int | None = None):
        """`owner`: the pid of the process supervising this server (`gem up`), recorded
        in the state file so that `gem triton down` finds it."""
        self.cfg = admin_key(cfg)
        self.owner = owner
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, detach: bool = False) -> TritonServer:
        cfg = self.cfg
        if _ready(cfg):
            raise TritonError(f"a server already answers on port {cfg.http_port}; stop it first (gem triton down)")
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        cfg.log_file.unlink(missing_ok=True)
        backend_dir = prepare_backends(cfg.work_dir)
        args = command(cfg, backend_dir, loadable_models(cfg))
        env = {**os.environ, "GEM_PYTHONPATH": _site_packages()}
        log.info("starting %s", redacted(args, cfg.admin_key))
        # Its own session: Ctrl-C in the terminal reaches us, and we stop Triton in order.
        self.process = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        write_state(cfg.work_dir, {**asdict(cfg), "pid": self.process.pid, "owner": self.owner})
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        if detach:
            self.process = None
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"log {self.cfg.log_file}:\n{log_errors(self.cfg)}"
                )
            if _ready(self.cfg):
                log.info("triton ready: grpc %s, http %s", self.cfg.grpc_url, self.cfg.http_url)
                return
            time.sleep(0.2)
        raise TritonError(
            f"tritonserver not ready after {self.cfg.startup_timeout_s:.0f}s; log {self.cfg.log_file}:\n"
            f"{log_errors(self.cfg)}"
        )

    def wait(self) -> int:
        """Blocks until the server exits (a foreground `gem triton up`); its exit code."""
        if self.process is None:
            raise TritonError("this server was not started here, or was started detached: nothing to wait for")
        return self.process.wait()

    def stop(self) -> None:
        if self.process is None:
            return
        pid = self.process.pid
        _terminate(pid, self.cfg.stop_timeout_s, self.process)
        self.process = None
        remove_state(self.cfg.work_dir)
        clean_shared_memory(pid)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int, process: subprocess.Popen | None) -> bool:
    if process is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _killpg(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _terminate(pid: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """SIGTERM (Triton drains in-flight requests), SIGKILL after the grace period.

    The server runs in its own process group; once it is gone the group is killed too,
    so that no python-backend stub it was forking at that moment outlives it.
    """
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        _killpg(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid, process):
                _killpg(pid, signal.SIGKILL)
                return
            time.sleep(0.1)
    raise TritonError(f"tritonserver (pid {pid}) did not stop")


def kill_group(pid: int) -> None:
    """SIGKILL to the server's whole process group (python-backend stubs included: they
    outlive a killed server and may ignore SIGTERM)."""
    _killpg(pid, signal.SIGKILL)


def stop_detached(work_dir: Path, timeout_s: float = 30.0) -> int | None:
    """Stops the server that `gem triton up` left running, or the one `gem up`
    supervises (by stopping that `gem up`, whose supervisor would restart it
    otherwise); returns the Triton pid."""
    state = read_state(work_dir)
    if state is None:
        return None
    pid, owner = state["pid"], state.get("owner")
    if owner and owner != os.getpid() and _alive(owner, None):
        os.kill(owner, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s + 60
        while _alive(owner, None) and time.monotonic() < deadline:
            time.sleep(0.2)
    if _alive(pid, None):
        _terminate(pid, timeout_s)
    kill_group(pid)
    remove_state(work_dir)
    clean_shared_memory(pid)
    return pid


def detached_config(work_dir: Path) -> TritonConfig | None:
    """The config of the server started detached from `work_dir`, if one is recorded."""
    state = read_state(work_dir)
    if state is None:
        return None
    state.pop("pid")
    state.pop("owner", None)
    state["repository"], state["work_dir"] = Path(state["repository"]), Path(state["work_dir"])
    state["models"], state["extra_args"] = tuple(state["models"]), tuple(state["extra_args"])
    return TritonConfig(**state)


def use_stored_admin_key(work_dir: Path = DEFAULT_WORK_DIR) -> None:
    """Lets this process's model control (`gem trainer`, rollbacks) reach the local Triton
    started from another shell: its recorded key, unless $GEM_TRITON_ADMIN_KEY is set."""
    key = stored_admin_key(work_dir)
    if key and not os.environ.get(ADMIN_KEY_ENV):
        os.environ[ADMIN_KEY_ENV] = key
