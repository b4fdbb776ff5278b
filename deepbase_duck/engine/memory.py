"""Give freed heap memory back to the operating system between blocks.

A scan allocates and frees tensors of a different size at every block (records are batched by
length, so sizes grow through a full scan). glibc's allocator raises its mmap threshold after
large frees and then serves such tensors from the heap, whose free holes it keeps: the process's
resident memory creeps up with the number of blocks although every block's memory is freed.
``malloc_trim(0)`` after each block returns those holes. Measured on the 1M-character char-LSTM
scan: peak RSS 877 MB without, 637 MB with (benchmarks/RESULTS.md). A call walks the heap (about
7 ms late in a 3M-character scan, 2.5% of its time); trimming at most once a second was tried
and kept the time within noise while the peak rose to 696 MB (670 MB at 0.3 s), so every block
trims.
Elsewhere than glibc (macOS, musl, Windows) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_trim = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _trim = getattr(_libc, "malloc_trim", None)
    except OSError:                       # pragma: no cover - no loadable C library
        _trim = None


def release_freed_memory() -> bool:
    """Return the heap's free memory to the OS (glibc); True when it could try."""
    if _trim is None:
        return False
    _trim(0)
    return True
