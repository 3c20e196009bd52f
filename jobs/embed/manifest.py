"""A file's `_manifest.json`: what its committed output stands for (the source, the
dry-run limit, the counts and versions, the data parts by name). Written last into the
data folder, it is the commit marker a rerun reads to skip the file; on object storage,
where parts land one by one, the output counts only when every part it names is there."""

from __future__ import annotations

import json
from dataclasses import asdict

from jobs.embed.results import FileResult
from model.storage import Place, exists, read_bytes

MANIFEST = "_manifest.json"


def manifest_bytes(result: FileResult, parts: list[str], limit: int | None, fm_version: int | None) -> bytes:
    manifest = {"source": str(result.path), "limit": limit, "pinned_fm_version": fm_version, **asdict(result)}
    del manifest["path"], manifest["skipped"], manifest["error"]
    manifest["parts"] = parts
    return json.dumps(manifest, indent=2).encode()


def committed(target: Place, limit: int | None, fm_version: int | None) -> dict | None:
    """The manifest of a file's finished output, if it stands for what is asked now (rows
    up to `limit`, stamped under the FM pin `fm_version`: a dry run's output does not stand
    for the whole file, nor one stamped under another pin) and the parts it names exist
    (a manifest of before parts were named is taken as it is)."""
    manifest = target / MANIFEST
    if not exists(manifest):
        return None
    done = json.loads(read_bytes(manifest))
    same_pin = done.get("pinned_fm_version") == fm_version
    if not (same_pin and done.get("limit") in (None, limit)):
        return None
    return done if all(exists(target / part) for part in done.get("parts", [])) else None


def skipped_result(path: Place, done: dict) -> FileResult:
    """The result of a file committed before, from its manifest."""
    result = FileResult(path, skipped=True)
    for key in ("rows_in", "rows_out", "error_rows", "fm_versions", "adapter_versions"):
        setattr(result, key, done[key])
    result.users = done.get("users", 0)
    return result
