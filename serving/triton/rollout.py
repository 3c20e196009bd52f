"""Putting a published version into service on a running Triton.

Triton loads the new version while the old one keeps serving, and switches only when
the new one is ready. If it refuses the new version (corrupt file, wrong signature),
the version is moved aside as rejected, so that no later reload tries it again, and the
version already serving stays. Old versions are pruned only after a successful switch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.repository import ModelRepository
from serving.backends.errors import ModelLoadError
from serving.backends.triton_client import TritonClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rollout:
    model: str
    version: int
    loaded: bool
    # Why Triton refused the version, when it did.
    reason: str = ""


async def roll_out(client: TritonClient, repo: ModelRepository, model: str, keep: int) -> Rollout:
    version = repo.latest(model)
    if version is None:
        raise ModelLoadError(f"{model}: the repository {repo.root} has no version to load")
    try:
        await client.load(model)
    except ModelLoadError as e:
        repo.reject(model, version, str(e))
        # Reloading without the rejected folder re-asserts the serving version (a no-op
        # when it is still loaded, a reload when the failed attempt unloaded it).
        if repo.latest(model) is not None:
            await client.load(model)
        return Rollout(model, version, loaded=False, reason=str(e))
    repo.prune(model, keep)
    log.info("%s version %d is serving", model, version)
    return Rollout(model, version, loaded=True)


async def roll_out_published(
    url: str, repo: ModelRepository, versions: dict[str, int | None], keep: int, timeout_s: float = 30.0
) -> list[Rollout]:
    """Has the Triton at `url` load freshly published versions, the FM before the
    adapter (`versions`: model -> the version just published, None: none). An adapter
    fitted on an FM version that Triton refused must not serve with the old FM: it is
    rejected too, with that reason. One Rollout per published model."""
    results: list[Rollout] = []
    async with TritonClient(url, timeout_s=timeout_s) as client:
        for model in (FM_MODEL, ADAPTER_MODEL):
            version = versions.get(model)
            if not version:
                continue
            fm = next((r for r in results if r.model == FM_MODEL), None)
            if model == ADAPTER_MODEL and fm is not None and not fm.loaded:
                reason = "its FM version was refused by Triton"
                repo.reject(model, version, reason)
                results.append(Rollout(model, version, loaded=False, reason=reason))
                continue
            results.append(await roll_out(client, repo, model, keep))
    return results


def roll_back(repo: ModelRepository, model: str, to: int, triton_url: str | None = None) -> list[int]:
    """Makes `to` the served version of `model` (ModelRepository.rollback), then has the
    Triton at `triton_url`, when given, reload the model. Returns the versions moved aside."""
    newer = repo.rollback(model, to)
    if triton_url:

        async def reload() -> None:
            async with TritonClient(triton_url, timeout_s=30) as client:
                await client.load(model)

        asyncio.run(reload())
    return newer
