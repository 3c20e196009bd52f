"""The synthetic world of one seed and the student's rows of a shard.

The planted probabilities are written beside the shards (model/data/synth.py's sidecar,
in its own folder): no model reads them; the benchmark takes the NE floor and the
oracle teacher from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.batch import Batch
from model.data.reader import surface_index
from model.data.synth import SynthConfig, planted_path, write_shards
from model.schema import SURFACE_INPUT, FeatureSchema
from students.config import StudentConfig
from students.knowledge import KEY, join_knowledge, read_knowledge, teacher_probs
from students.train import TEACHER, read_rows
from students.variants import Variant

# Columns of a student's shard batch beyond its inputs: the teachers on its rows.
RAW, ADAPTED, PLANTED = "teacher_raw", "teacher_adapted", "planted"


@dataclass(frozen=True)
class World:
    shards: list[Path]
    planted: Path


def write_world(out: Path, schema: FeatureSchema, rows: int, shards: int, seed: int, **synth) -> World:
    paths = write_shards(
        SynthConfig(rows=rows, shards=shards, seed=seed, **synth), schema, out / "data", planted_dir=out / "planted"
    )
    return World(paths, out / "planted")


def _kept(path: Path, cfg: StudentConfig, schema: FeatureSchema) -> pa.Table:
    """The keys of the shard's rows on the student's surfaces, in file order (read_rows's rows)."""
    table = pq.read_table(path, columns=[KEY, SURFACE_INPUT])
    keep = np.isin(surface_index(table.column(SURFACE_INPUT), schema), cfg.surface_indices(schema))
    return table.filter(pa.array(keep)).select([KEY])


def planted_probs(world: World, index: int, keys: pa.Table, schema: FeatureSchema) -> np.ndarray:
    planted = pq.read_table(planted_path(world.planted, index)).rename_columns(
        [KEY, *(f"planted_{t}" for t in schema.task_names)]
    )
    return teacher_probs(join_knowledge(keys, planted), "planted", schema.task_names)


def student_rows(world: World, index: int, cfg: StudentConfig, schema: FeatureSchema, knowledge: Path | None) -> Batch:
    """The student's batch of shard `index` (students.train.read_rows) with the planted
    probabilities and, given the arm's knowledge, its raw and adapted labels and GEM's
    embeddings (the `repr` inputs), row for row."""
    path = world.shards[index]
    variant = Variant(kd=True, repr=True) if knowledge is not None else Variant()
    batch, _ = read_rows(path, cfg, schema, knowledge, variant)
    keys = _kept(path, cfg, schema)
    batch[PLANTED] = planted_probs(world, index, keys, schema)
    if knowledge is not None:
        batch[RAW] = batch.pop(TEACHER)
        adapted = read_knowledge(knowledge, [path.stem], [f"adapted_{t}" for t in schema.task_names])
        batch[ADAPTED] = teacher_probs(join_knowledge(keys, adapted), "adapted", schema.task_names)
    return batch
