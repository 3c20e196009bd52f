"""A decoded request -> the model's columnar batch, checked against the feature schema.

Everything a caller can get wrong is caught here, before the call joins a batch, so a
bad call fails alone: unknown, missing or doubly given features, dtypes, shapes, row
counts, sequence lengths, surfaces out of range, non-finite dense values, empty and
oversized calls. Each error names the feature. Shared columns (one row, e.g. the
user's features and history for all candidate ads) are broadcast to every row as
views, without copying; when every user input is shared, the batch is handed over in the
user-indexed form instead (U = 1, `model.user_index`), so the user rows are neither
broadcast nor found again by `share_users`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gem.knowledge.wire import cut

from export.contract import MAX_BATCH_EXAMPLES
from model.features import USER_INDEX, InputSpec, input_specs
from model.schema import FeatureSchema


class RequestError(ValueError):
    """The request does not match the schema; the message names the feature, and
    `field` is its path in the request (for `google.rpc.BadRequest`)."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def _q(name: object) -> str:
    """A user-given name, quoted and cut to a bounded length."""
    return repr(cut(name))


def _path(name: str, shared: bool = False) -> str:
    return f"{'shared' if shared else 'features'}[{_q(name)}]"


@dataclass(frozen=True)
class Limits:
    max_examples_per_call: int = MAX_BATCH_EXAMPLES


def _rows(features: dict[str, np.ndarray]) -> int:
    # 0-d arrays are left to the shape check, which names them.
    counts = {name: a.shape[0] for name, a in features.items() if a.ndim}
    if not counts:
        return 1  # everything shared: one example
    first, rows = next(iter(counts.items()))
    for name, n in counts.items():
        if n != rows:
            raise RequestError(
                f"feature {_q(name)} has {n} rows but {_q(first)} has {rows}; all columns need the same rows",
                _path(name),
            )
    return rows


def _check_array(spec: InputSpec, array: np.ndarray, shared: bool) -> None:
    where = "shared feature" if shared else "feature"
    path = _path(spec.name, shared)
    if array.dtype != spec.dtype:
        raise RequestError(f"{where} {spec.name!r}: expected {spec.dtype.name}, got {array.dtype.name}", path)
    if array.ndim != spec.rank:
        want = "[rows, events]" if spec.rank == 2 else "[rows]"
        raise RequestError(f"{where} {spec.name!r}: expected shape {want}, got {cut(list(array.shape))}", path)
    if shared and array.shape[0] != 1:
        raise RequestError(f"shared feature {spec.name!r} must have exactly one row, got {array.shape[0]}", path)


def assemble(
    schema: FeatureSchema, features: dict[str, np.ndarray], shared: dict[str, np.ndarray], limits: Limits
) -> dict[str, np.ndarray]:
    specs = {s.name: s for s in input_specs(schema)}
    for name in sorted((features.keys() | shared.keys()) - specs.keys()):
        raise RequestError(
            f"unknown feature {_q(name)}; the schema {schema.name!r} has no such input",
            _path(name, name not in features),
        )
    for name in sorted(features.keys() & shared.keys()):
        raise RequestError(f"feature {name!r} is given both per example and shared", _path(name, True))
    for name in specs:
        if name not in features and name not in shared:
            raise RequestError(f"missing feature {name!r}", _path(name))
    rows = _rows(features)
    if rows == 0:
        raise RequestError("empty batch: the call has no examples", "features")
    if rows > limits.max_examples_per_call:
        raise RequestError(
            f"the call has {rows} examples, over the limit of {limits.max_examples_per_call}", "features"
        )

    users = {name for name, spec in specs.items() if spec.side == "user"}
    one_user = all(name in shared for name in users)
    batch: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        is_shared = name in shared
        array = shared[name] if is_shared else features[name]
        _check_array(spec, array, is_shared)
        if is_shared and not (one_user and name in users):
            array = np.broadcast_to(array, (rows, *array.shape[1:]))
        batch[name] = array
    _check_values(schema, specs, batch)
    if one_user:
        batch[USER_INDEX] = np.zeros(rows, np.int64)
    return batch


def _check_values(schema: FeatureSchema, specs: dict[str, InputSpec], batch: dict[str, np.ndarray]) -> None:
    for seq in schema.sequences:
        widths = {f.name: batch[f.name].shape[1] for f in seq.fields}
        first = seq.fields[0].name
        if len(set(widths.values())) > 1:
            raise RequestError(f"sequence {seq.name!r}: fields have different lengths {widths}", _path(first))
        width = next(iter(widths.values()))
        if width > seq.max_length:
            raise RequestError(
                f"sequence {seq.name!r}: {width} events, over the schema's max_length {seq.max_length}", _path(first)
            )
        if width == 0:
            # Refused whatever the batch partners: an empty history is one padded event
            # with length 0.
            raise RequestError(
                f"sequence {seq.name!r}: width 0; send at least one (padding) event column, with "
                f"{seq.length_name!r} 0 for an empty history",
                _path(first),
            )
        lengths = batch[seq.length_name]
        if lengths.size and (lengths.min() < 0 or lengths.max() > width):
            raise RequestError(
                f"feature {seq.length_name!r}: lengths must be within [0, {width}] (the events sent), "
                f"got [{lengths.min()}, {lengths.max()}]",
                _path(seq.length_name),
            )
    for name, spec in specs.items():
        values = batch[name]
        if spec.kind == "surface" and (values.min() < 0 or values.max() >= len(schema.surfaces)):
            raise RequestError(
                f"feature {name!r}: surface index must be within [0, {len(schema.surfaces) - 1}] "
                f"({', '.join(schema.surfaces)}), got [{values.min()}, {values.max()}]",
                _path(name),
            )
        if spec.kind == "dense" and not np.isfinite(values).all():
            raise RequestError(f"feature {name!r}: dense values must be finite (no NaN or inf)", _path(name))
