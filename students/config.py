"""What a vertical model sees: a subset of the FM's schema, from a small YAML file.

The student's features are named, never redefined: buckets and widths come from the
FM's schema, so a student's table has the FM's shape for the same feature (what
`share` needs) and the FM's Parquet reader reads the student's columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from model.schema import DEFAULT_SCHEMA_PATH, FeatureSchema, Sequence, load_schema

REFERENCE_CONFIG = Path(__file__).parent / "configs" / "reference.yaml"


class StudentConfigError(ValueError):
    """A student config names something the FM's schema does not have."""


@dataclass(frozen=True)
class StudentConfig:
    name: str
    sparse: tuple[str, ...]
    dense: tuple[str, ...]
    # Fields of the schema's first behavior sequence, and how many newest events.
    sequence_fields: tuple[str, ...] = ()
    sequence_events: int = 0
    # Surfaces the vertical ranks on (rows of other surfaces are not its data).
    surfaces: tuple[str, ...] = ()
    dim: int = 16
    top: tuple[int, ...] = (128, 64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "surfaces": list(self.surfaces), "sparse": list(self.sparse), "dense": list(self.dense),
            "sequence": {"fields": list(self.sequence_fields), "events": self.sequence_events},
            "dim": self.dim, "top": list(self.top),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudentConfig:
        known = {"name", "surfaces", "sparse", "dense", "sequence", "dim", "top"}
        if not isinstance(raw, dict):
            raise StudentConfigError("a student config is a mapping")
        if unknown := sorted(set(raw) - known):
            raise StudentConfigError(f"unknown student config key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        seq = raw.get("sequence") or {}
        cfg = cls(
            name=str(raw.get("name", "student")),
            sparse=tuple(raw.get("sparse") or ()),
            dense=tuple(raw.get("dense") or ()),
            sequence_fields=tuple(seq.get("fields") or ()),
            sequence_events=int(seq.get("events", 0)),
            surfaces=tuple(raw.get("surfaces") or ()),
            dim=int(raw.get("dim", 16)),
            top=tuple(int(x) for x in raw.get("top", (128, 64))),
        )
        if cfg.sequence_fields and cfg.sequence_events < 1:
            raise StudentConfigError("sequence.events must be at least 1 when sequence.fields are given")
        if cfg.dim < 1 or not cfg.top or min(cfg.top) < 1:
            raise StudentConfigError("dim and every top width must be positive")
        return cfg

    def check(self, schema: FeatureSchema) -> None:
        """Every name against the FM's schema."""
        problems = [f"sparse feature {n!r}" for n in self.sparse if n not in {f.name for f in schema.sparse}]
        problems += [f"dense feature {n!r}" for n in self.dense if n not in {f.name for f in schema.dense}]
        fields = {f.name for f in schema.sequences[0].fields} if schema.sequences else set()
        problems += [f"sequence field {n!r}" for n in self.sequence_fields if n not in fields]
        problems += [f"surface {n!r}" for n in self.surfaces if n not in schema.surfaces]
        if problems:
            raise StudentConfigError(
                f"student config {self.name!r}: the schema {schema.name!r} has no {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            )

    def surface_indices(self, schema: FeatureSchema) -> tuple[int, ...]:
        names = self.surfaces or schema.surfaces
        return tuple(schema.surfaces.index(n) for n in names)

    def sub_schema(self, schema: FeatureSchema) -> FeatureSchema:
        """The FM's schema cut to the student's features (all surfaces and tasks kept, so
        surface indices and label columns mean the same): what the reader reads."""
        self.check(schema)
        sequences: tuple[Sequence, ...] = ()
        if self.sequence_fields:
            seq = schema.sequences[0]
            fields = tuple(f for f in seq.fields if f.name in self.sequence_fields)
            sequences = (replace(seq, max_length=self.sequence_events, fields=fields),)
        return replace(
            schema,
            name=f"{schema.name}_{self.name}",
            sparse=tuple(f for f in schema.sparse if f.name in self.sparse),
            dense=tuple(f for f in schema.dense if f.name in self.dense),
            sequences=sequences,
        )


def load_student_config(
    path: str | Path = REFERENCE_CONFIG, schema_path: str | Path = DEFAULT_SCHEMA_PATH
) -> StudentConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StudentConfigError(f"{path}: cannot read the student config: {e}") from None
    cfg = StudentConfig.from_dict(raw)
    cfg.check(load_schema(schema_path))
    return cfg
