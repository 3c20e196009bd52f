"""Where the front end gets knowledge from: Triton (default) or in-process ONNX Runtime.

Both take a merged columnar batch and return the FM outputs, the adapted logits and the
versions that produced them. The front end depends only on `Backend`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from export.contract import (
    ADAPTER_INPUTS,
    ADAPTER_MODEL,
    ADAPTER_OUTPUT,
    ADAPTER_VERSION,
    FM_MODEL,
    FM_VERSION,
    ONNX_FILENAME,
    latest_version,
)
from model.features import USER_INDEX, USERS_AXIS
from model.outputs import LOGITS
from model.user_index import graph_feeds
from serving.triton.client import BackendTimeout, BackendUnavailable, TritonClient


@dataclass(frozen=True)
class Knowledge:
    outputs: dict[str, np.ndarray]
    fm_version: int
    adapter_version: int


class Backend(Protocol):
    name: str

    async def infer(
        self,
        batch: dict[str, np.ndarray],
        outputs: Sequence[str],
        timeout_s: float | None = None,
        chunk: int | None = None,
    ) -> Knowledge:
        """`outputs` are model output names (`logits`, `adapted_logits`, ...); past
        `timeout_s`, `BackendTimeout`; `chunk`: most rows per backend request."""
        ...

    async def close(self) -> None: ...


def _versions(out: dict[str, np.ndarray]) -> tuple[int, int]:
    return int(out.pop(FM_VERSION)[0, 0]), int(out.pop(ADAPTER_VERSION)[0, 0])


class TritonBackend:
    name = "triton"

    def __init__(self, url: str, timeout_s: float = 10.0, user_names: Sequence[str] | None = None):
        """`user_names`: the schema's user inputs (see `TritonClient`)."""
        self.client = TritonClient(url, timeout_s=timeout_s, user_names=user_names)

    async def fm_user_inputs(self) -> tuple[str, ...] | None:
        """The served model's user inputs if it takes the user-indexed form, else None."""
        return await self.client.user_inputs()

    async def infer(
        self,
        batch: dict[str, np.ndarray],
        outputs: Sequence[str],
        timeout_s: float | None = None,
        chunk: int | None = None,
    ) -> Knowledge:
        out = await self.client.infer(batch, outputs=outputs, timeout_s=timeout_s, chunk=chunk)
        fm, adapter = _versions(out)
        return Knowledge(out, fm, adapter)

    async def close(self) -> None:
        await self.client.close()


def published_graphs(repository: Path) -> tuple[Path, Path]:
    """The latest FM and adapter ONNX files of a repository, or a clear error."""
    fm, adapter = latest_version(repository, FM_MODEL), latest_version(repository, ADAPTER_MODEL)
    if fm is None or adapter is None:
        raise BackendUnavailable(f"no published model in {repository}; run `gem export` (or `gem bootstrap`) first")
    return (repository / FM_MODEL / str(fm) / ONNX_FILENAME, repository / ADAPTER_MODEL / str(adapter) / ONNX_FILENAME)


class OnnxBackend:
    """The embedded mode: the repository's latest FM and adapter in ONNX Runtime, in this
    process. Inference runs in a worker thread so the event loop keeps taking calls."""

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

    def fm_user_inputs(self) -> tuple[str, ...] | None:
        """The FM's user inputs (those on its users axis) if it takes the user-indexed
        form, else None."""
        inputs = self.fm.get_inputs()
        if all(i.name != USER_INDEX for i in inputs):
            return None
        return tuple(i.name for i in inputs if i.shape and i.shape[0] == USERS_AXIS)

    def run(self, batch: dict[str, np.ndarray], outputs: Sequence[str]) -> Knowledge:
        """Synchronous inference (the batch job calls this from its actors)."""
        # A user-indexed FM gets each distinct user once; a user-indexed batch is checked
        # (UserIndexError, naming the input) and expanded for a per-example FM (graph_feeds).
        feeds = graph_feeds(batch, self.fm.get_inputs(), self.user_names)
        out = dict(zip(self.fm_outputs, self.fm.run(self.fm_outputs, feeds), strict=True))
        logits, surface = ADAPTER_INPUTS
        adapted, adapter_version = self.adapter.run(
            [ADAPTER_OUTPUT, ADAPTER_VERSION], {logits: out[LOGITS], surface: feeds[surface]}
        )
        out.update({ADAPTER_OUTPUT: adapted, ADAPTER_VERSION: adapter_version})
        fm, adapter = _versions(out)
        return Knowledge({k: out[k] for k in outputs}, fm, adapter)

    async def infer(
        self,
        batch: dict[str, np.ndarray],
        outputs: Sequence[str],
        timeout_s: float | None = None,
        chunk: int | None = None,
    ) -> Knowledge:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.run, batch, outputs), timeout_s)
        except TimeoutError:
            raise BackendTimeout(f"onnxruntime inference: not done after {timeout_s:.3f}s") from None

    async def close(self) -> None:
        return None
