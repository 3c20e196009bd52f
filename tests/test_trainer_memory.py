"""trainer/memory.py: the heap a cycle freed goes back to the OS (the side trainer's
RSS between cycles is what it still uses; the soak bounds its growth)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.sampling import parse_status
from trainer.memory import _malloc_trim, pin_mmap_threshold, release_freed_memory


def _rss() -> int:
    with open("/proc/self/status") as f:
        return parse_status(f.read())[0]


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_heap_pages_are_returned():
    mib = 1 << 20
    chunks = [np.ones(1000) for _ in range(25_000)]  # ~200 MiB through malloc, every page written
    keep = np.ones(1000)  # allocated after them: the heap's top cannot shrink by itself
    del chunks
    held = _rss()
    assert release_freed_memory()
    assert held - _rss() > 100 * mib
    assert keep.sum() == 1000


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no mallopt (not glibc)")
def test_glibc_takes_the_pinned_threshold():
    assert pin_mmap_threshold()  # 32 MiB: the top of glibc's dynamic range on 64-bit
