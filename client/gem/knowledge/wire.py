"""numpy <-> the API's `Tensor` message: raw little-endian bytes, no per-element work.

Decoding is one `np.frombuffer` per column (a view on the request's bytes), so a
512-example request costs a handful of calls, whatever its size.
"""

from __future__ import annotations

import numpy as np
from gem.knowledge.v1 import knowledge_pb2 as pb

DTYPES: dict[int, np.dtype] = {pb.DATA_TYPE_INT64: np.dtype("<i8"), pb.DATA_TYPE_FLOAT32: np.dtype("<f4")}
WIRE_TYPES = {np.dtype(np.int64): pb.DATA_TYPE_INT64, np.dtype(np.float32): pb.DATA_TYPE_FLOAT32}


class WireError(ValueError):
    """A Tensor message that does not describe an array (names the tensor)."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


def cut(text: object, limit: int = 64) -> str:
    """`text` as a string of at most about `limit` characters (a cut one says how long it
    was): user input quoted in messages stays bounded."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 24, 8)]}...({len(text)} chars)"


# No legal tensor has more elements than this (a call is bounded far below).
MAX_ELEMENTS = 1 << 40


def encode(array: np.ndarray) -> pb.Tensor:
    dtype = WIRE_TYPES.get(array.dtype)
    if dtype is None:
        raise WireError(f"dtype {array.dtype} cannot be sent; use int64 or float32")
    return pb.Tensor(
        dtype=dtype, shape=array.shape, data=np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    )


def decode(name: str, tensor: pb.Tensor) -> np.ndarray:
    label = cut(name)
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{label}: dtype must be DATA_TYPE_INT64 or DATA_TYPE_FLOAT32, got {tensor.dtype}", name)
    shape = tuple(tensor.shape)
    if len(shape) > 4:
        raise WireError(f"{label}: {len(shape)} dimensions; inputs have at most 2", name)
    if any(d < 0 for d in shape):
        raise WireError(f"{label}: negative dimension in shape {cut(list(shape))}", name)
    # Python integers: a product that overflows int64 (e.g. [2**62, 8]) is caught, not wrapped.
    elements = 1
    for d in shape:
        elements *= int(d)
    if elements > MAX_ELEMENTS:
        raise WireError(f"{label}: shape {cut(list(shape))} is far beyond any legal call", name)
    expected = elements * dtype.itemsize
    if len(tensor.data) != expected:
        raise WireError(
            f"{label}: shape {cut(list(shape))} of {np.dtype(dtype).name} needs {expected} bytes, "
            f"got {len(tensor.data)}",
            name,
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def decode_map(tensors) -> dict[str, np.ndarray]:
    return {name: decode(name, t) for name, t in tensors.items()}
