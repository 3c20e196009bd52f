"""Resource samples of the stack's processes, read from /proc (psutil is not a dependency
of this project): RSS, open fds and threads of every process under a root, and the
/dev/shm bytes they map.

A process whose environment carries SKIP_ENV (the load generator, the soak's one-shot
commands) is left out with everything under it: it is not part of the stack."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROC = Path("/proc")
SKIP_ENV = "GEM_SOAK_SKIP"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    name: str
    rss_bytes: int
    fds: int
    threads: int
    # A fork carries its parent's name until it execs (Triton's python-backend stubs).
    ppid: int = 0


@dataclass(frozen=True)
class Sample:
    t: float  # seconds after the load started
    processes: list[ProcessSample] = field(default_factory=list)
    shm_bytes: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def stat_fields(stat: str) -> list[str]:
    """The fields after the name of a /proc/PID/stat text (the name in (...) may hold
    spaces; the fields after its ')' are fixed): [1] ppid, [11] utime, [12] stime in
    clock ticks, [16] nice."""
    return stat.rsplit(")", 1)[1].split()


def parent_of(stat: str) -> int:
    """The parent pid in a /proc/PID/stat text."""
    return int(stat_fields(stat)[1])


def thread_cpu() -> dict[tuple[int, int], tuple[int, float]]:
    """(pid, tid) -> (nice, CPU seconds so far, user + system) of every thread of every
    live process: what a run took from the cores, by thread, is two of these apart."""
    out = {}
    for task in PROC.glob("[0-9]*/task/[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat_fields((task / "stat").read_text())
            out[int(task.parent.parent.name), int(task.name)] = (
                int(fields[16]),
                (int(fields[11]) + int(fields[12])) / TICKS,
            )
    return out


def ppid(pid: int) -> int | None:
    """A live process's parent pid; None once it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return parent_of((PROC / str(pid) / "stat").read_text())
    return None


def children_of() -> dict[int, list[int]]:
    """Parent pid -> its children's pids, over every live process."""
    tree: dict[int, list[int]] = {}
    for pid in (int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()):
        parent = ppid(pid)
        if parent is not None:
            tree.setdefault(parent, []).append(pid)
    return tree


def _skipped(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return f"{SKIP_ENV}=1".encode() in (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    return False


def stack_pids(roots: tuple[int, ...]) -> list[int]:
    """The roots and their descendants, less the skipped subtrees."""
    tree, found, todo = children_of(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found or (pid not in roots and _skipped(pid)):
            continue
        found.add(pid)
        todo.extend(tree.get(pid, []))
    return sorted(found)


def parse_status(text: str) -> tuple[int, int]:
    """(RSS bytes, threads) of a /proc/PID/status text."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
    return rss_kb * 1024, int(fields["Threads"])


def shm_names(maps: str) -> set[str]:
    """The /dev/shm files a /proc/PID/maps text maps."""
    return {line.rsplit("/dev/shm/", 1)[1].split(" ")[0] for line in maps.splitlines() if "/dev/shm/" in line}


def display_name(pid: int) -> str:
    """What the process is: Ray's titles (ray::ServeReplica:...) and a command's first
    two words name it better than the executable alone."""
    with contextlib.suppress(OSError):
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        words = [Path(a.decode(errors="replace")).name for a in argv[:3] if a]
        if words and words[0].startswith("ray::"):
            return words[0].split()[0][:60]
        return " ".join(w for w in words if not w.startswith("-"))[:60]
    return "?"


def sample_process(pid: int) -> tuple[ProcessSample, set[str]] | None:
    """One process's figures and the shm files it maps; None once it is gone."""
    base = PROC / str(pid)
    try:
        rss, threads = parse_status((base / "status").read_text())
        ppid = parent_of((base / "stat").read_text())
        fds = len(os.listdir(base / "fd"))
        shm = shm_names((base / "maps").read_text())
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return ProcessSample(pid, display_name(pid), rss, fds, threads, ppid), shm


def shm_size(names: set[str]) -> int:
    total = 0
    for name in names:
        with contextlib.suppress(OSError):
            total += (Path("/dev/shm") / name).stat().st_size
    return total


def sample(roots: tuple[int, ...], t: float) -> Sample:
    processes, shm = [], set()
    for pid in stack_pids(roots):
        if (got := sample_process(pid)) is not None:
            processes.append(got[0])
            shm |= got[1]
    return Sample(t, processes, shm_size(shm))
