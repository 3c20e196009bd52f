"""Handing the memory a cycle freed back to the operating system.

A cycle's peak (the shard's batch, the weights and optimizer state kept to roll back,
the ONNX export, the parity and gate sessions) is freed when it ends, but glibc keeps
freed heap pages mapped for reuse, so without this a long-lived side trainer would
hold its highest peak forever and its RSS would say nothing about what it still uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return getattr(ctypes.CDLL(name), "malloc_trim", None)


def release_freed_memory() -> bool:
    """Collect cycles of garbage, then return every arena's free pages to the OS.
    True when the C library released something (False also where it cannot)."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
