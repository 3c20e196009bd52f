"""The output folder: each run stages the parts of a file under a folder of its own
(`<out>/.staging/<run>/<file stem>/{data,errors}/`, written by the actors) and the driver
commits a file by renaming its parts into place (`<out>/<file stem>/`,
`<out>/_errors/<file stem>/`)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.embed.manifest import write_manifest
from jobs.embed.results import FileResult

ERRORS = "_errors"
STAGING = ".staging"


def write_part(run_staging: Path, source: str, kind: str, part: pa.Table) -> str | None:
    """One Parquet part of a source file's `kind` ("data" or "errors"), if it has rows;
    returns its name as the commit takes it (`<kind>/<file>`), for the receipt."""
    if not part.num_rows:
        return None
    folder = run_staging / Path(source).stem / kind
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex}.parquet"
    pq.write_table(part, folder / name)
    return f"{kind}/{name}"


def commit(result: FileResult, out: Path, limit: int | None, fm_version: int | None, run_staging: Path) -> None:
    """Errors first, data (with its manifest) last: the data folder marks the file done.
    Only the parts the receipts named (`result.parts`) are committed: an actor whose node
    died after writing a part but before its receipt came back had its batch run again,
    and the part it left stands for rows another part holds. `limit`: the rows per file
    asked (None: all), `fm_version`: the FM pin (None: the latest); the manifest says both."""
    stem = result.path.stem
    staging = run_staging / stem
    kept = staging / "kept"  # the named parts, gathered apart, then renamed into place
    (kept / "data").mkdir(parents=True, exist_ok=True)
    for part in result.parts:
        (kept / part).parent.mkdir(exist_ok=True)
        (staging / part).rename(kept / part)
    write_manifest(kept / "data", result, limit, fm_version)
    for final, part in ((out / ERRORS / stem, kept / "errors"), (out / stem, kept / "data")):
        if final.exists():
            shutil.rmtree(final)
        if part.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            part.rename(final)
    shutil.rmtree(staging, ignore_errors=True)
