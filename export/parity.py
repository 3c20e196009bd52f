"""Parity of an exported graph with the PyTorch module it came from.

ONNX Runtime and PyTorch run the same batches and must agree within a tolerance, or
the graph is not published: random batches at the edge shapes (one row, one event,
empty sequences), the user-indexed shapes of a `shared_user` FM and, when given, real
logged rows; the adapter also on the FM's logits of those batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from export.contract import ADAPTER_INPUTS, ADAPTER_OUTPUT
from export.onnx_export import ExportError
from model.adapter import StudentAdapter
from model.data.reader import read_batch, resolve_places
from model.examples import random_batch, random_user_batch
from model.features import USER_INDEX, user_input_names
from model.gem import GEM
from model.outputs import LOGITS
from model.schema import FeatureSchema
from model.storage import Place
from model.user_index import share_users

PARITY_TOLERANCE = 1e-4
# A half-precision graph against the float32 model: 10 bits of mantissa, through a
# dozen layers.
FP16_PARITY_TOLERANCE = 2e-2
# (rows, sequence length) of the random parity batches: the edges and a typical call.
RANDOM_SHAPES = ((1, 1), (7, 3), (64, 32), (256, 128))


@dataclass(frozen=True)
class Parity:
    """Max abs difference between ONNX Runtime and PyTorch, per output."""

    max_abs_diff: dict[str, float]
    batches: int

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())


def fm_parity_batches(
    schema: FeatureSchema, model: GEM, data: Path | Place | None, rows: int
) -> list[dict[str, np.ndarray]]:
    """The FM's parity batches: random ones of every shape, and `rows` rows of the last
    file of `data` when given."""
    seq_len = model.cfg.seq_len
    batches = [random_batch(schema, b, min(length, seq_len), seed=b) for b, length in RANDOM_SHAPES]
    if model.cfg.user_indexed:
        # The serving shapes of a user-indexed graph: one user, many candidates; several users.
        batches += [random_user_batch(schema, 1, 256, min(128, seq_len)), random_user_batch(schema, 5, 64, 32)]
    if data is not None:
        batches.append(logged_rows(schema, seq_len, data, rows))
    return batches


def logged_rows(schema: FeatureSchema, seq_len: int, data: str | Path | Place, rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of the last file of `data` (file, folder or glob), unlabelled."""
    real = read_batch(resolve_places(data)[-1], schema, max_seq_len=seq_len, labels=False)
    return {k: v[:rows] for k, v in real.items()}


def fm_logits(model: GEM, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        tensors = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in batch.items()}
        return model(tensors)[LOGITS].numpy()


def adapter_batches_over(model: GEM, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The adapter's inputs for the FM's parity batches: the FM's logits and the surface."""
    logits, surface = ADAPTER_INPUTS
    return [{logits: fm_logits(model, b), surface: b[surface]} for b in batches]


def adapter_parity_batches(
    n_tasks: int, n_surfaces: int, real_logits: np.ndarray | None = None
) -> list[dict[str, np.ndarray]]:
    """Random FM logits (and the given real ones) with every surface, for the adapter's
    parity check when it is published alone."""
    logits, surface = ADAPTER_INPUTS
    rng = np.random.default_rng(0)
    batches: list[dict[str, np.ndarray]] = [
        {logits: rng.normal(0.0, 3.0, (b, n_tasks)).astype(np.float32), surface: rng.integers(0, n_surfaces, b)}
        for b, _ in RANDOM_SHAPES
    ]
    if real_logits is not None:
        batches.append({logits: real_logits.astype(np.float32), surface: rng.integers(0, n_surfaces, len(real_logits))})
    return batches


def check_parity(
    onnx_path: Path,
    batches: list[dict[str, np.ndarray]],
    reference: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    what: str,
    tolerance: float = PARITY_TOLERANCE,
) -> Parity:
    """Runs every batch through ONNX Runtime and `reference` (the torch module); raises
    if any output differs by more than `tolerance`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    worst = dict.fromkeys(outputs, 0.0)
    for batch in batches:
        got = dict(zip(outputs, session.run(outputs, {n: batch[n] for n in inputs}), strict=True))
        with torch.no_grad():
            # Arrow-backed arrays are read-only; torch wants writable memory.
            want = reference({n: torch.from_numpy(np.require(batch[n], requirements="W")) for n in inputs})
        for k in outputs:
            worst[k] = max(worst[k], float(np.abs(got[k] - want[k].numpy()).max()))
    parity = Parity(worst, len(batches))
    if parity.worst > tolerance:
        raise ExportError(f"{what} ONNX parity check failed: max abs difference {worst} exceeds {tolerance}")
    return parity


def check_fm_parity(
    model: GEM, onnx_path: Path, batches: list[dict[str, np.ndarray]], tolerance: float = PARITY_TOLERANCE
) -> Parity:
    """Per-example batches are turned into the user-indexed form (identical user rows
    merged) when the graph takes it."""
    model.eval()
    if model.cfg.user_indexed:
        users = user_input_names(model.schema)
        batches = [b if USER_INDEX in b else share_users(b, users) for b in batches]
    return check_parity(onnx_path, batches, model, "FM", tolerance)


def check_adapter_parity(adapter: StudentAdapter, onnx_path: Path, batches: list[dict[str, np.ndarray]]) -> Parity:
    adapter.eval()
    logits, surface = ADAPTER_INPUTS
    return check_parity(
        onnx_path, batches, lambda x: {ADAPTER_OUTPUT: adapter(x[logits], x[surface])}, "Student Adapter"
    )
