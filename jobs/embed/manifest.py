"""A file's `_manifest.json`: what its committed output stands for (the source, the
dry-run limit, the counts and versions). Written last into the data folder, it is the
commit marker a rerun reads to skip the file."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from jobs.embed.results import FileResult

MANIFEST = "_manifest.json"


def write_manifest(folder: Path, result: FileResult, limit: int | None, fm_version: int | None) -> None:
    manifest = {"source": str(result.path), "limit": limit, "pinned_fm_version": fm_version, **asdict(result)}
    del manifest["path"], manifest["skipped"], manifest["error"], manifest["parts"]
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def committed(target: Path, limit: int | None, fm_version: int | None) -> dict | None:
    """The manifest of a file's finished output, if it stands for what is asked now (rows
    up to `limit`, stamped under the FM pin `fm_version`: a dry run's output does not stand
    for the whole file, nor one stamped under another pin)."""
    manifest = target / MANIFEST
    if not manifest.exists():
        return None
    done = json.loads(manifest.read_text())
    same_pin = done.get("pinned_fm_version") == fm_version
    return done if same_pin and done.get("limit") in (None, limit) else None


def skipped_result(path: Path, done: dict) -> FileResult:
    """The result of a file committed before, from its manifest."""
    result = FileResult(path, skipped=True)
    for key in ("rows_in", "rows_out", "error_rows", "fm_versions", "adapter_versions"):
        setattr(result, key, done[key])
    result.users = done.get("users", 0)
    return result
