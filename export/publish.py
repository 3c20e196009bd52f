"""Checkpoint -> parity-checked ONNX -> new versions in the Triton model repository.

The one path from a trained model to served knowledge, used by `gem export`, `gem up`
and the side trainer: nothing is published unless both graphs pass the checker, the
TensorRT op walk and the parity check against PyTorch, on random batches (edge shapes:
one row, one event, empty sequences) and, when given, on real logged rows.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.contract import ADAPTER_INPUTS, ADAPTER_MODEL, FM_MODEL
from export.onnx_export import (
    FP16_PARITY_TOLERANCE,
    Parity,
    check_adapter_parity,
    check_fm_parity,
    export_adapter,
    export_fm,
)
from export.repository import ModelRepository, Published, RepositoryError
from export.triton_config import ServingConfig
from model.adapter import StudentAdapter
from model.checkpoint import Checkpoint
from model.data.reader import read_batch, resolve_paths
from model.examples import random_batch, random_user_batch
from model.gem import GEM
from model.outputs import LOGITS

log = logging.getLogger(__name__)

# (rows, sequence length) of the random parity batches: the edges and a typical call.
RANDOM_SHAPES = ((1, 1), (7, 3), (64, 32), (256, 128))


@dataclass(frozen=True)
class ExportConfig:
    repository: Path
    # Logged rows (file, folder or glob; the last file is used) for the parity check.
    data: Path | None = None
    parity_rows: int = 512
    # Versions kept on disk per model after publishing.
    keep_versions: int = 3
    # Also publish a half-precision FM graph (model.fp16.onnx) for a TensorRT FP16 plan.
    fp16: bool = False
    serving: ServingConfig = field(default_factory=ServingConfig)
    # Model name -> what its new version is exported from (ModelRepository.source).
    sources: dict[str, str] = field(default_factory=dict)
    # Where the ONNX files are exported before publishing (default: the system's temp folder).
    work_dir: Path | None = None


@dataclass(frozen=True)
class ExportReport:
    fm: Published
    adapter: Published
    fm_parity: Parity
    adapter_parity: Parity
    seconds: float
    fp16_parity: Parity | None = None


def parity_batches(ckpt: Checkpoint, data: Path | None, rows: int) -> list[dict[str, np.ndarray]]:
    schema, seq_len = ckpt.schema, ckpt.config.seq_len
    batches = [random_batch(schema, b, min(length, seq_len), seed=b) for b, length in RANDOM_SHAPES]
    if ckpt.config.user_indexed:
        # The serving shapes of a user-indexed graph: one user, many candidates; several users.
        batches += [random_user_batch(schema, 1, 256, min(128, seq_len)), random_user_batch(schema, 5, 64, 32)]
    if data is not None:
        real = read_batch(resolve_paths(data)[-1], schema, max_seq_len=seq_len, labels=False)
        batches.append({k: v[:rows] for k, v in real.items()})
    return batches


def _fm_logits(model: GEM, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        tensors = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in batch.items()}
        return model(tensors)[LOGITS].numpy()


def export_checkpoint(
    ckpt: Checkpoint, cfg: ExportConfig, on_stage: Callable[[str], None] = lambda _: None
) -> ExportReport:
    """Exports the FM and the adapter, checks both, publishes both, prunes old versions."""
    start = time.perf_counter()
    repo = ModelRepository(cfg.repository, cfg.serving)
    with tempfile.TemporaryDirectory(prefix="gem-export-", dir=cfg.work_dir) as tmp:
        fm_path, adapter_path = Path(tmp) / "gem_fm.onnx", Path(tmp) / "student_adapter.onnx"
        on_stage("exporting the FM to ONNX")
        export_fm(ckpt.model, ckpt.schema, fm_path)
        on_stage("exporting the Student Adapter to ONNX")
        export_adapter(ckpt.adapter, adapter_path)
        on_stage("checking parity with PyTorch")
        batches = parity_batches(ckpt, cfg.data, cfg.parity_rows)
        fm_parity = check_fm_parity(ckpt.model, fm_path, batches)
        logits, surface = ADAPTER_INPUTS
        with_logits = [{logits: _fm_logits(ckpt.model, b), surface: b[surface]} for b in batches]
        adapter_parity = check_adapter_parity(ckpt.adapter, adapter_path, with_logits)
        fp16_path, fp16_parity = None, None
        if cfg.fp16:
            on_stage("exporting the FM in half precision")
            fp16_path = Path(tmp) / "gem_fm.fp16.onnx"
            export_fm(ckpt.model, ckpt.schema, fp16_path, fp16=True)
            fp16_parity = check_fm_parity(ckpt.model, fp16_path, batches, FP16_PARITY_TOLERANCE)
        on_stage("publishing to the model repository")
        fm = repo.publish(FM_MODEL, fm_path, fp16_path, cfg.sources.get(FM_MODEL))
        adapter = repo.publish(ADAPTER_MODEL, adapter_path, source=cfg.sources.get(ADAPTER_MODEL))
    for model in (FM_MODEL, ADAPTER_MODEL):
        repo.prune(model, cfg.keep_versions)
    report = ExportReport(fm, adapter, fm_parity, adapter_parity, time.perf_counter() - start, fp16_parity)
    log.info(
        "published %s v%d and %s v%d to %s (parity: FM %.1e, adapter %.1e) in %.1fs",
        FM_MODEL, fm.version, ADAPTER_MODEL, adapter.version, cfg.repository,
        fm_parity.worst, adapter_parity.worst, report.seconds,
    )  # fmt: skip
    return report


def adapter_parity_batches(n_tasks: int, n_surfaces: int, fm_logits: np.ndarray | None = None) -> list[dict]:
    """Random FM logits (and the given real ones) with every surface, for the adapter's parity check."""
    logits, surface = ADAPTER_INPUTS
    rng = np.random.default_rng(0)
    batches = [
        {logits: rng.normal(0.0, 3.0, (b, n_tasks)).astype(np.float32), surface: rng.integers(0, n_surfaces, b)}
        for b, _ in RANDOM_SHAPES
    ]
    if fm_logits is not None:
        batches.append({logits: fm_logits.astype(np.float32), surface: rng.integers(0, n_surfaces, len(fm_logits))})
    return batches


def export_adapter_only(
    adapter: StudentAdapter, cfg: ExportConfig, fm_logits: np.ndarray | None = None
) -> tuple[Published, Parity]:
    """Publishes a new Student Adapter version alone (the FM stays as served): the side
    trainer refreshes the adapter when the FM is gated or slow. Same checks as above."""
    repo = ModelRepository(cfg.repository, cfg.serving)
    if repo.latest(FM_MODEL) is None:
        raise RepositoryError(f"{cfg.repository} has no {FM_MODEL} version for the adapter to follow")
    with tempfile.TemporaryDirectory(prefix="gem-export-", dir=cfg.work_dir) as tmp:
        path = Path(tmp) / "student_adapter.onnx"
        export_adapter(adapter, path)
        parity = check_adapter_parity(
            adapter, path, adapter_parity_batches(adapter.n_tasks, adapter.n_surfaces, fm_logits)
        )
        published = repo.publish(ADAPTER_MODEL, path, source=cfg.sources.get(ADAPTER_MODEL))
    repo.prune(ADAPTER_MODEL, cfg.keep_versions)
    log.info("published %s v%d alone (parity %.1e)", ADAPTER_MODEL, published.version, parity.worst)
    return published, parity
