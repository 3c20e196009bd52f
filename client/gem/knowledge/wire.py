"""numpy <-> the API's `Tensor` message: raw little-endian bytes, no per-element work.

Decoding is one `np.frombuffer` per column (a view on the request's bytes), so a
512-example request costs a handful of calls, whatever its size.
"""

from __future__ import annotations

import numpy as np
from gem.knowledge.v1 import knowledge_pb2 as pb

DTYPES = {pb.DATA_TYPE_INT64: np.dtype("<i8"), pb.DATA_TYPE_FLOAT32: np.dtype("<f4")}
WIRE_TYPES = {np.dtype(np.int64): pb.DATA_TYPE_INT64, np.dtype(np.float32): pb.DATA_TYPE_FLOAT32}


class WireError(ValueError):
    """A Tensor message that does not describe an array (names the tensor)."""


def encode(array: np.ndarray) -> pb.Tensor:
    dtype = WIRE_TYPES.get(array.dtype)
    if dtype is None:
        raise WireError(f"dtype {array.dtype} cannot be sent; use int64 or float32")
    return pb.Tensor(
        dtype=dtype, shape=array.shape, data=np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    )


def decode(name: str, tensor: pb.Tensor) -> np.ndarray:
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{name}: dtype must be DATA_TYPE_INT64 or DATA_TYPE_FLOAT32, got {tensor.dtype}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{name}: negative dimension in shape {list(shape)}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise WireError(
            f"{name}: shape {list(shape)} of {np.dtype(dtype).name} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def decode_map(tensors) -> dict[str, np.ndarray]:
    return {name: decode(name, t) for name, t in tensors.items()}
