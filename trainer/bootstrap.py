"""The first model: what `gem up` and the compose `bootstrap` service run before serving.

A model repository with no published model gets one: the checkpoint is trained (the
`small` preset, on synthetic data made first when the data folder has none) unless it
exists, then exported. A repository that already has a model is left alone, so a
container started on it never spends minutes training; `gem up` also trains a missing
checkpoint then (`train_when_published`), so that `gem export` has one to work from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from export.contract import FM_MODEL, latest_version
from model.progress import SILENT, Progress
from model.schema import DEFAULT_SCHEMA_PATH

if TYPE_CHECKING:  # the export stack (torch, onnx) loads only when something is published
    from export.publish import PublishReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapConfig:
    checkpoint: Path
    data: Path
    repository: Path
    train_when_published: bool = False
    preset: str = "small"
    # GEM only: serving never uses the baselines (`gem train --baselines` trains them).
    baselines: bool = False
    keep_versions: int = 3
    schema_path: Path = DEFAULT_SCHEMA_PATH


@dataclass
class BootstrapResult:
    # The training metrics, when a model was trained.
    metrics: dict | None = None
    # The export report (parity, versions), when one was published.
    export: PublishReport | None = None


def bootstrap(cfg: BootstrapConfig, progress: Progress = SILENT) -> BootstrapResult:
    """`progress`: the rows synthesized, each model trained, the export's stages."""
    result = BootstrapResult()
    published = latest_version(cfg.repository, FM_MODEL) is not None
    if published and not cfg.train_when_published:
        log.info("model repository %s already has a published model", cfg.repository)
        return result
    if not (cfg.checkpoint / "manifest.json").exists():
        log.info("no checkpoint at %s: training the %s model on synthetic data first", cfg.checkpoint, cfg.preset)
        result.metrics = _train(cfg, progress)
    if not published:
        log.info("model repository %s is empty: exporting %s", cfg.repository, cfg.checkpoint)
        from export.publish import PublishPolicy, publish
        from export.repository import ModelRepository
        from model.checkpoint import load_checkpoint

        data = cfg.data if cfg.data.exists() else None
        policy = PublishPolicy(data=data, keep_versions=cfg.keep_versions)
        result.export = publish(
            load_checkpoint(cfg.checkpoint), ModelRepository(cfg.repository), policy, progress=progress
        )
    return result


def _train(cfg: BootstrapConfig, progress: Progress) -> dict:
    from model.data.synth import SynthConfig, write_shards
    from model.schema import load_schema
    from trainer.train import TrainConfig, train

    if not any(cfg.data.glob("*.parquet")):
        write_shards(SynthConfig(), load_schema(cfg.schema_path), cfg.data, progress=progress)
    train_cfg = TrainConfig(
        data=cfg.data, out=cfg.checkpoint, preset=cfg.preset, baselines=cfg.baselines, schema_path=cfg.schema_path
    )
    return train(train_cfg, progress=progress).metrics
