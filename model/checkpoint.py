"""Checkpoint folders: what training writes and export and serving read.

    <ckpt>/
      manifest.json      format version, sha256 of every file below, created time
      model_config.json  GEMConfig + adapter size
      schema.yaml        the feature schema the weights were trained on
      model.pt           GEM state_dict
      adapter.pt         StudentAdapter state_dict
      metrics.json       evaluation (GEM and baselines)
      optimizer.pt       optional: the optimizers' state_dicts (to resume training exactly)

`save_checkpoint` writes a folder into a temporary one and renames it into place, so a
reader never sees half of one. `CheckpointStore` keeps numbered checkpoints behind a
pointer, so that a process killed at any instant leaves a complete checkpoint to resume
from (the side trainer's state). Loading checks the checksums, the schema (against the
one the caller serves, if given) and the weights' shapes, and fails with a
`CheckpointError` that says which file and what is wrong.
"""

from __future__ import annotations

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
from model.files import sha256_file, temporary_sibling
from model.gem import GEM
from model.schema import FeatureSchema, SchemaError, schema_from_yaml

FORMAT_VERSION = 1
FILES = ("model_config.json", "schema.yaml", "model.pt", "adapter.pt", "metrics.json")
OPTIMIZER_FILE = "optimizer.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the schema."""


@dataclass
class ModelBundle:
    """What a checkpoint holds and export publishes: the weights and what they mean."""

    schema: FeatureSchema
    config: GEMConfig
    model: GEM
    adapter: StudentAdapter


@dataclass
class Checkpoint(ModelBundle):
    """A bundle read from (or saved to) a checkpoint folder."""

    path: Path
    metrics: dict[str, Any]
    # The optimizers' state_dicts, in the order the trainer makes them (None: not saved).
    optimizer: list[dict[str, Any]] | None = None


def write_checkpoint(
    folder: Path, bundle: ModelBundle, metrics: dict[str, Any], optimizer: list[dict[str, Any]] | None = None
) -> None:
    """Writes every file of a checkpoint into `folder` (a fresh one), the manifest last."""
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text(
        json.dumps({"model": bundle.config.to_dict(), "adapter": {"hidden": bundle.adapter.hidden}}, indent=2)
    )
    (folder / "schema.yaml").write_text(bundle.schema.to_yaml())
    torch.save(bundle.model.state_dict(), folder / "model.pt")
    torch.save(bundle.adapter.state_dict(), folder / "adapter.pt")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    names: tuple[str, ...] = FILES
    if optimizer is not None:
        torch.save(optimizer, folder / OPTIMIZER_FILE)
        names = (*FILES, OPTIMIZER_FILE)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "sha256": {name: sha256_file(folder / name) for name in names},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def save_checkpoint(path: str | Path, bundle: ModelBundle, metrics: dict[str, Any]) -> Path:
    """A checkpoint at `path` (`gem train --out`): written aside, then swapped in. An older
    checkpoint there is moved aside for the instant of the swap; a process that must
    never be without one keeps a `CheckpointStore` instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, bundle, metrics)
    # A folder cannot be replaced by a rename: the old one steps aside for the swap.
    old = temporary_sibling(path, "old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


class CheckpointStore:
    """Numbered checkpoints behind a pointer: at every instant one complete checkpoint is
    there to resume from.

        <root>/checkpoints/<n>/          complete checkpoints; n grows with every save
        <root>/checkpoint -> checkpoints/<n>   the pointer (a symlink, replaced in one rename)

    A save writes `checkpoints/.tmp-<n>`, renames it to `<n>` (from here it is the
    newest complete checkpoint), replaces the pointer, then retires the older ones (each
    renamed to `.old-<n>`, then deleted). `newest()` is the truth for recovery: a kill
    after the first rename and before the pointer moved leaves the pointer one behind.
    `tidy()` (at start) removes what a kill left and moves a checkpoint of the old
    single-folder layout (`<root>/checkpoint` a folder, or its `.checkpoint.tmp-*` /
    `.checkpoint.old-*` temporaries when the kill fell between its two renames) into
    the store.
    """

    def __init__(self, root: Path, name: str = "checkpoint"):
        self.root = Path(root)
        self.pointer = self.root / name
        self.folder = self.root / "checkpoints"

    def numbers(self) -> list[int]:
        """Numbers of the complete checkpoints (a manifest is written last), oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(
            int(p.name) for p in self.folder.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file()
        )

    def path(self, number: int) -> Path:
        return self.folder / str(number)

    def newest(self) -> Path | None:
        numbers = self.numbers()
        return self.path(numbers[-1]) if numbers else None

    def next_number(self) -> int:
        used = [int(p.name) for p in self.folder.glob("*") if p.name.isdigit()] if self.folder.is_dir() else []
        return max(used, default=0) + 1

    def save(
        self, number: int, bundle: ModelBundle, metrics: dict[str, Any], optimizer: list[dict[str, Any]] | None = None
    ) -> Path:
        tmp = self.folder / f".tmp-{number}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(tmp, bundle, metrics, optimizer)
        final = self._install(tmp, self.path(number))
        self._point(number)
        for older in self.numbers():
            if older < number:
                self._retire(self.path(older))
        return final

    # Each step of a save is one rename (the fault-injection tests hold between them).

    def _install(self, tmp: Path, final: Path) -> Path:
        os.replace(tmp, final)
        return final

    def _point(self, number: int) -> None:
        link = self.root / f".{self.pointer.name}.tmp"
        link.unlink(missing_ok=True)
        os.symlink(Path(self.folder.name) / str(number), link)
        os.replace(link, self.pointer)

    def _set_aside(self, folder: Path) -> Path:
        aside = folder.with_name(f".old-{folder.name}")
        os.replace(folder, aside)
        return aside

    def _retire(self, folder: Path) -> None:
        shutil.rmtree(self._set_aside(folder))

    def tidy(self) -> list[Path]:
        """Removes what a killed save left (temporaries, retired and superseded
        checkpoints), adopts a checkpoint of the old layout, points at the newest;
        returns what it removed."""
        removed: list[Path] = []
        if self._legacy_pointer() or not self.numbers():
            self._adopt_legacy()
        for p in [*self.folder.glob(".tmp-*"), *self.folder.glob(".old-*"), *self.root.glob(f".{self.pointer.name}.*")]:
            _remove(p)
            removed.append(p)
        numbers = self.numbers()
        for n in numbers[:-1]:
            self._retire(self.path(n))
            removed.append(self.path(n))
        incomplete = [p for p in self.folder.glob("*") if p.name.isdigit() and int(p.name) not in numbers]
        for p in incomplete:
            _remove(p)
            removed.append(p)
        if numbers and (not self.pointer.is_symlink() or self.pointer.resolve() != self.path(numbers[-1]).resolve()):
            self._point(numbers[-1])
        return removed

    def _legacy_pointer(self) -> bool:
        return self.pointer.is_dir() and not self.pointer.is_symlink()

    def _adopt_legacy(self) -> None:
        name = self.pointer.name
        legacy = [self.pointer] if self._legacy_pointer() else []
        legacy += sorted(self.root.glob(f".{name}.tmp-*")) + sorted(self.root.glob(f".{name}.old-*"))
        for candidate in legacy:
            try:
                load_checkpoint(candidate)
            except CheckpointError:
                continue
            self.folder.mkdir(parents=True, exist_ok=True)
            self._install(candidate, self.path(self.next_number()))
            return


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def checkpoint_digests(path: Path) -> dict[str, str]:
    """File name -> sha256 of a checkpoint's files, from its manifest."""
    return dict(_read_json(Path(path) / "manifest.json")["sha256"])


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
    for name in (*FILES, *([OPTIMIZER_FILE] if OPTIMIZER_FILE in manifest["sha256"] else [])):
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if sha256_file(f) != manifest["sha256"].get(name):
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
    optimizer = None
    if OPTIMIZER_FILE in manifest["sha256"]:
        try:
            optimizer = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"checkpoint {path}: {OPTIMIZER_FILE} cannot be loaded: {e}") from None
    model.eval()
    adapter.eval()
    return Checkpoint(schema, config, model, adapter, path, _read_json(path / "metrics.json"), optimizer)
