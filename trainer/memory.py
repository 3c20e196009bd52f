"""Handing the memory a cycle freed back to the operating system.

A cycle's peak (the shard's batch, the weights and optimizer state kept to roll back,
the ONNX export, the parity and gate sessions) is freed when it ends, but glibc keeps
freed heap pages mapped for reuse, so without this a long-lived side trainer would
hold its highest peak forever and its RSS would say nothing about what it still uses.

glibc also raises its mmap threshold each time a big block is freed, so the same cycle's
big tensors move from their own mappings (returned on free) to the heap, where they
fragment it: measured, the side trainer's idle RSS stepped up 54 MiB at its second FM
cycle. `pin_mmap_threshold` fixes the threshold at the top of glibc's dynamic range from
the start, so every cycle allocates alike (flat from the first FM cycle, training speed
within this machine's noise; the default 128 KiB, also fixed, cost ~35 % of it in page
faults).
"""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library as this process loaded it (its symbols, looked up by name), with
    errno kept for the caller: glibc's memory calls here, `prctl` in
    trainer/export_child.py."""
    return ctypes.CDLL(None, use_errno=True)


def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    return getattr(libc(), "malloc_trim", None)


# mallopt's parameter (malloc.h) and the top of glibc's dynamic threshold on 64-bit.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Blocks of `nbytes` and more get their own mappings (when no free heap block fits),
    and the threshold no longer moves. True when set (False where the C library has no
    mallopt or refuses the value)."""
    mallopt = getattr(libc(), "mallopt", None)
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) if mallopt is not None else False


def release_freed_memory() -> bool:
    """Collect cycles of garbage, then return every arena's free pages to the OS.
    True when the C library released something (False also where it cannot)."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
