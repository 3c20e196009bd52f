"""One streaming run: the hard baseline tuned once on a validation world, then every
seed (a new world): the FM stream and its knowledge (both arms), the students, the
teachers on the same rows."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from bench.students_stream.config import ARMS, StreamConfig
from bench.students_stream.report import report
from bench.students_stream.student import Settings, make_run, scored, stream_student, surfaces_labels, tune_hard
from bench.students_stream.teacher import teach
from bench.students_stream.world import ADAPTED, PLANTED, RAW, World, student_rows, write_world
from jobs.embed.manifest import MANIFEST
from model.batch import Batch
from model.schema import FeatureSchema, load_schema
from students.config import StudentConfig, load_student_config
from trainer.evaluation import normalized_entropy

console = Console(stderr=True)

TEACHER_COLUMNS = {"raw": RAW, "adapted": ADAPTED}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def scores(logits: np.ndarray, labels: np.ndarray, schema: FeatureSchema) -> dict[str, dict[str, float]]:
    """NE and calibration (mean prediction / mean label) per task on the scored rows."""
    out = {}
    for t, task in enumerate(schema.task_names):
        p = 1.0 / (1.0 + np.exp(-logits[:, t].astype(np.float64)))
        y = labels[:, t]
        out[task] = {"ne": normalized_entropy(y, p), "calibration": float(p.mean() / max(y.mean(), 1e-9))}
    return out


def _world(cfg: StreamConfig, schema: FeatureSchema, work: Path, seed: int) -> World:
    return write_world(work, schema, cfg.rows, cfg.shards, seed, users=cfg.users, ads=cfg.ads, drift=cfg.drift)


def _late(world: World, cfg: StreamConfig, sc: StudentConfig, schema: FeatureSchema, knowledge: Path | None):
    return [student_rows(world, i, sc, schema, knowledge) for i in range(cfg.launch, cfg.shards)]


def tune(cfg: StreamConfig, schema: FeatureSchema, sc: StudentConfig, base: Settings, work: Path) -> tuple:
    world = _world(cfg, schema, work / "validation", cfg.validation_seed)
    shards: list[Batch] = _late(world, cfg, sc, schema, None)
    labels, _ = surfaces_labels(shards, schema)

    def score(logits: np.ndarray) -> float:
        return float(np.mean([s["ne"] for s in scores(logits, labels, schema).values()]))

    return tune_hard(shards, sc, schema, base, cfg.passes_grid, cfg.batch_grid, cfg.validation_seed, score)


def knowledge_versions(knowledge: Path, world: World, cfg: StreamConfig) -> dict[str, dict[str, list[int]]]:
    """Shard -> the FM and adapter versions its knowledge was stamped with (the manifests):
    what shows the lag (a new FM version per shard in the fresh arm, one in the frozen)."""
    out = {}
    for path in world.shards[cfg.launch :]:
        manifest = json.loads((knowledge / path.stem / MANIFEST).read_text())
        out[path.stem] = {k: manifest[k] for k in ("rows_out", "fm_versions", "adapter_versions")}
    return out


def run_seed(
    cfg: StreamConfig, schema: FeatureSchema, sc: StudentConfig, settings: Settings, seed: int, work: Path
) -> dict:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    world = _world(cfg, schema, work / "world", seed)
    timings["world"] = time.perf_counter() - start
    start = time.perf_counter()
    arms = teach(world, cfg, schema, work, seed)
    timings["FM stream + knowledge"] = time.perf_counter() - start
    start = time.perf_counter()
    plain = _late(world, cfg, sc, schema, None)
    labels, _ = surfaces_labels(plain, schema)
    hard = scores(stream_student(make_run("hard", cfg.kd_weight, cfg.temperature, None), plain, sc, schema,
                                 settings, seed), labels, schema)  # fmt: skip
    out: dict = {
        "rows": len(labels),
        "teachers": {"planted": scores(_logit(scored(plain, PLANTED)), labels, schema)},
        "students": {},
        "knowledge_versions": {name: knowledge_versions(arm.knowledge, world, cfg) for name, arm in arms.items()},
    }
    for arm_name in ARMS:
        arm = arms[arm_name]
        shards = _late(world, cfg, sc, schema, arm.knowledge)
        out["teachers"][arm_name] = {
            k: scores(_logit(scored(shards, column)), labels, schema) for k, column in TEACHER_COLUMNS.items()
        }
        names = [*cfg.variants, *(cfg.controls if arm_name == "fresh" else ())]
        students = {"hard": hard}
        for name in names:
            if name == "hard":
                continue
            run = make_run(name, cfg.kd_weight, cfg.temperature, arm.checkpoint)
            students[name] = scores(stream_student(run, shards, sc, schema, settings, seed), labels, schema)
        out["students"][arm_name] = students
    timings["students"] = time.perf_counter() - start
    out["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return out


def run(cfg: StreamConfig) -> dict:
    schema = load_schema(cfg.schema_path)
    sc = replace(load_student_config(cfg.config_path, cfg.schema_path), surfaces=(cfg.surface,))
    base = Settings(cfg.passes_grid[0], cfg.batch_grid[0], cfg.student_lr, cfg.student_embedding_lr)
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-students-stream-", dir=cfg.workdir) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        settings, tried = tune(cfg, schema, sc, base, work)
        console.print(f"[dim]hard tuned on the validation world: {tried} -> passes={settings.passes} "
                      f"batch={settings.batch_size} ({time.perf_counter() - start:.0f}s)[/]")  # fmt: skip
        seeds = {}
        for seed in range(cfg.seeds):
            seeds[seed] = run_seed(cfg, schema, sc, settings, seed, work / f"seed-{seed}")
            console.print(f"[dim]seed {seed}: {seeds[seed]['seconds']} (total {time.perf_counter() - total:.0f}s)[/]")
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "hard_settings": asdict(settings),
        "hard_tuning_validation_ne": tried,
        "seeds": seeds,
        "seconds": round(time.perf_counter() - total, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.students --protocol stream", description=__doc__,
        epilog="--protocol frozen: the stale-teacher ablation (bench/students.py), with its own options",
    )  # fmt: skip
    d = StreamConfig()
    p.add_argument("--seeds", type=int, default=d.seeds, help="worlds (3: the quick mode, labelled so)")
    p.add_argument("--rows", type=int, default=d.rows)
    p.add_argument("--name", default="students_stream", help="results file name")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared 2-core machine)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = StreamConfig(seeds=args.seeds, rows=args.rows, quick=args.seeds < d.seeds)
    report(run(cfg), load_schema(cfg.schema_path).task_names, args.name)
