"""The side trainer's publish stage (rank 0): a commit put into service.

The committed checkpoint's FM and adapter (or the adapter alone, when the FM was
refused or waits for its gate) go through `export.publish` (parity, publish, prune,
Triton's load) in a child process of their own (trainer/export_child.py: the exporter
leaks), then the `publish` ledger line. A version already published from the
checkpoint (a publish interrupted after its rename) is kept, not published again. A
failed export or a refused load leaves the served versions as they were, logged and
counted. The versions go to every Triton of --triton-url; one that cannot be reached is
logged, counted and named in the ledger line, and loads them when it starts again
(explicit model control loads the repository's current versions at start) or at the
next publish. Unreachable is not refused: the versions are published (in the
repository, and in the ledger line) even when no Triton could be reached.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.onnx_export import ExportError
from export.publish import MODELS, PublishPolicy, PublishReport
from export.repository import ModelRepository, RepositoryError, checkpoint_sources
from model.checkpoint import ModelBundle
from model.data.reader import DataError
from model.storage import Place, exists, place
from trainer.config import TrainerConfig
from trainer.export_child import publish_in_child
from trainer.ledger import Committed, Ledger, PublishLine
from trainer.prometheus import TrainerMetrics

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, cfg: TrainerConfig, repo: ModelRepository, ledger: Ledger, metrics: TrainerMetrics):
        self.cfg, self.repo, self.ledger, self.metrics = cfg, repo, ledger, metrics

    def publish(
        self,
        committed: Committed,
        checkpoint: Path | None,
        bundle: ModelBundle,
        with_fm: bool,
        eval_path: Path | Place | None,
    ) -> dict[str, int | None]:
        """Publishes `bundle`, committed as `checkpoint`; returns the versions published
        (None: not published, or refused by a Triton)."""
        start = time.perf_counter()
        log.info(
            "publishing %s from checkpoint %s", f"{FM_MODEL} and {ADAPTER_MODEL}" if with_fm else ADAPTER_MODEL,
            committed.checkpoint if committed.checkpoint is not None else "?",
        )  # fmt: skip
        if eval_path is not None and not exists(place(eval_path)):
            eval_path = None
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        policy = PublishPolicy(
            data=eval_path, keep_versions=self.cfg.keep, with_fm=with_fm,
            sources=checkpoint_sources(checkpoint) if checkpoint else {}, work_dir=self.cfg.work_dir,
        )  # fmt: skip
        error = None
        versions: dict[str, int | None] = dict.fromkeys(MODELS)
        missed: dict[str, str] = {}
        try:
            report = publish_in_child(bundle, self.repo, policy, self.cfg.triton_urls)
        except (ExportError, RepositoryError, DataError, OSError, RuntimeError, ValueError) as e:
            error = f"export failed: {e}"
            self.metrics.failures.labels("export").inc()
            log.error("%s; the served versions stay", error)
        else:
            versions, missed = self._published(report), report.missed
        self._record_publish(PublishLine(committed.cycle, committed.checkpoint, error, versions, missed))
        text = ", ".join(f"{k} v{v}" for k, v in versions.items() if v) or "nothing"
        pending = f", not loaded yet on {', '.join(missed)}" if missed and any(versions.values()) else ""
        log.info("published %s%s (%.1fs)", text, pending, time.perf_counter() - start)
        return versions

    # Its own step: the fault-injection tests kill the trainer just before it.
    def _record_publish(self, line: PublishLine) -> None:
        self.ledger.append(line.line())
        now = time.time()
        for model, version in line.versions.items():
            if version:
                self.metrics.serving_version.labels(model).set(version)
                self.metrics.last_publish.labels(model).set(now)

    def _published(self, report: PublishReport) -> dict[str, int | None]:
        """The published versions, a version a Triton refused (moved aside, the old one
        keeps serving everywhere) as None. A version no Triton could be reached for is
        published: each Triton loads it when it starts again or at the next publish."""
        if report.rollout_error is not None:
            self.metrics.failures.labels("load").inc()
            log.error("could not reach Triton: %s (published, not loaded)", report.rollout_error)
            return report.versions
        for address, why in report.missed.items():
            self.metrics.failures.labels("load").inc()
            log.error("could not reach Triton at %s: %s; it loads the new versions when it starts again, "
                      "or at the next publish", address, why)  # fmt: skip
        published = report.versions
        for r in report.rollouts:
            if r.reason:
                self.metrics.failures.labels("load").inc()
                log.error("Triton refused %s v%d: %s; the served version stays", r.model, r.version, r.reason)
                published[r.model] = None
        return published
