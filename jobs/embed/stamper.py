"""The actor of the pool: holds one model (in-process ONNX Runtime, or a client of the
Triton server), stamps batches, writes each batch's rows into its file's staging folder
and returns a small receipt per file to the driver."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.embed.commit import write_part
from jobs.embed.config import EmbedConfig
from jobs.embed.outputs import EMBEDDINGS, MODEL_OUTPUTS, split_stamped, stamped_table
from jobs.embed.rows import key_codes, row_problems, servable
from model.data.reader import table_to_batch
from model.examples import zero_batch
from model.features import USER_INDEX, user_input_names
from model.schema import schema_from_yaml
from model.storage import place
from model.user_index import share_users
from serving.backends.base import BackendConfig, Knowledge, make_backend

# Ray Data's column with each row's source file (`include_paths`).
PATH_COLUMN = "path"
# One receipt per file and batch; typed, so that blocks whose receipts name no part
# (all rows refused, say) concatenate with the others.
RECEIPT = pa.schema([
    (PATH_COLUMN, pa.string()), ("rows_out", pa.int64()), ("error_rows", pa.int64()),
    ("parts", pa.list_(pa.string())), ("users", pa.int64()), ("fm_version", pa.int64()),
    ("adapter_version", pa.int64()),
])  # fmt: skip

Infer = Callable[[dict[str, np.ndarray]], Knowledge]


def open_backend(cfg: EmbedConfig, users: tuple[str, ...]) -> tuple[Infer, tuple[str, ...] | None]:
    """The model an actor calls (`make_backend`, on a loop of the actor's own), and the
    FM's user inputs if it takes the user-indexed form (else None)."""
    # The node's cores shared among the pool (actors spread evenly over nodes).
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors)
    # The asyncio Triton client wants its loop current from the moment it is made.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    backend = make_backend(
        BackendConfig(cfg.backend, cfg.triton_url, cfg.repository, timeout_s=120, threads=threads), user_names=users
    )
    fm_users = loop.run_until_complete(backend.fm_user_inputs())
    pin = cfg.fm_version
    return (lambda batch: loop.run_until_complete(backend.infer(batch, MODEL_OUTPUTS, fm_version=pin))), fm_users


class KnowledgeStamper:
    """Called by Ray Data with each batch of logged rows (and their `PATH_COLUMN`)."""

    def __init__(self, cfg: EmbedConfig, schema_yaml: str, staging: str):
        # `staging`: a URL or path, made a Place here (from this node's AWS settings).
        self.schema, self.staging = schema_from_yaml(schema_yaml), place(staging)
        self.group_by = cfg.group_by
        self.infer, self.fm_users = open_backend(cfg, user_input_names(self.schema))
        # Output widths from one all-zero row, for batches in which no row can be served.
        probe = self.infer(zero_batch(self.schema)).outputs
        self.widths = {name: probe[name].shape[1] for name in EMBEDDINGS}

    def _model_batch(self, rows: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The FM's batch of (servable) rows, and the user row each row is encoded by. A
        user-indexed FM gets each user once: by the key column where there is one,
        checked exactly, else by content (`share_users`); it goes pre-indexed."""
        batch = table_to_batch(rows, self.schema, labels=False)
        if self.fm_users is None:
            return batch, np.arange(rows.num_rows)
        keys = key_codes(rows.column(self.group_by)) if self.group_by in rows.column_names else None
        batch = share_users(batch, self.fm_users, keys=keys)
        return batch, batch[USER_INDEX]

    def stamp(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """Keys, knowledge (null on rows that cannot be served) and `error` per row; and per
        row the user row of its batch that encoded it (-1: not served)."""
        problems = row_problems(table, self.schema)
        good = servable(problems)
        rows = table.filter(pa.array(good))
        user_of = np.full(table.num_rows, -1, np.int64)
        knowledge = None
        if rows.num_rows:
            batch, user_rows = self._model_batch(rows)
            user_of[good] = user_rows
            knowledge = self.infer(batch)
        return stamped_table(table, problems, knowledge, self.schema.task_names, self.widths), user_of

    def __call__(self, table: pa.Table) -> pa.Table:
        stamped, user_of = self.stamp(table.drop_columns([PATH_COLUMN]))
        sources = table.column(PATH_COLUMN)
        receipts = []
        # A batch may span files (a handful): one part per file and kind.
        for source in pc.unique(sources).to_pylist():
            here = pc.equal(sources, source)
            rows = stamped.filter(here)
            mine = user_of[here.to_numpy(zero_copy_only=False)]
            served, errors = split_stamped(rows)
            parts = [write_part(self.staging, source, kind, t) for kind, t in (("data", served), ("errors", errors))]
            receipts.append({
                PATH_COLUMN: source, "rows_out": served.num_rows, "error_rows": errors.num_rows,
                "parts": [p for p in parts if p],
                "users": int(np.unique(mine[mine >= 0]).size),
                "fm_version": int(pc.max(served.column("fm_version")).as_py() or 0),
                "adapter_version": int(pc.max(served.column("adapter_version")).as_py() or 0),
            })  # fmt: skip
        return pa.Table.from_pylist(receipts, schema=RECEIPT)
