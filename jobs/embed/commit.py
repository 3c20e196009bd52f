"""The output folder (local or `s3://`, model/storage.py): each run stages the parts of a
file under a folder of its own (`<out>/.staging/<run>/<file stem>/{data,errors}/`, written
by the actors) and the driver commits a file by putting the parts its receipts named in
place (`<out>/<file stem>/`, `<out>/_errors/<file stem>/`), the manifest last: locally by
one rename of a folder that holds them and the manifest, on S3 (no rename) by a copy per
part and the manifest written after them (`storage.publish`)."""

from __future__ import annotations

import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.embed.manifest import MANIFEST, manifest_bytes
from jobs.embed.results import FileResult
from model.storage import Place, make_dirs, place, publish, remove

ERRORS = "_errors"
STAGING = ".staging"


def write_part(run_staging: str | Path | Place, source: str, kind: str, part: pa.Table) -> str | None:
    """One Parquet part of a source file's `kind` ("data" or "errors"), if it has rows;
    returns its name as the commit takes it (`<kind>/<file>`), for the receipt."""
    if not part.num_rows:
        return None
    folder = place(run_staging) / PurePosixPath(source).stem / kind
    make_dirs(folder)
    name = f"part-{uuid.uuid4().hex}.parquet"
    pq.write_table(part, (folder / name).path, filesystem=folder.fs)
    return f"{kind}/{name}"


def commit(
    result: FileResult, out: str | Path | Place, limit: int | None, fm_version: int | None,
    run_staging: str | Path | Place,
) -> None:  # fmt: skip
    """Errors first, data (with its manifest, last) after: the manifest marks the file
    done. Only the parts the receipts named (`result.parts`) are committed: an actor whose
    node died after writing a part but before its receipt came back had its batch run
    again, and the part it left stands for rows another part holds. `limit`: the rows per
    file asked (None: all), `fm_version`: the FM pin (None: the latest); the manifest says
    both, and names the data parts."""
    out, stem = place(out), result.path.stem
    staging = place(run_staging) / stem
    for kind, final in (("errors", out / ERRORS / stem), ("data", out / stem)):
        parts = [p for p in result.parts if p.startswith(f"{kind}/")]
        if kind == "data":
            names = [PurePosixPath(p).name for p in parts]
            publish(staging, parts, final, (MANIFEST, manifest_bytes(result, names, limit, fm_version)))
        elif parts:
            publish(staging, parts, final)
        else:
            remove(final)
    remove(staging)
