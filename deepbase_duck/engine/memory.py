"""Keep a scan's resident memory flat as the corpus grows.

Three parts: freed heap memory beyond a fixed margin goes back to the operating system at block
ends (``release_freed_memory``), DuckDB's buffer pool is capped while a scan writes to a
file-backed store (``capped_store_memory``), and torch's oneDNN kernel cache is bounded
(``bound_onednn_cache``).

Freed heap memory.

A scan allocates and frees tensors of a different size at every block (records are batched by
length, so sizes grow through a full scan). glibc's allocator raises its mmap threshold after
large frees and then serves such tensors from the heap, whose free holes it keeps: the process's
resident memory creeps up with the number of blocks although every block's memory is freed.
``malloc_trim(0)`` returns those holes (measured on the 1M-character char-LSTM scan: peak RSS
877 MB without, 637 MB with; benchmarks/RESULTS.md). But memory handed back is memory the next
block faults in again, page by page: trimming after every block cost the 300k-character
char-LSTM scan about 280,000 extra page faults and 0.5-0.8 s of its 7-8 s. So a block end trims
only when the heap holds more than ``KEEP_FREE_HEAP`` bytes of free memory (glibc's
``mallinfo2``, about 1 ms): resident memory stays within a fixed margin of what the scan uses,
whatever the corpus size, and a scan whose free heap stays under the margin faults in no
memory twice. A call walks the heap (about 7 ms late in a 3M-character scan).
Elsewhere than glibc (macOS, musl, Windows) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import sys
from contextlib import contextmanager

import duckdb

from ..errors import DeepBaseError

#: DuckDB memory limit while a scan writes to a file-backed store (``connect(scan_memory_limit=)``).
SCAN_MEMORY_LIMIT = "128MB"
#: Free heap bytes a block end leaves in place (``release_freed_memory``): more is trimmed.
KEEP_FREE_HEAP = 256 << 20
#: oneDNN primitive-cache entries unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set (oneDNN's default: 1024).
ONEDNN_CACHE_CAPACITY = "64"

_trim = _mallinfo2 = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _trim = getattr(_libc, "malloc_trim", None)
        _mallinfo2 = getattr(_libc, "mallinfo2", None)       # glibc >= 2.33
    except OSError:                       # pragma: no cover - no loadable C library
        _trim = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2
    _mallinfo2.argtypes = []


def free_heap_bytes() -> int | None:
    """Bytes of free memory the heap holds (glibc's mallinfo2 ``fordblks``); None where unknown."""
    return None if _mallinfo2 is None else int(_mallinfo2().fordblks)


def release_freed_memory(keep: int | None = None) -> bool:
    """Return the heap's free memory to the OS (glibc) when it holds more than ``keep`` bytes
    (default ``KEEP_FREE_HEAP``; 0: always). Where the free amount cannot be read (glibc
    before 2.33) it always trims. True when it trimmed."""
    if _trim is None:
        return False
    keep = KEEP_FREE_HEAP if keep is None else keep
    if keep > 0:
        free = free_heap_bytes()
        if free is not None and free <= keep:
            return False
    _trim(0)
    return True


# -- DuckDB's buffer pool during a scan --------------------------------------------------------
# A scan's own DuckDB work is small per block (record texts, label spans, appends of symbols and
# labels), but the rows it appends are held uncompressed until DuckDB checkpoints them, and the
# blocks a checkpoint writes stay cached in the buffer pool, which by default may grow to 80% of
# the machine's memory. On the 4M-character char-LSTM scan that cache was the peak-RSS growth
# with the corpus: 606 MB at 400k characters, 899 MB at 4M, the top reached when the store
# closed and checkpointed the last labels (benchmarks/RESULTS.md, session 5). With the pool
# capped at 128 MB for the scan and a checkpoint at its end, under the cap, the 4M scan peaks at
# 634 MB, in the same time. The cap is the database's memory_limit, a setting of the whole
# DuckDB instance: other cursors' queries run under it too while a scan runs (they spill to
# DuckDB's temporary directory where they need more). It is restored afterwards, also when the
# scan fails. In-memory stores are left alone: their tables have nowhere else to live.

_SIZE = re.compile(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*")     # DuckDB's memory sizes: '128MB', '18.8 GiB'
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
# units DuckDB shows but does not take in a SET: '500 bytes', and '16383.9 PiB' for no limit
# (SET memory_limit = '-1')
_SHOWN_UNITS = {**_UNITS, "bytes": 1, "pib": 2 ** 50}


def memory_bytes(text: str) -> float:
    """Bytes in a memory size that DuckDB's SET memory_limit takes, such as '128MB' or '1GiB'."""
    m = _SIZE.fullmatch(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise DeepBaseError(f"scan_memory_limit: not a memory size: {text!r} (expected a number and a unit "
                            "such as '128MB' or '1GiB', or None)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def shown_bytes(text: str) -> float:
    """Bytes in a memory limit as DuckDB shows it ('18.8 GiB', '500 bytes', '16383.9 PiB' for
    none); infinity for a text it cannot read (taken as no limit: the cap then applies)."""
    m = _SIZE.fullmatch(str(text))
    if not m or m.group(2).lower() not in _SHOWN_UNITS:
        return float("inf")
    return float(m.group(1)) * _SHOWN_UNITS[m.group(2).lower()]


@contextmanager
def capped_store_memory(session):
    """While the block runs, cap the DuckDB memory limit of ``session``'s file-backed store at
    ``session.scan_memory_limit`` (unless it is lower already, or None); on success, CHECKPOINT
    under the cap, so that the rows the scan appended are compressed to disk without being cached.
    The previous limit comes back in every case."""
    limit = getattr(session, "scan_memory_limit", None)
    con = session.con
    if limit is None or session.db_path in (None, ":memory:"):
        yield
        return
    old = _memory_limit(con)
    if shown_bytes(old) <= memory_bytes(limit):
        yield
        return
    con.execute(f"SET memory_limit = '{limit}'")
    try:
        yield
        try:
            con.execute("CHECKPOINT")
        except duckdb.TransactionException:
            # another write transaction is open (a CREATE TABLE AS SELECT over the SQL inspect(),
            # or a cursor's BEGIN): DuckDB refuses; its own checkpoint comes later, uncapped
            pass
    finally:
        _restore_after_scan(con, old)


def _restore_after_scan(con, old: str) -> None:
    """``restore_memory_limit``, also where ``con``'s own transaction is aborted (the scan failed
    inside the caller's BEGIN): DuckDB then refuses every statement on ``con`` until a ROLLBACK,
    which is the caller's to issue, so the limit, a setting of the whole database, is set back
    through a cursor of its own instead of staying at the scan's cap (and the refusal is not
    raised over the scan's own error)."""
    try:
        restore_memory_limit(con, old)
    except duckdb.TransactionException:
        cur = con.cursor()
        try:
            restore_memory_limit(cur, old)
        finally:
            cur.close()


def _memory_limit(con) -> str:
    return con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]


def restore_memory_limit(con, old: str) -> None:
    """Set the memory limit back to ``old`` as DuckDB displayed it ('18.8 GiB'). DuckDB shows a
    limit truncated to one decimal, and setting that text gives a smaller limit ('18.7 GiB'), so
    a plain SET would shrink the limit a little at every scan: DuckDB's default comes back by
    RESET, any other limit by the value halfway into its displayed decimal."""
    con.execute("RESET memory_limit")
    if _memory_limit(con) == old:
        return
    m = _SIZE.fullmatch(old)
    unit = m.group(2).lower() if m else None
    if unit in ("pib", "bytes"):
        # shown in a unit SET does not take: no limit ('16383.9 PiB', from SET memory_limit = '-1'),
        # or a few bytes ('500 bytes'), set again in bytes
        con.execute("SET memory_limit = '-1'" if unit == "pib" else f"SET memory_limit = '{m.group(1)}B'")
        return
    if m is None or unit not in _UNITS:          # a form not known here: as shown, if DuckDB takes it
        try:
            con.execute(f"SET memory_limit = '{old}'")
        except duckdb.Error:
            pass                                 # (DuckDB's default stays)
        return
    con.execute(f"SET memory_limit = '{old}'")
    if _memory_limit(con) != old:
        con.execute(f"SET memory_limit = '{float(m.group(1)) + 0.05:.2f} {m.group(2)}'")


def caps_store_memory(fn):
    """Decorator: run ``fn(session, ...)`` inside ``capped_store_memory(session)``."""
    @functools.wraps(fn)
    def wrapper(session, *args, **kwargs):
        with capped_store_memory(session):
            return fn(session, *args, **kwargs)
    return wrapper


# -- torch's oneDNN kernel cache ---------------------------------------------------------------
# On CPU, torch runs LSTMs (and convolutions) through oneDNN, which keeps a compiled primitive
# per distinct input shape, up to 1024 of them. A scan batches records by length, so every batch
# of a text model has a new shape: a 4M-character char-LSTM scan met hundreds and kept about 70 MB
# of kernels that were never used again (the peak RSS growth that remained once DuckDB's pool was
# capped: 704 -> 634 MB at 4M characters, with the time unchanged: benchmarks/RESULTS.md). 64
# entries still hold every shape of a fixed-size model (an image CNN meets a handful). oneDNN
# reads the setting when it first builds a primitive, so it is set when deepbase_duck is imported
# and only where the user has not set it; a process that ran oneDNN kernels before keeps its cache.

def bound_onednn_cache(capacity: str = ONEDNN_CACHE_CAPACITY) -> None:
    """Set ONEDNN_PRIMITIVE_CACHE_CAPACITY to ``capacity`` unless the environment sets it."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))
