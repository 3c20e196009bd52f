"""The soak's faults, carried out on a running stack: the side trainer's publishes (by
dropping the next shard of its stream), a rollback, Triton and a Serve replica killed,
and an export whose disk fills. Each returns a record for the bounds (loadtests/bounds.py):
what it did, whether its own check held, and the windows when a process was down.

The disk fills by rule, not by a mount (tmpfs needs root here): the export runs with
RLIMIT_FSIZE = FULL_DISK_BYTES, so its first write past that fails with EFBIG, as a full
disk's would with ENOSPC, at the same point of the export. SIGXFSZ is ignored in it, or
the kernel would kill the export instead of failing its write."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as triton_grpc

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from loadtests.bounds import Window
from loadtests.faults import Fault
from loadtests.sampling import SKIP_ENV, display_name, ppid, stack_pids
from model.data.synth import World, write_shard
from model.schema import FeatureSchema
from serving.local.health import check
from serving.local.triton import ADMIN_KEY_ENV
from trainer.stream import StreamConfig

GEM = Path(sys.executable).with_name("gem")
# The export's file size limit: past the config files, inside the first ONNX graph.
FULL_DISK_BYTES = 64 * 1024
# What the export's one line must say: EFBIG here, ENOSPC on a real full disk.
FULL_DISK_ERRORS = ("File too large", "No space left")
# How long a publish (a trainer cycle, its export and Triton's load) or a restart may take
# (two cores shared with the load and, in the suite, other work).
PUBLISH_TIMEOUT_S = 240.0
RESTART_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Target:
    """The stack the faults hit."""

    roots: tuple[int, ...]  # the processes the stack's processes descend from
    address: str  # the front end's gRPC address
    triton_url: str
    admin_key: str
    repo: Path
    checkpoint: Path  # what the disk-full export exports
    stream_cfg: StreamConfig  # the side trainer's input (its `out` folder)
    trainer_state: Path  # its ledger says when a cycle has ended
    schema: FeatureSchema


def tool_env(target: Target) -> dict[str, str]:
    """A one-shot command's environment: Triton's admin key for model control, and the
    mark that keeps it out of the stack's samples."""
    return {**os.environ, ADMIN_KEY_ENV: target.admin_key, SKIP_ENV: "1"}


def record(fault: Fault, started: float, ok: bool, detail: str, down: Window | None = None, **extra) -> dict:
    return {"at_s": fault.at_s, "kind": fault.kind, "started": started, "done": time.time(), "ok": ok,
            "detail": detail, "down": down.__dict__ if down else None, **extra}  # fmt: skip


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def _latest(repo: Path, model: str) -> int:
    return ModelRepository(repo).latest(model) or 0


def next_shard(target: Target, fault: Fault, index: int) -> dict:
    """Shard `index` of the stream: alone (index 0) the trainer refits the adapter only;
    after that each shard is an FM cycle that publishes both models. The cycle runs on
    while the next faults happen (a cycle can take longer than the gap between faults);
    its publish is checked at the end (bounds.trainer_published)."""
    started = time.time()
    # One shard of the whole stream's world (play_stream writes all from `start` on).
    synth = target.stream_cfg.synth()
    write_shard(synth, target.schema, World(synth, len(target.schema.surfaces)), target.stream_cfg.out, index)
    return record(fault, started, True, f"shard {index} written", shard=index)


def wait_for_publishes(target: Target, shards: int, timeout_s: float = PUBLISH_TIMEOUT_S) -> list[dict]:
    """The trainer's publish lines, once there is one per shard written (or at the timeout)."""
    _wait(lambda: len(_publish_lines(target.trainer_state)) >= shards, timeout_s)
    return _publish_lines(target.trainer_state)


def _publish_lines(state: Path) -> list[dict]:
    path = state / "ledger.jsonl"
    if not path.exists():
        return []
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [line for line in lines if line.get("kind") == "publish"]


def _processes(target: Target, prefix: str) -> list[int]:
    """The stack's processes named `prefix`, less those whose parent is one of them: a
    fork caught before it execs (Triton's, for a python backend's stub) still carries
    its parent's name, and killing it would not be the fault asked for."""
    named = [pid for pid in stack_pids(target.roots) if display_name(pid).startswith(prefix)]
    return [pid for pid in named if ppid(pid) not in named]


def _triton_ready(url: str) -> bool:
    try:
        with triton_grpc.InferenceServerClient(url) as client:
            return bool(client.is_server_ready(client_timeout=2))
    except Exception:  # any failure to answer is "not ready yet"
        return False


def _kill(target: Target, fault: Fault, prefix: str, what: str, ready: Callable[[], bool]) -> dict:
    """SIGKILL of the stack's first process named `prefix` (not a fork of one), then the
    wait until it is gone and `ready` holds again: the window it was down."""
    started = time.time()
    pids = _processes(target, prefix)
    if not pids:
        return record(fault, started, False, f"no {prefix} process under the stack")
    os.kill(pids[0], signal.SIGKILL)
    back = _wait(lambda: pids[0] not in _processes(target, prefix), 30) and _wait(ready, RESTART_TIMEOUT_S)
    window = Window(what, started, time.time())
    detail = f"serving again after {window.end - started:.1f} s" if back else f"not back after {RESTART_TIMEOUT_S:g} s"
    return record(fault, started, back, f"pid {pids[0]} killed, {detail}", window)


def kill_triton(target: Target, fault: Fault) -> dict:
    """The stack's supervisor restarts it (serving/local/supervisor.py). Down until the
    front end serves again: Triton ready, and the front end's channel to it reconnected
    (its health probe says so), which can be a moment later."""
    return _kill(target, fault, "tritonserver", "triton",
                 lambda: _triton_ready(target.triton_url) and check(target.address, 2.0)[0])  # fmt: skip


def kill_replica(target: Target, fault: Fault) -> dict:
    """The Serve replica's worker process; Serve's controller replaces it."""
    return _kill(target, fault, "ray::ServeReplica", "replica", lambda: check(target.address, 2.0)[0])


def rollback(target: Target, fault: Fault, shards: int) -> dict:
    """The FM back to the version before the latest (`gem trainer rollback`), once the
    trainer has published the `shards` written so far."""
    started = time.time()
    wait_for_publishes(target, shards)  # the FM versions to roll back from
    latest = _latest(target.repo, FM_MODEL)
    older = [v for v in ModelRepository(target.repo).versions(FM_MODEL) if v < latest]
    if not older:
        return record(fault, started, False, f"{FM_MODEL} has no version before {latest} to roll back to")
    done = subprocess.run(
        [str(GEM), "trainer", "rollback", "--to", str(older[-1]), "--repo", str(target.repo), "--model", FM_MODEL,
         "--triton-url", target.triton_url],
        capture_output=True, text=True, env=tool_env(target), timeout=RESTART_TIMEOUT_S,
    )  # fmt: skip
    moved = sorted(set(range(older[-1] + 1, latest + 1)) - set(ModelRepository(target.repo).versions(FM_MODEL)))
    ok = done.returncode == 0 and _latest(target.repo, FM_MODEL) == older[-1]
    return record(fault, started, ok, f"{FM_MODEL} {latest} -> {older[-1]}" if ok else _last_line(done.stderr),
                  rolled_back={"model": "fm", "versions": moved})  # fmt: skip


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_DISK_BYTES, FULL_DISK_BYTES))


def _layout(repo: Path) -> dict[str, list[str]]:
    """Every entry of each model's folder: a partial version would show here."""
    return {model: sorted(p.name for p in (repo / model).iterdir()) for model in (FM_MODEL, ADAPTER_MODEL)}


def disk_full_export(target: Target, fault: Fault) -> dict:
    """`gem export` into the served repository with the disk full part-way: it must fail
    with one clear line, leave the served versions serving and no partial version."""
    started, before = time.time(), _layout(target.repo)
    done = subprocess.run(
        [str(GEM), "export", "--checkpoint", str(target.checkpoint), "--repo", str(target.repo)],
        capture_output=True, text=True, env=tool_env(target), timeout=RESTART_TIMEOUT_S, preexec_fn=_limit_file_size,
    )  # fmt: skip
    after, line = _layout(target.repo), _last_line(done.stderr)
    problems = []
    if done.returncode == 0:
        problems.append("the export succeeded: the limit did not bite")
    if done.returncode != 0 and not any(why in line for why in FULL_DISK_ERRORS):
        problems.append(f"it failed for another reason: {line}")
    if "Traceback" in done.stderr:
        problems.append("a traceback on stderr")
    if after != before:
        problems.append(f"the repository changed: {before} -> {after}")
    if not _wait(lambda: _triton_ready(target.triton_url), 10):
        problems.append("Triton is not ready")
    return record(fault, started, not problems, "; ".join(problems) or f"refused: {line}", message=line)


def carry_out(target: Target, fault: Fault, shards_so_far: int) -> dict:
    if fault.kind in ("adapter_refresh", "publish"):
        return next_shard(target, fault, shards_so_far)
    if fault.kind == "rollback":
        return rollback(target, fault, shards_so_far)
    actions = {"kill_triton": kill_triton, "kill_replica": kill_replica, "disk_full_export": disk_full_export}
    return actions[fault.kind](target, fault)
