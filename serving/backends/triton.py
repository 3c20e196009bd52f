"""The default backend: the knowledge ensemble on Triton, over one shared gRPC channel
(`serving.backends.triton_client.TritonClient`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.backends.base import Backend
from serving.backends.triton_client import TritonClient


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, url: str, timeout_s: float = 10.0, user_names: Sequence[str] | None = None):
        """`user_names`: the schema's user inputs (see `TritonClient`)."""
        self.client = TritonClient(url, timeout_s=timeout_s, user_names=user_names)

    async def fm_user_inputs(self) -> tuple[str, ...] | None:
        return await self.client.user_inputs()

    async def _infer(self, batch, outputs, timeout_s, chunk) -> dict[str, np.ndarray]:
        return await self.client.infer(batch, outputs=outputs, timeout_s=timeout_s, chunk=chunk)

    async def close(self) -> None:
        await self.client.close()
