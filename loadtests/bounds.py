"""The soak's bounds (issue 26), checked on what a run recorded: pure functions of the
samples, the load test's summary and the faults' records, so tests check the checks.

Times are wall-clock seconds (time.time()): Locust's call log and the faults' records
come from different processes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean

# RSS growth of a process after the warm-up (issue 26).
RSS_GROWTH = 0.05
# "Flat": the stack's total at the end within this share (and SLACK) of the total at the
# end of the warm-up. A restarted Triton or replica is a new process with fresh counts.
FLAT = 0.10
SLACK = {"fds": 16, "threads": 8, "shm_bytes": 1 << 20}
# Samples averaged at each end of a series, so one sample taken mid-restart does not
# decide a bound.
ENDS = 3


@dataclass(frozen=True)
class Verdict:
    bound: str
    measured: str
    ok: bool


@dataclass(frozen=True)
class Window:
    """A stretch of time when a process of the stack was down (killed until healthy)."""

    what: str
    start: float
    end: float


def overlaps(start: float, end: float, windows: list[Window]) -> bool:
    return any(start <= w.end and end >= w.start for w in windows)


# What a call that ran into a down Triton ends with: its deadline passed, or the front end
# said UNAVAILABLE (retry later) to each of the client's retries.
WHILE_DOWN = ("DEADLINE_EXCEEDED", "UNAVAILABLE")


def failed_calls(failures: list[dict], triton_down: list[Window], rate: float, deadline_s: float) -> list[Verdict]:
    """0 failed calls after the client's retries, except those that ran into a killed
    Triton (their deadline passed, or their retries were spent, while it was down); those
    are counted and bounded by the calls that could have been in flight then (the rate
    over each down window and one deadline)."""
    excused = [f for f in failures if f["code"] in WHILE_DOWN and overlaps(f["start"], f["end"], triton_down)]
    others = [f for f in failures if f not in excused]
    by_code: dict[str, int] = defaultdict(int)
    for f in others:
        by_code[f["code"]] += 1
    down_s = sum(w.end - w.start for w in triton_down)
    most = rate * (down_s + deadline_s * len(triton_down))
    return [
        Verdict("failed calls (after retries)", f"{len(others)} {dict(by_code) or ''}".strip(), not others),
        Verdict(
            "failed while a killed Triton was down",
            f"{len(excused)} (<= {most:.0f}: {rate:g}/s over {down_s:.1f} s down + a deadline per restart)",
            len(excused) <= most,
        ),
    ]


def versions_served(
    versions: dict[str, dict], published: dict[str, set[int]], rolled_back: dict[str, tuple[set[int], float]]
) -> list[Verdict]:
    """`versions`: "fm:adapter" -> {"calls", "first", "last"} (call start times);
    `published`: model -> the versions the repository ever held; `rolled_back`: model
    -> (the versions moved aside, when the rollback was done)."""
    never, stale = 0, 0
    for key, seen in versions.items():
        fm, adapter = (int(v) for v in key.split(":"))
        if fm not in published.get("fm", set()) or adapter not in published.get("adapter", set()):
            never += seen["calls"]
        for model, version in (("fm", fm), ("adapter", adapter)):
            moved, at = rolled_back.get(model, (set(), float("inf")))
            if version in moved and seen["last"] > at:
                stale += seen["calls"]  # an upper bound: the log keeps no per-call times
    return [
        Verdict("calls answered by a never-published version", str(never), never == 0),
        Verdict("calls started after a rollback, answered by a rolled-back version", str(stale), stale == 0),
    ]


def _ends(values: list[float]) -> tuple[float, float]:
    return mean(values[:ENDS]), mean(values[-ENDS:])


def steady_from(warm_up_end: float, publishes: list[dict], started: float) -> float:
    """When the resource bounds start counting (seconds after the load started): the
    warm-up's end, or the first FM publish if later. Until then the stack is still
    growing by design: Triton loads the second of the FM versions it keeps loaded (their
    model instances, threads and shared memory), and the side trainer's first FM cycle
    allocates its optimizer state and rollback copies (its exports run in child processes)."""
    fm_published = [p["ts"] - started for p in publishes if p.get("gem_fm") is not None and not p.get("error")]
    return max(warm_up_end, min(fm_published, default=warm_up_end))


# The side trainer's processes (`gem trainer run` and its torchrun workers): their RSS is
# judged apart from the serving stack's, which callers depend on.
TRAINER = "gem trainer"


def rss_growth(samples: list[dict], warm_up_end: float) -> list[Verdict]:
    """Each process that lived through the run after the warm-up: its RSS growth from the
    warm-up's end to the run's end; the serving stack's worst and the side
    trainer's worst, each its own verdict."""
    after = [s for s in samples if s["t"] >= warm_up_end]
    groups = ("serving stack", "side trainer")
    bound = {g: f"RSS growth per process ({g}) < {RSS_GROWTH:.0%}" for g in groups}
    if len(after) < 2 * ENDS:
        return [Verdict(bound[g], f"{len(after)} samples after the warm-up: too few", False) for g in groups]
    # A process is judged when it lived through the window (in its first and last ENDS
    # samples): one started in it (a restart) is still loading, one gone early was killed
    # or was a one-shot child.
    opens, closes = after[ENDS - 1]["t"], after[-ENDS]["t"]
    series: dict[tuple[int, str], list[tuple[float, int]]] = defaultdict(list)
    for s in after:
        for p in s["processes"]:
            series[(p["pid"], p["name"])].append((s["t"], p["rss_bytes"]))
    growths: dict[str, list[tuple[float, str]]] = {g: [] for g in groups}
    for (pid, name), points in series.items():
        if len(points) < 2 * ENDS or points[0][0] > opens or points[-1][0] < closes:
            continue
        first, last = _ends([rss for _, rss in points])
        growths[groups[TRAINER in name]].append((last / first - 1 if first > 0 else 0.0, f"{name} (pid {pid})"))
    verdicts = []
    for group, measured in growths.items():
        worst, who = max(measured, default=(0.0, "none"))
        measured_as = f"worst {worst:+.1%} {who} of {len(measured)} processes"
        verdicts.append(Verdict(bound[group], measured_as, worst < RSS_GROWTH))
    return verdicts


def totals(sample: dict) -> dict[str, int]:
    return {
        "fds": sum(p["fds"] for p in sample["processes"]),
        "threads": sum(p["threads"] for p in sample["processes"]),
        "shm_bytes": sample["shm_bytes"],
    }


def flat(samples: list[dict], warm_up_end: float) -> list[Verdict]:
    after = [totals(s) for s in samples if s["t"] >= warm_up_end]
    verdicts = []
    for what, slack in SLACK.items():
        if len(after) < 2 * ENDS:
            verdicts.append(Verdict(f"{what} flat", "too few samples", False))
            continue
        first, last = _ends([t[what] for t in after])
        ok = last <= first * (1 + FLAT) + slack
        verdicts.append(Verdict(f"{what} flat (+{FLAT:.0%} + {slack})", f"{first:,.0f} -> {last:,.0f}", ok))
    return verdicts


def faults_done(records: list[dict], scheduled: int) -> list[Verdict]:
    """Every fault of the schedule was carried out and its own check held (the disk-full
    export: the served versions unchanged, no partial version, one clear line)."""
    done = Verdict("faults carried out", f"{len(records)} of {scheduled}", len(records) == scheduled)
    return [done, *(Verdict(f"fault at {r['at_s']:g} s: {r['kind']}", r["detail"], r["ok"]) for r in records)]


def triton_exits(samples: list[dict], killed: int) -> list[Verdict]:
    """Triton exits nobody asked for: each tritonserver process past the first is a
    restart, and the schedule killed `killed` of them. A child of a Triton is not one: it
    is a fork about to exec a python backend's stub (it has Triton's name until then)."""
    pids: set[int] = set()
    for s in samples:
        tritons = {p["pid"] for p in s["processes"] if p["name"].startswith("tritonserver")}
        pids |= {p["pid"] for p in s["processes"] if p["pid"] in tritons and p.get("ppid") not in tritons}
    unplanned = max(0, len(pids) - 1 - killed)
    return [Verdict("Triton exits not scheduled", f"{unplanned} ({len(pids)} Triton processes seen)", unplanned == 0)]


def trainer_published(lines: list[dict], shards: int) -> list[Verdict]:
    """Each shard the soak fed the side trainer became a cycle that published: the first
    an adapter-only refresh (a student_adapter version), each later one an FM cycle (both
    models); `lines`: the publish lines of the trainer's ledger."""
    wanted = [("student_adapter",)] + [("gem_fm", "student_adapter")] * (shards - 1)
    done = [all(line.get(model) for model in models) and not line.get("error")
            for line, models in zip(lines, wanted, strict=False)]  # fmt: skip
    published = ", ".join(f"fm {line.get('gem_fm')} adapter {line.get('student_adapter')}" for line in lines)
    ok = len(lines) == shards and all(done)
    return [Verdict("trainer cycles published (adapter-only, then FM)", f"{sum(done)} of {shards}: {published}", ok)]
