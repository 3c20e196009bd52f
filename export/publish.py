"""A model bundle -> parity-checked ONNX -> new versions in the model repository -> served.

The one path from trained weights to served knowledge: `gem export`, the first start
(`trainer/bootstrap.py`) and the side trainer each call `publish` once. Nothing is
published unless both graphs pass the checker, the TensorRT op walk and the parity
check against PyTorch (`export.parity`); the old versions are pruned to the policy's
count, and, given the servers, the new versions are rolled out on each of them
(`export.rollout`: the FM first, a refused version moved aside).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.onnx_export import export_adapter, export_fm
from export.parity import (
    FP16_PARITY_TOLERANCE,
    Parity,
    adapter_batches_over,
    adapter_parity_batches,
    check_adapter_parity,
    check_fm_parity,
    fm_logits,
    fm_parity_batches,
    logged_rows,
)
from export.repository import ModelRepository, Published, RepositoryError
from export.rollout import Rollout, Servers, roll_out_published
from model.checkpoint import ModelBundle
from model.progress import SILENT, Progress
from model.storage import Place

log = logging.getLogger(__name__)

MODELS = (FM_MODEL, ADAPTER_MODEL)


@dataclass(frozen=True)
class PublishPolicy:
    # Logged rows (file, folder or glob; the last file is used) for the parity check.
    data: Path | Place | None = None
    parity_rows: int = 512
    # Versions kept on disk per model after publishing.
    keep_versions: int = 3
    # Also publish a half-precision FM graph (model.fp16.onnx) for a TensorRT FP16 plan.
    fp16: bool = False
    # False: the adapter alone, to serve with the FM already published (the side trainer
    # refreshes the adapter when the FM is gated or waits for its gate).
    with_fm: bool = True
    # Model name -> what its new version is exported from (ModelRepository.source). A
    # latest version that says the same is kept, not published again (a publish
    # interrupted after its rename, then restarted).
    sources: dict[str, str] = field(default_factory=dict)
    # Where the ONNX files are exported before publishing (default: the system's temp folder).
    work_dir: Path | None = None


@dataclass(frozen=True)
class PublishReport:
    # The versions that hold the bundle now (None: that model was not published).
    fm: Published | None
    adapter: Published
    # None: the version was already there (see PublishPolicy.sources), or no FM was published.
    fm_parity: Parity | None
    adapter_parity: Parity | None
    seconds: float
    fp16_parity: Parity | None = None
    # One per model the servers were asked to load (none without servers).
    rollouts: tuple[Rollout, ...] = ()
    # Why the servers could not be asked (the versions are published, not loaded).
    rollout_error: str | None = None

    @property
    def versions(self) -> dict[str, int | None]:
        return {FM_MODEL: self.fm.version if self.fm else None, ADAPTER_MODEL: self.adapter.version}

    @property
    def missed(self) -> dict[str, str]:
        """The servers a rollout could not reach: address -> why (the first reason)."""
        missed: dict[str, str] = {}
        for r in self.rollouts:
            for address, why in r.missed:
                missed.setdefault(address, why)
        return missed


def publish(
    bundle: ModelBundle,
    repo: ModelRepository,
    policy: PublishPolicy,
    servers: Servers | None = None,
    progress: Progress = SILENT,
) -> PublishReport:
    """Exports, checks and publishes the FM and the adapter (or the adapter alone),
    prunes old versions, and rolls the new ones out on every server given."""
    start = time.perf_counter()
    kept = {model: _published_from(repo, model, policy.sources.get(model)) for model in MODELS}
    fm, fm_parity, fp16_parity, adapter_parity = kept[FM_MODEL], None, None, None
    if policy.with_fm and fm is None:
        fm, adapter, fm_parity, adapter_parity, fp16_parity = _publish_both(bundle, repo, policy, progress)
    else:
        fm = fm if policy.with_fm else None
        kept_adapter = kept[ADAPTER_MODEL]
        if kept_adapter is None:
            adapter, adapter_parity = _publish_adapter(bundle, repo, policy, progress)
        else:
            adapter = kept_adapter
    for model in MODELS:
        repo.prune(model, policy.keep_versions)
    report = PublishReport(fm, adapter, fm_parity, adapter_parity, time.perf_counter() - start, fp16_parity)
    log.info(
        "published %s to %s in %.1fs",
        ", ".join(f"{m} v{v}" for m, v in report.versions.items() if v), repo.root, report.seconds,
    )  # fmt: skip
    if not servers:
        return report
    progress.start("rolling the new versions out")
    try:
        rollouts = asyncio.run(roll_out_published(servers, repo, report.versions, policy.keep_versions))
    except (RuntimeError, OSError) as e:  # unreachable, timed out: the server's error types
        return replace(report, rollout_error=str(e))
    return replace(report, rollouts=tuple(rollouts))


def _published_from(repo: ModelRepository, model: str, source: str | None) -> Published | None:
    """The latest version of `model` when it was exported from `source`."""
    latest = repo.latest(model)
    if source is None or latest is None or repo.source(model, latest) != source:
        return None
    return Published(model, latest, repo.root / model / str(latest))


def _publish_both(
    bundle: ModelBundle, repo: ModelRepository, policy: PublishPolicy, progress: Progress
) -> tuple[Published, Published, Parity, Parity, Parity | None]:
    with tempfile.TemporaryDirectory(prefix="gem-export-", dir=policy.work_dir) as tmp:
        fm_path, adapter_path = Path(tmp) / "gem_fm.onnx", Path(tmp) / "student_adapter.onnx"
        progress.start("exporting the FM to ONNX")
        export_fm(bundle.model, bundle.schema, fm_path)
        progress.start("exporting the Student Adapter to ONNX")
        export_adapter(bundle.adapter, adapter_path)
        progress.start("checking parity with PyTorch")
        batches = fm_parity_batches(bundle.schema, bundle.model, policy.data, policy.parity_rows)
        fm_parity = check_fm_parity(bundle.model, fm_path, batches)
        adapter_parity = check_adapter_parity(bundle.adapter, adapter_path, adapter_batches_over(bundle.model, batches))
        fp16_path, fp16_parity = None, None
        if policy.fp16:
            progress.start("exporting the FM in half precision")
            fp16_path = Path(tmp) / "gem_fm.fp16.onnx"
            export_fm(bundle.model, bundle.schema, fp16_path, fp16=True)
            fp16_parity = check_fm_parity(bundle.model, fp16_path, batches, FP16_PARITY_TOLERANCE)
        progress.start("publishing to the model repository")
        fm = repo.publish(FM_MODEL, fm_path, fp16_path, policy.sources.get(FM_MODEL))
        adapter = repo.publish(ADAPTER_MODEL, adapter_path, source=policy.sources.get(ADAPTER_MODEL))
    log.info(
        "parity of %s v%d and %s v%d: FM %.1e, adapter %.1e",
        FM_MODEL, fm.version, ADAPTER_MODEL, adapter.version, fm_parity.worst, adapter_parity.worst,
    )  # fmt: skip
    return fm, adapter, fm_parity, adapter_parity, fp16_parity


def _publish_adapter(
    bundle: ModelBundle, repo: ModelRepository, policy: PublishPolicy, progress: Progress
) -> tuple[Published, Parity]:
    """A new Student Adapter version alone (the FM stays as served); its parity on random
    FM logits and, given data, on the bundle FM's logits of its rows."""
    if repo.latest(FM_MODEL) is None:
        raise RepositoryError(f"{repo.root} has no {FM_MODEL} version for the adapter to follow")
    real = None
    if policy.data is not None:
        rows = logged_rows(bundle.schema, bundle.config.seq_len, policy.data, policy.parity_rows)
        real = fm_logits(bundle.model, rows)
    adapter = bundle.adapter
    with tempfile.TemporaryDirectory(prefix="gem-export-", dir=policy.work_dir) as tmp:
        path = Path(tmp) / "student_adapter.onnx"
        progress.start("exporting the Student Adapter to ONNX")
        export_adapter(adapter, path)
        progress.start("checking parity with PyTorch")
        parity = check_adapter_parity(adapter, path, adapter_parity_batches(adapter.n_tasks, adapter.n_surfaces, real))
        progress.start("publishing to the model repository")
        published = repo.publish(ADAPTER_MODEL, path, source=policy.sources.get(ADAPTER_MODEL))
    log.info("published %s v%d alone (parity %.1e)", ADAPTER_MODEL, published.version, parity.worst)
    return published, parity
