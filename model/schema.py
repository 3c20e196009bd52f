"""The feature schema: one YAML file that every other piece is derived from.

The model's embedding tables, the ONNX input signature, the Triton configs, the gRPC
validation and the Parquet readers all read a `FeatureSchema`; none of them lists
features by hand. `load_schema` validates the file and reports the first problem with
the path of the offending field (``sparse[3].buckets: ...``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

Side = Literal["user", "ad", "context"]
SIDES: tuple[str, ...] = ("user", "ad", "context")
DEFAULT_SCHEMA_PATH = Path(__file__).parent / "schemas" / "ads.yaml"

# Names become ONNX/Triton tensor names, Parquet columns and proto map keys.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Column and input names the schema derives itself; a feature may not take them.
SURFACE_INPUT = "surface"
RESERVED_NAMES = frozenset({SURFACE_INPUT, "example_id", "event_ts"})


class SchemaError(ValueError):
    """A schema file is malformed; the message names the field and the problem."""


# Transforms a dense feature may ask for, applied inside the model before it
# standardizes the value with statistics of the training shards.
#   log1p: sign(x) * log(1 + |x|), for heavy-tailed counts and amounts (log1p for x >= 0)
DENSE_TRANSFORMS: tuple[str, ...] = ("log1p",)


@dataclass(frozen=True)
class DenseFeature:
    name: str
    side: Side
    # None, or one of DENSE_TRANSFORMS.
    transform: str | None = None


@dataclass(frozen=True)
class SparseFeature:
    name: str
    side: Side
    buckets: int
    dim: int


@dataclass(frozen=True)
class SequenceField:
    name: str
    buckets: int
    dim: int


@dataclass(frozen=True)
class Sequence:
    """A user behavior sequence; its fields share one length per example."""

    name: str
    max_length: int
    fields: tuple[SequenceField, ...]

    @property
    def length_name(self) -> str:
        return f"{self.name}_length"


@dataclass(frozen=True)
class Task:
    name: str
    # The task whose positive label is a precondition of this one (conversion
    # happens only after a click); None for a task of its own.
    after: str | None = None

    @property
    def label_column(self) -> str:
        return f"label_{self.name}"


@dataclass(frozen=True)
class FeatureSchema:
    name: str
    dense: tuple[DenseFeature, ...]
    sparse: tuple[SparseFeature, ...]
    sequences: tuple[Sequence, ...]
    surfaces: tuple[str, ...]
    tasks: tuple[Task, ...]

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def task_parents(self) -> tuple[int | None, ...]:
        """For each task, the index of the task it follows (`after:`), or None. A parent
        always comes earlier (the schema is validated so), so one pass in task order
        sees every parent before its children."""
        index = {t.name: i for i, t in enumerate(self.tasks)}
        return tuple(None if t.after is None else index[t.after] for t in self.tasks)

    def sparse_on(self, side: str) -> tuple[SparseFeature, ...]:
        return tuple(f for f in self.sparse if f.side == side)

    def dense_on(self, side: str) -> tuple[DenseFeature, ...]:
        return tuple(f for f in self.dense if f.side == side)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(value: Any) -> Any:
    """Tuples -> lists so that YAML stays human-readable."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Reader:
    """Reads typed values out of a parsed YAML mapping, naming the path on failure."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str) -> SchemaError:
        return SchemaError(f"schema {self.source}: {path}: {problem}")

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(path, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
        return value

    def required(self, mapping: dict[str, Any], key: str, path: str) -> Any:
        if key not in mapping or mapping[key] is None:
            raise self.fail(f"{path}.{key}" if path else key, "is required")
        return mapping[key]

    def name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _NAME_RE.match(value):
            raise self.fail(path, f"must be a lower_snake_case name, got {value!r}")
        return value

    def positive_int(self, value: Any, path: str) -> int:
        # bool is an int subclass; `buckets: yes` is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(path, f"must be a positive integer, got {value!r}")
        return value

    def side(self, value: Any, path: str) -> Side:
        if value not in SIDES:
            raise self.fail(path, f"must be one of {', '.join(SIDES)}, got {value!r}")
        return value

    def items(self, value: Any, path: str, *, non_empty: bool) -> list[Any]:
        if value is None:
            value = []
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, got {type(value).__name__}")
        if non_empty and not value:
            raise self.fail(path, "must not be empty")
        return value


def parse_schema(raw: Any, source: str = "<dict>") -> FeatureSchema:
    r = _Reader(source)
    top = r.mapping(raw, "<top>", {"name", "dense", "sparse", "sequences", "surfaces", "tasks"})

    dense = []
    for i, item in enumerate(r.items(top.get("dense"), "dense", non_empty=False)):
        p = f"dense[{i}]"
        m = r.mapping(item, p, {"name", "side", "transform"})
        transform = m.get("transform")
        if transform is not None and transform not in DENSE_TRANSFORMS:
            raise r.fail(f"{p}.transform", f"must be one of {', '.join(DENSE_TRANSFORMS)}, got {transform!r}")
        dense.append(
            DenseFeature(
                name=r.name(r.required(m, "name", p), f"{p}.name"),
                side=r.side(r.required(m, "side", p), f"{p}.side"),
                transform=transform,
            )
        )

    sparse = []
    for i, item in enumerate(r.items(top.get("sparse"), "sparse", non_empty=True)):
        p = f"sparse[{i}]"
        m = r.mapping(item, p, {"name", "side", "buckets", "dim"})
        sparse.append(
            SparseFeature(
                name=r.name(r.required(m, "name", p), f"{p}.name"),
                side=r.side(r.required(m, "side", p), f"{p}.side"),
                buckets=r.positive_int(r.required(m, "buckets", p), f"{p}.buckets"),
                dim=r.positive_int(r.required(m, "dim", p), f"{p}.dim"),
            )
        )

    sequences = []
    for i, item in enumerate(r.items(top.get("sequences"), "sequences", non_empty=False)):
        p = f"sequences[{i}]"
        m = r.mapping(item, p, {"name", "max_length", "fields"})
        fields = []
        for j, f in enumerate(r.items(r.required(m, "fields", p), f"{p}.fields", non_empty=True)):
            fp = f"{p}.fields[{j}]"
            fm = r.mapping(f, fp, {"name", "buckets", "dim"})
            fields.append(
                SequenceField(
                    name=r.name(r.required(fm, "name", fp), f"{fp}.name"),
                    buckets=r.positive_int(r.required(fm, "buckets", fp), f"{fp}.buckets"),
                    dim=r.positive_int(r.required(fm, "dim", fp), f"{fp}.dim"),
                )
            )
        sequences.append(
            Sequence(
                name=r.name(r.required(m, "name", p), f"{p}.name"),
                max_length=r.positive_int(r.required(m, "max_length", p), f"{p}.max_length"),
                fields=tuple(fields),
            )
        )

    surfaces = tuple(
        r.name(s, f"surfaces[{i}]")
        for i, s in enumerate(r.items(r.required(top, "surfaces", ""), "surfaces", non_empty=True))
    )
    if len(set(surfaces)) != len(surfaces):
        dup = next(s for s in surfaces if surfaces.count(s) > 1)
        raise r.fail("surfaces", f"surface {dup!r} is listed twice")

    tasks = []
    for i, item in enumerate(r.items(r.required(top, "tasks", ""), "tasks", non_empty=True)):
        p = f"tasks[{i}]"
        m = r.mapping(item, p, {"name", "after"})
        after = m.get("after")
        tasks.append(
            Task(
                name=r.name(r.required(m, "name", p), f"{p}.name"),
                after=None if after is None else r.name(after, f"{p}.after"),
            )
        )
    task_names = [t.name for t in tasks]
    for i, t in enumerate(tasks):
        if t.after is not None and t.after not in task_names[:i]:
            raise r.fail(f"tasks[{i}].after", f"must name an earlier task, got {t.after!r}")

    schema = FeatureSchema(
        name=r.name(r.required(top, "name", ""), "name"),
        dense=tuple(dense),
        sparse=tuple(sparse),
        sequences=tuple(sequences),
        surfaces=surfaces,
        tasks=tuple(tasks),
    )
    _check_unique_names(schema, r)
    return schema


def _check_unique_names(schema: FeatureSchema, r: _Reader) -> None:
    """Every derived tensor/column name must be unique and not reserved."""
    seen: dict[str, str] = {}
    named = [(f"dense[{i}].name", f.name) for i, f in enumerate(schema.dense)]
    named += [(f"sparse[{i}].name", f.name) for i, f in enumerate(schema.sparse)]
    for i, s in enumerate(schema.sequences):
        named.append((f"sequences[{i}].name", s.length_name))
        named += [(f"sequences[{i}].fields[{j}].name", f.name) for j, f in enumerate(s.fields)]
    named += [(f"tasks[{i}].name", t.label_column) for i, t in enumerate(schema.tasks)]
    for path, name in named:
        if name in RESERVED_NAMES:
            raise r.fail(path, f"{name!r} is reserved")
        if name in seen:
            raise r.fail(path, f"name {name!r} is already used by {seen[name]}")
        seen[name] = path


def schema_from_yaml(text: str, source: str = "<string>") -> FeatureSchema:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SchemaError(f"schema {source}: not valid YAML: {e}") from None
    return parse_schema(raw, source=source)


def load_schema(path: str | Path = DEFAULT_SCHEMA_PATH) -> FeatureSchema:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SchemaError(f"schema {path}: cannot read: {e.strerror or e}") from None
    return schema_from_yaml(text, source=str(path))
