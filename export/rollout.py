"""Putting a published version into service on a running model server.

The server loads the new version while the old one keeps serving, and switches only
when the new one is ready. If it refuses the new version (corrupt file, wrong
signature), the version is moved aside as rejected, so that no later reload tries it
again, and the version already serving stays. Old versions are pruned only after a
successful switch.

The server is reached through `ModelControl` (serving's TritonClient is one); this
module loads neither torch nor onnx, so a client may import `ModelRefused` from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from export.contract import ADAPTER_MODEL, FM_MODEL

if TYPE_CHECKING:
    from export.repository import ModelRepository

log = logging.getLogger(__name__)


class ModelRefused(RuntimeError):
    """The server would not load a model's versions (`ModelControl.load` raises it)."""


class ModelControl(Protocol):
    """The model-control call of a server in explicit model control."""

    async def load(self, model: str) -> None:
        """Loads the model's versions; the loaded ones serve until the new ones are
        ready. Raises ModelRefused when the server refuses them."""
        ...


# Opens a connection to the server for one rollout (`lambda: TritonClient(url)`): the
# connection belongs to the event loop the rollout runs in.
Connect = Callable[[], AbstractAsyncContextManager[ModelControl]]


@dataclass(frozen=True)
class Rollout:
    model: str
    version: int
    loaded: bool
    # Why the server refused the version, when it did.
    reason: str = ""


async def roll_out(control: ModelControl, repo: ModelRepository, model: str, keep: int) -> Rollout:
    version = repo.latest(model)
    if version is None:
        raise ModelRefused(f"{model}: the repository {repo.root} has no version to load")
    try:
        await control.load(model)
    except ModelRefused as e:
        repo.reject(model, version, str(e))
        # Reloading without the rejected folder re-asserts the serving version (a no-op
        # when it is still loaded, a reload when the failed attempt unloaded it).
        if repo.latest(model) is not None:
            await control.load(model)
        return Rollout(model, version, loaded=False, reason=str(e))
    repo.prune(model, keep)
    log.info("%s version %d is serving", model, version)
    return Rollout(model, version, loaded=True)


async def roll_out_published(
    connect: Connect, repo: ModelRepository, versions: dict[str, int | None], keep: int
) -> list[Rollout]:
    """Has the server load freshly published versions, the FM before the adapter
    (`versions`: model -> the version just published, None: none). An adapter fitted on
    an FM version that the server refused must not serve with the old FM: it is
    rejected too, with that reason. One Rollout per published model."""
    results: list[Rollout] = []
    async with connect() as control:
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
            results.append(await roll_out(control, repo, model, keep))
    return results


async def roll_back(repo: ModelRepository, model: str, to: int, connect: Connect | None = None) -> list[int]:
    """Makes `to` the served version of `model` (ModelRepository.rollback), then has the
    server, when given, reload the model. Returns the versions moved aside."""
    newer = repo.rollback(model, to)
    if connect is not None:
        async with connect() as control:
            await control.load(model)
    return newer
