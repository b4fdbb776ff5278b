"""engine/memory.py: freed heap memory goes back to the OS between blocks (glibc)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from deepbase_duck.engine.memory import release_freed_memory


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_heap_holes_are_returned():
    # many mid-sized blocks (below glibc's mmap threshold once it has grown), every other one
    # kept: the freed ones stay resident as heap holes until trimmed
    big = [np.ones(4 << 20, np.uint8) for _ in range(4)]       # raise the dynamic mmap threshold
    del big
    blocks = [np.ones(2 << 20, np.uint8) for _ in range(120)]  # 240 MB from the heap
    keep = blocks[-1:]
    del blocks
    before = rss_mb()
    assert release_freed_memory() is True
    after = rss_mb()
    assert before - after > 100, (before, after)
    assert keep[0].sum() == 2 << 20
