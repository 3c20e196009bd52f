"""`gem embed`: stamp GEM's knowledge onto logged examples, as a Ray Data job.

One streaming pipeline covers every pending input file: `read_parquet` (the file path
as a column) -> `map_batches` on an actor pool that holds the model (in-process ONNX
Runtime, or a client of the Triton server) and writes each batch's rows as Parquet parts
into the staging folder of their file -> the driver, which counts rows per file from the
actors' small receipts and commits a file (renames its staging folder into place) as
soon as all of its rows are written. Writes are spread over the actors, the commit is
the driver's alone, so the same job runs on a laptop, here, or on a Ray cluster
(`address`; the output folder must then be shared storage).

Each input file becomes `<out>/<file stem>/` (parts plus `_manifest.json`, the commit
marker naming the parts: a rerun after a crash skips committed files and redoes the
others, so there are no duplicates or gaps). Input and output may be local or `s3://`
(model/storage.py): locally a file commits by one rename of a folder holding its parts
and manifest; S3 has no rename, so there the commit is manifest-last (the old manifest
removed first, the parts copied from staging under their final names, the manifest
written after them), and an output counts only when its manifest is there and every part
it names exists. Rows that do not match the schema (nulls, unknown surfaces,
ragged sequence fields) go to `<out>/_errors/<file stem>/` with the reason; a file that
cannot be read as the schema at all (a column of the wrong type) is refused from its
Parquet footer before any work. Nothing is dropped silently: per file, rows out + error
rows = rows in.

Logged rows are one row per impression. When the served FM takes the user-indexed form
(`shared_user`), each batch goes to it with each user once: the rows of one request (or
user) key, `group_by` (default `request_id`, when the file has that column), become one
user row after an exact check that they agree (else, and without the column, identical
user rows are found by content). The summary counts the users encoded.

The rooms: `config` (what a run is asked), `results` (what it found per file),
`plan` (which files to do), `rows` (which rows can be served, and their user keys),
`outputs` (a batch's stamped columns), `stamper` (the Ray actor), `commit` (the output
folder and its manifests), `pipeline` (the driver).
"""

from jobs.embed.config import EmbedConfig
from jobs.embed.pipeline import run_embed
from jobs.embed.results import FileResult, Summary
from jobs.embed.stamper import MODEL_OUTPUTS

__all__ = ["MODEL_OUTPUTS", "EmbedConfig", "FileResult", "Summary", "run_embed"]
