"""Knowledge from the gate's pass (`--knowledge-out`): what the served versions said
about the rows of each shard the gate scores, written exactly as `gem embed` writes it
(`<out>/<shard stem>/part-*.parquet` + `_manifest.json`, jobs/embed), so students/ and
any VM job read it unchanged.

Exactly once: the shard's rows are staged under `<out>/.staging/trainer/`, then committed
(jobs/embed/commit.py: one rename locally; on S3 the part copied, the manifest last),
before the cycle's checkpoint. A kill before the manifest is written leaves staging
(removed at the next start) and, on S3, parts no manifest names (replaced when the rerun
commits the shard); a kill after it, before the
checkpoint, reruns the cycle, whose gate scores the same shard with the same served
versions (nothing of the cycle was published) and finds the shard committed: it keeps
it, so no row is written twice. The commit line of the cycle says what was written
(trainer/ledger.py). The folder is the trainer's own: `gem embed` into the same folder
would remove the trainer's staging.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.embed.commit import STAGING, commit, write_part
from jobs.embed.manifest import committed, skipped_result
from jobs.embed.outputs import EMBEDDINGS, KEY_COLUMNS, split_stamped, stamped_table
from jobs.embed.results import FileResult
from model.storage import Place, listing, place, remove
from serving.backends.base import Knowledge

log = logging.getLogger(__name__)

# The trainer's staging folder under <out>/.staging (gem embed's runs use their own).
RUN = "trainer"


def tidy_staging(out: str | Path | Place) -> None:
    """What a killed cycle staged and never committed (nothing will commit it), and the
    staging folder itself once empty (gem embed's runs may stage there too). On S3 that
    folder is the marker pyarrow leaves when the last object under it goes."""
    where = place(out)
    remove(where / STAGING / RUN)
    if where.remote:
        if not listing(where / STAGING):
            remove(where / STAGING)
        return
    with contextlib.suppress(OSError):  # absent, or not empty: rmdir says which atomically
        Path(where.path, STAGING).rmdir()


def summary(result: FileResult) -> dict[str, Any]:
    """What the cycle's commit line says about the knowledge (the same whether this cycle
    wrote it or a killed run of it did)."""
    return {
        "shard": result.path.name, "rows": result.rows_out, "fm_versions": result.fm_versions,
        "adapter_versions": result.adapter_versions,
    }  # fmt: skip


class KnowledgeWriter:
    def __init__(self, out: str | Path, stream: str | Path, task_names: tuple[str, ...]):
        # Either may be local or s3:// (model/storage.py).
        self.out, self.stream, self.task_names = place(out), place(stream), task_names

    def write(self, shard: str, served: Knowledge) -> dict[str, Any]:
        """Commits the knowledge of the stream's `shard` (`served`: the gate's pass over its
        rows, in file order); a shard committed before is kept. Returns its `summary`."""
        source = self.stream / shard
        target = self.out / source.stem
        done = committed(target, None, None)  # every row, the served (unpinned) versions
        if done is not None:
            log.info("knowledge of %s was committed before (a rerun of a killed cycle): kept", shard)
            return summary(skipped_result(source, done))
        names = pq.read_schema(source.path, filesystem=source.fs).names
        keys = pq.read_table(source.path, columns=[k for k in KEY_COLUMNS if k in names], filesystem=source.fs)
        rows = keys.num_rows
        if len(served.outputs[EMBEDDINGS[0]]) != rows:
            raise ValueError(f"{shard}: {rows} rows in the file, {len(served.outputs[EMBEDDINGS[0]])} scored")
        widths = {name: served.outputs[name].shape[1] for name in EMBEDDINGS}
        # A shard the trainer reads has no row that cannot be served (trainer/stream.py).
        stamped = stamped_table(keys, pa.nulls(rows, pa.string()), served, self.task_names, widths)
        data, _ = split_stamped(stamped)
        staging = self.out / STAGING / RUN
        part = write_part(staging, source.path, "data", data)
        # One encoding per row: the gate's pass takes the shard as examples.
        result = FileResult(
            source, rows_in=rows, rows_out=rows, users=rows, fm_versions=[served.fm_version],
            adapter_versions=[served.adapter_version], parts=[part] if part else [],
        )  # fmt: skip
        self._commit(result, staging)
        log.info("knowledge of %s: %d rows (fm v%d, adapter v%d)", shard, rows, served.fm_version,
                 served.adapter_version)  # fmt: skip
        return summary(result)

    # Its own step: the fault-injection tests kill the trainer just before and after it.
    def _commit(self, result: FileResult, staging: Place) -> None:
        commit(result, self.out, None, None, staging)
        tidy_staging(self.out)
