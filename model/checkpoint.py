"""Checkpoint folders: what training writes and export and serving read.

    <ckpt>/
      manifest.json      format version, sha256 of every file below, created time
      model_config.json  GEMConfig + adapter size
      schema.yaml        the feature schema the weights were trained on
      model.pt           GEM state_dict
      adapter.pt         StudentAdapter state_dict
      metrics.json       evaluation (GEM and baselines)

A checkpoint is written into a temporary folder and renamed into place, so a reader
never sees half of one. Loading checks the checksums, the schema (against the one the
caller serves, if given) and the weights' shapes, and fails with a `CheckpointError`
that says which file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.adapter import StudentAdapter
from model.config import GEMConfig
from model.gem import GEM
from model.schema import FeatureSchema, SchemaError, schema_from_yaml

FORMAT_VERSION = 1
FILES = ("model_config.json", "schema.yaml", "model.pt", "adapter.pt", "metrics.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the schema."""


@dataclass
class Checkpoint:
    path: Path
    schema: FeatureSchema
    config: GEMConfig
    model: GEM
    adapter: StudentAdapter
    metrics: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    path: str | Path,
    schema: FeatureSchema,
    config: GEMConfig,
    model: GEM,
    adapter: StudentAdapter,
    metrics: dict[str, Any],
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "model_config.json").write_text(
        json.dumps({"model": config.to_dict(), "adapter": {"hidden": adapter.hidden}}, indent=2)
    )
    (tmp / "schema.yaml").write_text(schema.to_yaml())
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(adapter.state_dict(), tmp / "adapter.pt")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "sha256": {name: _sha256(tmp / name) for name in FILES},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    # Swap in one rename; an older checkpoint at `path` is moved aside first.
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def schema_difference(expected: FeatureSchema, found: FeatureSchema) -> str | None:
    """The first difference between two schemas, in words, or None."""
    a, b = expected.to_dict(), found.to_dict()
    for key in a:
        if a[key] != b[key]:
            if isinstance(a[key], (list, tuple)):
                names_a = [x["name"] if isinstance(x, dict) else x for x in a[key]]
                names_b = [x["name"] if isinstance(x, dict) else x for x in b[key]]
                extra = [n for n in names_b if n not in names_a]
                lacking = [n for n in names_a if n not in names_b]
                if extra:
                    return f"{key}: has {extra[0]!r}, which the expected schema does not"
                if lacking:
                    return f"{key}: lacks {lacking[0]!r}"
            return f"{key}: {b[key]!r} != expected {a[key]!r}"
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is unreadable: {e}") from None


def load_checkpoint(path: str | Path, expect_schema: FeatureSchema | None = None) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (train one with `gem train`)")
    manifest = _read_json(path / "manifest.json") if (path / "manifest.json").exists() else None
    if manifest is None:
        raise CheckpointError(f"checkpoint {path}: manifest.json is missing (incomplete or not a checkpoint)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {manifest.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    for name in FILES:
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if _sha256(f) != manifest["sha256"].get(name):
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 does not match manifest.json)")

    try:
        schema = schema_from_yaml((path / "schema.yaml").read_text(), source=str(path / "schema.yaml"))
    except SchemaError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    if expect_schema is not None and (diff := schema_difference(expect_schema, schema)):
        raise CheckpointError(f"checkpoint {path} does not match the schema {expect_schema.name!r}: {diff}")

    raw_config = _read_json(path / "model_config.json")
    try:
        config = GEMConfig.from_dict(raw_config["model"])
        model = GEM(schema, config)
        adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), hidden=raw_config["adapter"]["hidden"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: model_config.json is invalid: {e}") from None
    for module, name in ((model, "model.pt"), (adapter, "adapter.pt")):
        try:
            state = torch.load(path / name, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {path}: {name} cannot be loaded into the model: {first_line}") from None
    model.eval()
    adapter.eval()
    return Checkpoint(path, schema, config, model, adapter, _read_json(path / "metrics.json"))
