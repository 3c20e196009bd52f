"""The backend interface: a merged columnar batch in, the FM outputs, the adapted logits
and the versions that produced them out. The front end and the batch job depend only on
`Backend`; `make_backend` is the one place a configuration picks the implementation."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from export.contract import ADAPTER_VERSION, FM_VERSION, LOADED_VERSIONS, TRITON_GRPC_URL
from model.features import USER_INDEX
from model.user_index import candidate_rows

BackendKind = Literal["triton", "onnxruntime"]
BACKENDS: tuple[BackendKind, ...] = ("triton", "onnxruntime")


@dataclass(frozen=True)
class Knowledge:
    outputs: dict[str, np.ndarray]
    fm_version: int
    adapter_version: int

    @classmethod
    def of(cls, out: dict[str, np.ndarray], outputs: Sequence[str]) -> Knowledge:
        """The `outputs` of a model reply that also carries the version tensors."""
        return cls({k: out[k] for k in outputs}, int(out[FM_VERSION][0, 0]), int(out[ADAPTER_VERSION][0, 0]))


@dataclass(frozen=True)
class BackendConfig:
    kind: BackendKind = "triton"
    triton_url: str = TRITON_GRPC_URL
    # For the embedded backend: the repository whose latest versions it loads.
    repository: Path = Path("model_repo")
    # The longest one backend call may take.
    timeout_s: float = 10.0
    # ONNX Runtime intra-op threads (0: its default).
    threads: int = 0
    # FM versions the embedded backend keeps loaded for pinned calls.
    loaded_versions: int = LOADED_VERSIONS
    # How far below the event loop the embedded backend's inference threads run
    # (serving/backends/priority.py; 0: level with it).
    nice: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.kind!r}")


class Backend(abc.ABC):
    name: ClassVar[str]

    async def infer(
        self,
        batch: dict[str, np.ndarray],
        outputs: Sequence[str],
        timeout_s: float | None = None,
        chunk: int | None = None,
        fm_version: int | None = None,
    ) -> Knowledge:
        """`outputs` are model output names (`logits`, `adapted_logits`, ...); past
        `timeout_s`, `BackendTimeout`; `chunk`: most rows per backend request;
        `fm_version`: the FM version to run with its paired adapter (None: the latest),
        `VersionNotLoaded` when it is not loaded."""
        return Knowledge.of(await self._infer(batch, tuple(outputs), timeout_s, chunk, fm_version), outputs)

    @abc.abstractmethod
    async def _infer(self, batch, outputs, timeout_s, chunk, fm_version) -> dict[str, np.ndarray]:
        """The model's reply: the asked outputs and both version tensors."""

    @abc.abstractmethod
    async def loaded(self) -> list[tuple[int, int]]:
        """(FM version, the adapter it runs with) of every version a call may pin,
        newest first."""

    @abc.abstractmethod
    async def fm_user_inputs(self) -> tuple[str, ...] | None:
        """The served FM's user inputs if it takes the user-indexed form, else None."""

    async def close(self) -> None:
        return None


def rows_of(batch: dict[str, np.ndarray]) -> int:
    """Candidates in a batch (per example or user-indexed)."""
    return len(batch[USER_INDEX]) if USER_INDEX in batch else len(next(iter(batch.values())))


def row_chunks(batch: dict[str, np.ndarray], size: int, user_inputs: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """The batch in pieces of at most `size` candidates; a user-indexed batch's pieces
    carry only the users they index (`user_inputs`: the inputs on the users axis)."""
    for start in range(0, rows_of(batch), size):
        if USER_INDEX in batch:
            yield candidate_rows(batch, user_inputs, start, start + size)
        else:
            yield {k: v[start : start + size] for k, v in batch.items()}


def make_backend(cfg: BackendConfig, user_names: Sequence[str] | None = None) -> Backend:
    """The backend `cfg` names. `user_names`: the schema's user inputs, to expand a
    user-indexed batch for a per-example FM (default: told by their row counts)."""
    if cfg.kind == "triton":
        from serving.backends.triton import TritonBackend

        return TritonBackend(cfg.triton_url, cfg.timeout_s, user_names=user_names)
    from serving.backends.onnx import OnnxBackend

    return OnnxBackend(
        cfg.repository, cfg.threads, user_names=user_names, loaded_versions=cfg.loaded_versions, nice=cfg.nice
    )
