"""The default backend: the knowledge models on Triton, over one shared gRPC channel
(`serving.backends.triton_client.TritonClient`).

Unpinned calls run the ensemble, whose steps take the latest ready version of each model
(`model_version: -1`: an ensemble cannot pick a step's version per request). A call
pinned to FM version V runs `gem_fm` version V and then `student_adapter` at the version
published for V (the adapter config's `fm_adapters` parameter), each by version, over
the same channel: two Triton requests instead of one, and no ensemble per FM version to
write, load and keep in step with pruning."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from export.contract import (
    ADAPTER_INPUTS,
    ADAPTER_MODEL,
    ADAPTER_OUTPUT,
    ADAPTER_VERSION,
    FM_ADAPTERS_PARAMETER,
    FM_MODEL,
    FM_VERSION,
    parse_pairs,
)
from model.outputs import LOGITS
from serving.backends.base import Backend
from serving.backends.errors import BackendUnavailable, VersionNotLoaded
from serving.backends.triton_client import TritonClient


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, url: str, timeout_s: float = 10.0, user_names: Sequence[str] | None = None):
        """`user_names`: the schema's user inputs (see `TritonClient`)."""
        self.client = TritonClient(url, timeout_s=timeout_s, user_names=user_names)

    async def fm_user_inputs(self) -> tuple[str, ...] | None:
        return await self.client.user_inputs()

    async def loaded(self) -> list[tuple[int, int]]:
        pairs = parse_pairs(await self.client.parameter(ADAPTER_MODEL, FM_ADAPTERS_PARAMETER))
        fms, adapters = await self.client.ready_versions(FM_MODEL), await self.client.ready_versions(ADAPTER_MODEL)
        return [(fm, pairs[fm]) for fm in sorted(fms, reverse=True) if pairs.get(fm) in adapters]

    async def _infer(self, batch, outputs, timeout_s, chunk, fm_version) -> dict[str, np.ndarray]:
        if fm_version is None:
            return await self.client.infer(batch, outputs=outputs, timeout_s=timeout_s, chunk=chunk)
        adapter = parse_pairs(await self.client.parameter(ADAPTER_MODEL, FM_ADAPTERS_PARAMETER)).get(fm_version)
        if adapter is None:
            raise VersionNotLoaded(fm_version, [fm for fm, _ in await self.loaded()])
        fm_outputs = list(dict.fromkeys([*(o for o in outputs if o not in (ADAPTER_OUTPUT, ADAPTER_VERSION)),
                                         LOGITS, FM_VERSION]))  # fmt: skip
        try:
            out = await self.client.infer(
                batch, fm_outputs, version=fm_version, model=FM_MODEL, timeout_s=timeout_s, chunk=chunk
            )
            logits, surface = ADAPTER_INPUTS
            adapted = await self.client.infer(
                {logits: out[LOGITS], surface: batch[surface]},
                (ADAPTER_OUTPUT, ADAPTER_VERSION),
                version=adapter,
                model=ADAPTER_MODEL,
                timeout_s=timeout_s,
                chunk=chunk,
            )
        except BackendUnavailable:
            # Triton says "unknown model" for a version it no longer has: pruned mid-call.
            available = [fm for fm, _ in await self.loaded()]
            if fm_version not in available:
                raise VersionNotLoaded(fm_version, available) from None
            raise
        return {**out, **adapted}

    async def close(self) -> None:
        await self.client.close()
