"""The embedded backend: the repository's latest FM and adapter in ONNX Runtime, in this
process (`gem up --embedded`, the batch job's actors, tests without Triton)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.contract import (
    ADAPTER_INPUTS,
    ADAPTER_MODEL,
    ADAPTER_OUTPUT,
    ADAPTER_VERSION,
    FM_MODEL,
    ONNX_FILENAME,
    latest_version,
)
from model.features import USER_INDEX, USERS_AXIS
from model.outputs import LOGITS
from model.user_index import graph_feeds, indexed_user_names
from serving.backends.base import Backend, Knowledge, row_chunks, rows_of
from serving.backends.errors import BackendTimeout, BackendUnavailable


def published_graphs(repository: Path) -> tuple[Path, Path]:
    """The latest FM and adapter ONNX files of a repository, or a clear error."""
    fm, adapter = latest_version(repository, FM_MODEL), latest_version(repository, ADAPTER_MODEL)
    if fm is None or adapter is None:
        raise BackendUnavailable(f"no published model in {repository}; run `gem export` (or `gem bootstrap`) first")
    return (repository / FM_MODEL / str(fm) / ONNX_FILENAME, repository / ADAPTER_MODEL / str(adapter) / ONNX_FILENAME)


class OnnxBackend(Backend):
    """Inference runs in a worker thread so the event loop keeps taking calls."""

    name = "onnxruntime"

    def __init__(self, repository: Path, threads: int = 0, user_names: Sequence[str] | None = None):
        """`user_names`: the schema's user inputs (`user_input_names`), to expand a
        user-indexed batch for a per-example FM (default: told by their row counts)."""
        self.user_names = None if user_names is None else tuple(user_names)
        fm, adapter = published_graphs(repository)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.fm = ort.InferenceSession(str(fm), options)
        self.adapter = ort.InferenceSession(str(adapter), options)
        self.fm_outputs = [o.name for o in self.fm.get_outputs()]

    async def fm_user_inputs(self) -> tuple[str, ...] | None:
        inputs = self.fm.get_inputs()
        if all(i.name != USER_INDEX for i in inputs):
            return None
        return tuple(i.name for i in inputs if i.shape and i.shape[0] == USERS_AXIS)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A user-indexed FM gets each distinct user once; a user-indexed batch is checked
        # (UserIndexError, naming the input) and expanded for a per-example FM (graph_feeds).
        feeds = graph_feeds(batch, self.fm.get_inputs(), self.user_names)
        out = dict(zip(self.fm_outputs, self.fm.run(self.fm_outputs, feeds), strict=True))
        logits, surface = ADAPTER_INPUTS
        adapted, adapter_version = self.adapter.run(
            [ADAPTER_OUTPUT, ADAPTER_VERSION], {logits: out[LOGITS], surface: feeds[surface]}
        )
        return {**out, ADAPTER_OUTPUT: adapted, ADAPTER_VERSION: adapter_version}

    def _run_chunked(self, batch: dict[str, np.ndarray], chunk: int | None) -> dict[str, np.ndarray]:
        if chunk is None or rows_of(batch) <= chunk:
            return self._run(batch)
        # Pieces in turn: a big call's working memory stays that of one chunk.
        users = indexed_user_names(batch, self.user_names) if USER_INDEX in batch else ()
        parts = [self._run(p) for p in row_chunks(batch, chunk, users)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def run(self, batch: dict[str, np.ndarray], outputs: Sequence[str], chunk: int | None = None) -> Knowledge:
        """Synchronous inference (the batch job's actors and benchmarks call this)."""
        return Knowledge.of(self._run_chunked(batch, chunk), outputs)

    async def _infer(self, batch, outputs, timeout_s, chunk) -> dict[str, np.ndarray]:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._run_chunked, batch, chunk), timeout_s)
        except TimeoutError:
            raise BackendTimeout(f"onnxruntime inference: not done after {timeout_s:.3f}s") from None
