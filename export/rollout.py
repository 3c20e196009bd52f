"""Putting a published version into service on every running model server.

Each server loads the new version while its old one keeps serving, and switches only
when the new one is ready; the servers load in parallel. If any of them refuses the new
version (corrupt file, wrong signature), the version is moved aside as rejected, so that
no later reload tries it again, and every server reloads the model: those that had
switched go back to the version serving before, so no two servers stay on different
versions. A server that cannot be reached is left out (`Rollout.missed`), the others
switch: in explicit model control a server loads the repository's current versions when
it starts again (`--load-model`), and the next rollout loads them on every server. Old
versions are pruned only after a successful switch.

A server is reached through `ModelControl` (serving's TritonClient is one); this module
loads neither torch nor onnx, so a client may import `ModelRefused` from it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
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
        ready. Raises ModelRefused when the server refuses them, another RuntimeError or
        an OSError when it cannot be reached."""
        ...


# Opens a connection to the server for one rollout (`lambda: TritonClient(url)`): the
# connection belongs to the event loop the rollout runs in.
Connect = Callable[[], AbstractAsyncContextManager[ModelControl]]
# Every server a rollout loads on: its address (for the reports) -> its connection.
Servers = Mapping[str, Connect]


def triton_servers(urls: Sequence[str], timeout_s: float = 30.0) -> dict[str, Connect]:
    """The Tritons at `urls` (gRPC addresses; repeats count once)."""
    if not urls:
        return {}
    # Imported here: serving's client pulls in tritonclient, which a rollout without a
    # server (tests, `gem export` alone) does not need.
    from serving.backends.triton_client import TritonClient

    return {url: functools.partial(TritonClient, url, timeout_s=timeout_s) for url in dict.fromkeys(urls)}


@dataclass(frozen=True)
class Rollout:
    model: str
    version: int
    # True: every server reached serves the version. False: refused (`reason`), or no
    # server could be reached (`reason` empty, all of them in `missed`).
    loaded: bool
    # Why a server refused the version, when one did.
    reason: str = ""
    # The servers that could not be reached: (address, why).
    missed: tuple[tuple[str, str], ...] = ()
    # Seconds from the rollout's start until each server that switched served the version.
    ready_s: tuple[float, ...] = ()

    @property
    def window_s(self) -> float:
        """How long the servers served different versions of the model: from the first
        to the last one switching."""
        return max(self.ready_s) - min(self.ready_s) if self.ready_s else 0.0


@dataclass(frozen=True)
class _Loaded:
    address: str
    # "ready", "refused" or "missed"
    outcome: str
    detail: str = ""
    seconds: float = 0.0


async def _load(address: str, control: ModelControl, model: str, start: float) -> _Loaded:
    try:
        await control.load(model)
    except ModelRefused as e:
        return _Loaded(address, "refused", str(e))
    except (RuntimeError, OSError) as e:  # unreachable, timed out: the server's error types
        log.error("could not reach %s to load %s: %s", address, model, e)
        return _Loaded(address, "missed", str(e))
    return _Loaded(address, "ready", seconds=time.monotonic() - start)


async def _load_all(controls: Mapping[str, ModelControl], model: str) -> list[_Loaded]:
    start = time.monotonic()
    return await asyncio.gather(*(_load(address, c, model, start) for address, c in controls.items()))


async def roll_out_on(controls: Mapping[str, ModelControl], repo: ModelRepository, model: str, keep: int) -> Rollout:
    """Has every server (address -> control) load the latest version of `model`."""
    version = repo.latest(model)
    if version is None:
        raise ModelRefused(f"{model}: the repository {repo.root} has no version to load")
    loads = await _load_all(controls, model)
    missed = {r.address: r.detail for r in loads if r.outcome == "missed"}
    refused = [r for r in loads if r.outcome == "refused"]
    if refused:
        reason = refused[0].detail if len(controls) == 1 else "; ".join(f"{r.address}: {r.detail}" for r in refused)
        repo.reject(model, version, reason)
        # Reloading without the rejected folder re-asserts the serving version (a no-op
        # where it is still loaded, a reload where the new one had switched in or the
        # failed attempt unloaded it).
        if repo.latest(model) is not None:
            reached = {a: c for a, c in controls.items() if a not in missed}
            missed |= {r.address: r.detail for r in await _load_all(reached, model) if r.outcome != "ready"}
        return Rollout(model, version, loaded=False, reason=reason, missed=tuple(missed.items()))
    ready = tuple(r.seconds for r in loads if r.outcome == "ready")
    if not ready:
        return Rollout(model, version, loaded=False, missed=tuple(missed.items()))
    repo.prune(model, keep)
    rollout = Rollout(model, version, loaded=True, missed=tuple(missed.items()), ready_s=ready)
    log.info(
        "%s version %d is serving on %d of %d server(s) (switched within %.2fs)",
        model, version, len(ready), len(controls), rollout.window_s,
    )  # fmt: skip
    return rollout


async def roll_out(control: ModelControl, repo: ModelRepository, model: str, keep: int) -> Rollout:
    """`roll_out_on` one server."""
    return await roll_out_on({"server": control}, repo, model, keep)


async def roll_out_published(
    servers: Servers, repo: ModelRepository, versions: dict[str, int | None], keep: int
) -> list[Rollout]:
    """Has every server load freshly published versions, the FM before the adapter
    (`versions`: model -> the version just published, None: none). An adapter fitted on
    an FM version that a server refused must not serve with the old FM: it is rejected
    too, with that reason. One Rollout per published model."""
    results: list[Rollout] = []
    async with AsyncExitStack() as stack:
        controls = {address: await stack.enter_async_context(connect()) for address, connect in servers.items()}
        for model in (FM_MODEL, ADAPTER_MODEL):
            version = versions.get(model)
            if not version:
                continue
            fm = next((r for r in results if r.model == FM_MODEL), None)
            if model == ADAPTER_MODEL and fm is not None and fm.reason:
                reason = "its FM version was refused by Triton"
                repo.reject(model, version, reason)
                results.append(Rollout(model, version, loaded=False, reason=reason))
                continue
            results.append(await roll_out_on(controls, repo, model, keep))
    return results


async def roll_back(repo: ModelRepository, model: str, to: int, servers: Servers | None = None) -> list[int]:
    """Makes `to` the served version of `model` (ModelRepository.rollback), then has
    every server given reload the model. Returns the versions moved aside."""
    newer = repo.rollback(model, to)
    async with AsyncExitStack() as stack:
        controls = {address: await stack.enter_async_context(connect()) for address, connect in (servers or {}).items()}
        for r in await _load_all(controls, model):
            if r.outcome != "ready":
                raise ModelRefused(f"{r.address} did not reload {model}: {r.detail}")
    return newer
