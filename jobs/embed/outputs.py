"""A batch's stamped columns: the rows' keys, GEM's knowledge per task (labels and
adapted labels), the embeddings, the versions that made them, and the reason a row
could not be served (null where it was). Rows that cannot be served keep their place
with nulls, so the stamped table lines up with the batch row for row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from export.contract import ADAPTER_OUTPUT
from jobs.embed.rows import servable
from model.outputs import EMBEDDING, LOGITS, USER_EMBEDDING, sigmoid
from serving.backends.base import Knowledge

# The columns of a logged row that its stamped row keeps (the first is required).
KEY_COLUMNS = ("example_id", "event_ts", "surface")
# What the job asks of the model.
MODEL_OUTPUTS = (LOGITS, ADAPTER_OUTPUT, EMBEDDING, USER_EMBEDDING)
# The embeddings the job writes, one fixed-size list column each.
EMBEDDINGS = (EMBEDDING, USER_EMBEDDING)


def stamped_table(
    table: pa.Table,
    problems: pa.Array,
    knowledge: Knowledge | None,
    task_names: tuple[str, ...],
    widths: dict[str, int],
) -> pa.Table:
    """The stamped rows of `table`: `problems` (`rows.row_problems`) says which rows were
    served; `knowledge` is the model's answer for those rows, in order (None when none
    was); `widths` the embeddings' widths (from a probe, for batches with no row served)."""
    good = servable(problems)
    n, missing = table.num_rows, ~good
    columns: dict[str, pa.Array] = {k: table.column(k) for k in KEY_COLUMNS if k in table.column_names}
    for t, task in enumerate(task_names):
        for prefix, output in (("knowledge", LOGITS), ("adapted", ADAPTER_OUTPUT)):
            values = np.zeros(n, np.float32)
            if knowledge is not None:
                values[good] = sigmoid(knowledge.outputs[output][:, t])
            columns[f"{prefix}_{task}"] = pa.array(values, mask=missing)
    for name, width in widths.items():
        values = np.zeros((n, width), np.float32)
        if knowledge is not None:
            values[good] = knowledge.outputs[name]
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width, mask=pa.array(missing))
    versions = (knowledge.fm_version, knowledge.adapter_version) if knowledge is not None else (0, 0)
    for name, version in zip(("fm_version", "adapter_version"), versions, strict=True):
        columns[name] = pa.array(np.full(n, version, np.int64), mask=missing)
    columns["error"] = problems
    return pa.table(columns)


def split_stamped(stamped: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The rows served (the knowledge written, without `error`) and the rows refused (their
    keys and `error`)."""
    bad = pc.is_valid(stamped.column("error"))
    served = stamped.filter(pc.invert(bad)).drop_columns(["error"])
    errors = stamped.filter(bad).select([c for c in (*KEY_COLUMNS, "error") if c in stamped.column_names])
    return served, errors
