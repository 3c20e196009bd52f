"""The embedded backend: the repository's newest FM versions, each with the adapter
published for it (`export.contract.paired_adapter`), in ONNX Runtime, in this process
(`gem up --embedded`, the batch job's actors, tests without Triton). Unpinned calls run
the newest pair; a call may pin any loaded FM version."""

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
    LOADED_VERSIONS,
    ONNX_FILENAME,
    loaded_pairs,
)
from model.features import USER_INDEX, USERS_AXIS
from model.outputs import LOGITS
from model.user_index import graph_feeds, indexed_user_names
from serving.backends.base import Backend, Knowledge, row_chunks, rows_of
from serving.backends.errors import BackendTimeout, BackendUnavailable, VersionNotLoaded
from serving.backends.priority import inference_pool


def published_graphs(repository: Path, count: int = 1) -> list[tuple[int, int]]:
    """(FM version, its adapter) of the newest `count` FM versions, newest first, or a
    clear error when the repository has none."""
    pairs = loaded_pairs(repository, count)
    if not pairs:
        raise BackendUnavailable(f"no published model in {repository}; run `gem export` (or `gem bootstrap`) first")
    return pairs


class _Pair:
    """One FM version's sessions: the FM and the adapter published for it."""

    def __init__(self, repository: Path, fm: int, adapter: int, options: ort.SessionOptions):
        self.adapter_version = adapter
        self.fm = ort.InferenceSession(str(repository / FM_MODEL / str(fm) / ONNX_FILENAME), options)
        self.adapter = ort.InferenceSession(str(repository / ADAPTER_MODEL / str(adapter) / ONNX_FILENAME), options)
        self.fm_outputs = [o.name for o in self.fm.get_outputs()]


class OnnxBackend(Backend):
    """Inference runs in worker threads so the event loop keeps taking calls; with
    `nice`, those threads and ONNX Runtime's own run that many steps below the loop
    (serving/backends/priority.py), so that on saturated cores the loop runs first."""

    name = "onnxruntime"

    def __init__(
        self,
        repository: Path,
        threads: int = 0,
        user_names: Sequence[str] | None = None,
        loaded_versions: int = LOADED_VERSIONS,
        nice: int = 0,
    ):
        """`user_names`: the schema's user inputs (`user_input_names`), to expand a
        user-indexed batch for a per-example FM (default: told by their row counts).
        `loaded_versions`: how many of the newest FM versions a call may pin.
        `nice`: how far below the creating thread inference runs (0: level with it)."""
        self.user_names = None if user_names is None else tuple(user_names)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        pairs = published_graphs(repository, loaded_versions)
        self._pool = inference_pool(nice)
        # Made on the pool, so that the sessions' intra-op threads inherit its priority.
        self.pairs = self._pool.submit(
            lambda: {fm: _Pair(repository, fm, adapter, options) for fm, adapter in pairs}
        ).result()
        self.latest = max(self.pairs)

    def _pair(self, fm_version: int | None) -> _Pair:
        if fm_version is None:
            return self.pairs[self.latest]
        if fm_version not in self.pairs:
            raise VersionNotLoaded(fm_version, sorted(self.pairs, reverse=True))
        return self.pairs[fm_version]

    async def loaded(self) -> list[tuple[int, int]]:
        return [(fm, self.pairs[fm].adapter_version) for fm in sorted(self.pairs, reverse=True)]

    async def fm_user_inputs(self) -> tuple[str, ...] | None:
        inputs = self.pairs[self.latest].fm.get_inputs()
        if all(i.name != USER_INDEX for i in inputs):
            return None
        return tuple(i.name for i in inputs if i.shape and i.shape[0] == USERS_AXIS)

    def _run(self, batch: dict[str, np.ndarray], pair: _Pair) -> dict[str, np.ndarray]:
        # A user-indexed FM gets each distinct user once; a user-indexed batch is checked
        # (UserIndexError, naming the input) and expanded for a per-example FM (graph_feeds).
        feeds = graph_feeds(batch, pair.fm.get_inputs(), self.user_names)
        out = dict(zip(pair.fm_outputs, pair.fm.run(pair.fm_outputs, feeds), strict=True))
        logits, surface = ADAPTER_INPUTS
        adapted, adapter_version = pair.adapter.run(
            [ADAPTER_OUTPUT, ADAPTER_VERSION], {logits: out[LOGITS], surface: feeds[surface]}
        )
        return {**out, ADAPTER_OUTPUT: adapted, ADAPTER_VERSION: adapter_version}

    def _run_chunked(
        self, batch: dict[str, np.ndarray], chunk: int | None, fm_version: int | None
    ) -> dict[str, np.ndarray]:
        pair = self._pair(fm_version)
        if chunk is None or rows_of(batch) <= chunk:
            return self._run(batch, pair)
        # Pieces in turn: a big call's working memory stays that of one chunk.
        users = indexed_user_names(batch, self.user_names) if USER_INDEX in batch else ()
        parts = [self._run(p, pair) for p in row_chunks(batch, chunk, users)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def run(
        self,
        batch: dict[str, np.ndarray],
        outputs: Sequence[str],
        chunk: int | None = None,
        fm_version: int | None = None,
    ) -> Knowledge:
        """Synchronous inference (the batch job's actors and benchmarks call this)."""
        return Knowledge.of(self._run_chunked(batch, chunk, fm_version), outputs)

    async def _infer(self, batch, outputs, timeout_s, chunk, fm_version) -> dict[str, np.ndarray]:
        try:
            work = asyncio.get_running_loop().run_in_executor(self._pool, self._run_chunked, batch, chunk, fm_version)
            return await asyncio.wait_for(work, timeout_s)
        except TimeoutError:
            raise BackendTimeout(f"onnxruntime inference: not done after {timeout_s:.3f}s") from None

    async def close(self) -> None:
        # A call still running finishes in its thread; nothing new is taken.
        self._pool.shutdown(wait=False)
