"""The streaming run's tables, registered targets (issue 24: P0, T1-T4), JSON and PNG.

Every student number is a paired difference over seeds: NE gain over `hard` in percent
of hard's NE on the same scored rows, its mean with a 95 % interval and the count of
seeds where it is positive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import RESULTS
from bench.students_stream.stats import gain_pct, paired

console = Console()


def _ne(rows: dict, task: str) -> float:
    return rows[task]["ne"]


def summarize(doc: dict, tasks: tuple[str, ...]) -> dict:
    seeds = list(doc["seeds"].values())
    out: dict = {"teacher_advantage_pct": {}, "gain_pct": {}, "transfer_ratio": {}, "calibration": {}}
    for arm in ("fresh", "frozen"):
        adv = {
            kind: {
                t: paired(
                    [gain_pct(_ne(s["students"][arm]["hard"], t), _ne(s["teachers"][arm][kind], t)) for s in seeds]
                )
                for t in tasks
            }
            for kind in ("raw", "adapted")
        }
        adv["planted (NE floor)"] = {
            t: paired([gain_pct(_ne(s["students"][arm]["hard"], t), _ne(s["teachers"]["planted"], t)) for s in seeds])
            for t in tasks
        }
        out["teacher_advantage_pct"][arm] = adv
        names = list(seeds[0]["students"][arm])
        gains = {
            v: {t: paired([gain_pct(_ne(s["students"][arm]["hard"], t), _ne(s["students"][arm][v], t)) for s in seeds])
                for t in tasks}
            for v in names if v != "hard"
        }  # fmt: skip
        out["gain_pct"][arm] = gains
        out["transfer_ratio"][arm] = {
            v: {
                t: g[t].mean / adv["adapted" if "adapted" in v or v == "all" else "raw"][t].mean
                if adv["raw"][t].mean > 0 else float("nan")
                for t in tasks
            }
            for v, g in gains.items()
            if "oracle" not in v
        }  # fmt: skip
        out["calibration"][arm] = {
            v: {t: float(np.mean([s["students"][arm][v][t]["calibration"] for s in seeds])) for t in tasks}
            for v in names
        }
    out["targets"] = targets(out, seeds, tasks)
    return out


def _beats_in_every_seed(seeds: list[dict], better, worse, tasks: tuple[str, ...]) -> bool:
    """`better(seed)` has a lower NE than `worse(seed)` on every task, in every seed."""
    return all(_ne(better(s), t) < _ne(worse(s), t) for s in seeds for t in tasks)


def targets(summary: dict, seeds: list[dict], tasks: tuple[str, ...]) -> dict:
    g, fresh, frozen = summary["gain_pct"], "fresh", "frozen"
    p0 = _beats_in_every_seed(
        seeds, lambda s: s["teachers"][fresh]["raw"], lambda s: s["students"][fresh]["hard"], tasks
    )
    out: dict = {"P0: the fresh teacher beats hard on both tasks in every seed": {"holds": p0}}
    applicable = "" if p0 else " (not applicable: P0 missed)"

    def has(arm: str, *names: str) -> bool:
        return all(n in g[arm] for n in names)

    if has(fresh, "kd"):
        out["T1: kd helps (mean > 0, interval above 0, both tasks)" + applicable] = {
            "holds": all(g[fresh]["kd"][t].lo > 0 for t in tasks),
            "kd": {t: str(g[fresh]["kd"][t]) for t in tasks},
        }
    if has(fresh, "aux", "kd", "aux-shuffled", "kd-shuffled"):
        out["T2: aux (tower) >= kd, and shuffled hurts aux less than kd" + applicable] = {
            "holds": all(
                g[fresh]["aux"][t].mean >= g[fresh]["kd"][t].mean
                and g[fresh]["aux-shuffled"][t].mean > g[fresh]["kd-shuffled"][t].mean
                for t in tasks
            ),
            **{v: {t: str(g[fresh][v][t]) for t in tasks} for v in ("aux", "kd", "aux-shuffled", "kd-shuffled")},
        }
    if has(frozen, "adapted", "kd"):
        teacher_better = _beats_in_every_seed(
            seeds, lambda s: s["teachers"][frozen]["adapted"], lambda s: s["teachers"][frozen]["raw"], tasks
        )
        recovered = {}
        for t in tasks:
            raw = np.mean([_ne(s["teachers"][frozen]["raw"], t) for s in seeds])
            adapted = np.mean([_ne(s["teachers"][frozen]["adapted"], t) for s in seeds])
            fresh_raw = np.mean([_ne(s["teachers"][fresh]["raw"], t) for s in seeds])
            gap = raw - fresh_raw
            recovered[t] = round(float((raw - adapted) / gap), 3) if gap > 0 else float("nan")
        out["T3: frozen arm: adapted teacher beats raw in every seed, adapted student beats kd" + applicable] = {
            "holds": teacher_better and all(g[frozen]["adapted"][t].mean > g[frozen]["kd"][t].mean for t in tasks),
            "adapted teacher beats raw in every seed": teacher_better,
            **{v: {t: str(g[frozen][v][t]) for t in tasks} for v in ("adapted", "kd")},
            "share of the staleness gap the adapter recovers": recovered,
        }
    if has(fresh, "all", "kd"):
        ratio = {t: g[fresh]["all"][t].mean / g[fresh]["kd"][t].mean if g[fresh]["kd"][t].mean > 0 else float("inf")
                 for t in tasks}  # fmt: skip
        out["T4: gain(all) >= 2x gain(kd), fresh arm" + applicable] = {
            "holds": all(ratio[t] >= 2.0 and g[fresh]["all"][t].mean > 0 for t in tasks),
            "ratio": {t: round(r, 3) for t, r in ratio.items()},
            **{v: {t: str(g[fresh][v][t]) for t in tasks} for v in ("all", "kd")},
            "note": "inf: kd's mean gain is <= 0 on that task" if any(np.isinf(list(ratio.values()))) else "",
        }
    if has(fresh, "kd-oracle", "kd-shuffled"):
        out["controls: kd from the planted probability helps, kd from a shuffled teacher hurts"] = {
            "holds": all(g[fresh]["kd-oracle"][t].lo > 0 and g[fresh]["kd-shuffled"][t].hi < 0 for t in tasks),
            **{v: {t: str(g[fresh][v][t]) for t in tasks} for v in ("kd-oracle", "kd-shuffled")},
        }
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return x


def print_tables(doc: dict, summary: dict, tasks: tuple[str, ...]) -> None:
    label = f"{len(doc['seeds'])} seeds" + (" (QUICK MODE)" if doc["config"]["quick"] else "")
    for arm in ("fresh", "frozen"):
        table = Table(title=f"teacher advantage NE(hard) - NE(teacher), % of hard's NE, {arm} arm, {label}")
        table.add_column("teacher")
        for t in tasks:
            table.add_column(f"{t}: mean [95% CI] seeds>0")
        for kind, row in summary["teacher_advantage_pct"][arm].items():
            table.add_row(kind, *(str(row[t]) for t in tasks))
        console.print(table)
        table = Table(title=f"student NE gain over hard, % ({arm} arm, {label}); transfer ratio; calibration")
        table.add_column("variant")
        for t in tasks:
            table.add_column(f"{t} gain")
        for t in tasks:
            table.add_column(f"{t} transfer")
        for t in tasks:
            table.add_column(f"{t} calib")
        for v, row in summary["gain_pct"][arm].items():
            ratio = summary["transfer_ratio"][arm].get(v, {})
            cal = summary["calibration"][arm][v]
            table.add_row(v, *(str(row[t]) for t in tasks), *(f"{ratio.get(t, float('nan')):.2f}" for t in tasks),
                          *(f"{cal[t]:.3f}" for t in tasks))  # fmt: skip
        console.print(table)
    for name, t in summary["targets"].items():
        mark = "[green]met[/]" if t["holds"] else "[red]missed[/]"
        console.print(f"{mark}  {name}: { {k: v for k, v in t.items() if k != 'holds'} }", highlight=False)


def report(doc: dict, tasks: tuple[str, ...], name: str = "students_stream", results: Path = RESULTS) -> dict:
    summary = summarize(doc, tasks)
    print_tables(doc, summary, tasks)
    doc = {**doc, "summary": _jsonable(summary)}
    results.mkdir(exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=True))
    plot(summary, tasks, path.with_suffix(".png"), doc["config"]["quick"])
    console.print(f"wrote {path} and {path.with_suffix('.png')}; {doc['seconds']:.0f}s")
    return doc


def plot(summary: dict, tasks: tuple[str, ...], path: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, arm in zip(axes, ("fresh", "frozen"), strict=True):
        gains = summary["gain_pct"][arm]
        names = list(gains)
        width = 0.8 / len(tasks)
        x = np.arange(len(names))
        for i, t in enumerate(tasks):
            mean = np.array([gains[v][t].mean for v in names])
            err = np.array([[gains[v][t].mean - gains[v][t].lo, gains[v][t].hi - gains[v][t].mean] for v in names]).T
            ax.bar(x + i * width, mean, width, yerr=err, capsize=2, label=t)
        adv = summary["teacher_advantage_pct"][arm]["raw"]
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x + width * (len(tasks) - 1) / 2, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{arm} arm; teacher advantage " + "/".join(f"{adv[t].mean:+.2f}%" for t in tasks), fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("NE gain over hard, % (mean, 95% CI)")
    fig.suptitle("students, streaming" + (" (quick mode)" if quick else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
