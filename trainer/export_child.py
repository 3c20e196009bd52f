"""The side trainer's publishes, each in a fresh child process.

torch 2.13's ONNX exporter (dynamo) keeps ~6.5 MB alive per export that no cache
clearing frees (a `ShapeEnv` and its fake-tensor dispatch cache survive each export),
and loading it costs a process ~290 MB once. A side trainer that exports at every cycle
for weeks would carry both; a child per publish takes them with it when it exits, at the
cost of its start (a few seconds, against a cycle of minutes).

The child gets the bundle as `torch.save` bytes, not as torch.multiprocessing's shared
tensors, which would move the trainer's own weights into /dev/shm. It runs
`export.publish` (export, parity, publish, prune, rollout) and sends the report back; its
errors arrive here as the same exceptions. It dies with the trainer (PR_SET_PDEATHSIG):
a publish must never go on after the trainer that asked for it, or it would race the
restarted trainer's recovery publish in the repository.
"""

from __future__ import annotations

import ctypes
import io
import logging
import multiprocessing
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from export.publish import PublishPolicy, PublishReport, publish
from export.repository import ModelRepository
from export.rollout import triton_servers
from model.checkpoint import ModelBundle
from serving.local.logs import JSONFormatter, log_format
from trainer.memory import libc

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ExportProcessDied(RuntimeError):
    """The child exited before it answered (killed, out of memory)."""


def publish_in_child(
    bundle: ModelBundle, repo: ModelRepository, policy: PublishPolicy, triton_urls: Sequence[str]
) -> PublishReport:
    """`export.publish(bundle, repo, policy, the Tritons at triton_urls)` in a child
    process started for this publish and gone when it returns."""
    saved = io.BytesIO()
    torch.save(bundle, saved)
    level = logging.getLogger().getEffectiveLevel()
    context = multiprocessing.get_context("spawn")  # nothing of the trainer's state (threads, gloo) carried over
    with ProcessPoolExecutor(1, mp_context=context, initializer=_start, initargs=(os.getpid(), level)) as pool:
        try:
            return pool.submit(_publish_saved, saved.getvalue(), repo, policy, tuple(triton_urls)).result()
        except BrokenProcessPool:
            raise ExportProcessDied(
                "the export process exited before it finished (killed, or out of memory); "
                "the versions it had not renamed into the repository are not served"
            ) from None


def _start(parent: int, level: int) -> None:
    """The child's first step: die with the trainer, log as it does."""
    if libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the trainer died before the line above: nobody to publish for
        os._exit(1)
    handler = logging.StreamHandler()  # stderr, shared with the trainer
    text = logging.Formatter("%(asctime)s [export] %(message)s")
    handler.setFormatter(JSONFormatter() if log_format() == "json" else text)
    logging.basicConfig(level=level, handlers=[handler])
    from trainer.loop import quiet  # here: trainer.loop imports this module

    quiet(level <= logging.DEBUG)


def _publish_saved(saved: bytes, repo: ModelRepository, policy: PublishPolicy, urls: tuple[str, ...]) -> PublishReport:
    bundle = torch.load(io.BytesIO(saved), weights_only=False)  # our own bytes, made a moment ago
    return publish(bundle, repo, policy, triton_servers(urls))
