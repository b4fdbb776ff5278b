"""engine/memory.py: freed heap memory goes back to the OS between blocks (glibc), DuckDB's
memory limit is capped while a scan writes to a file-backed store, oneDNN's cache is bounded."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck import Hypothesis
from deepbase_duck.engine.memory import (KEEP_FREE_HEAP, free_heap_bytes, memory_bytes, release_freed_memory,
                                         restore_memory_limit)

from conftest import TEXTS, planted_adapter


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def heap_holes(mb: int) -> list:
    """Leave about ``mb`` MB of freed mid-sized blocks in the heap (below glibc's mmap
    threshold once it has grown); returns the one block kept."""
    big = [np.ones(4 << 20, np.uint8) for _ in range(4)]       # raise the dynamic mmap threshold
    del big
    blocks = [np.ones(2 << 20, np.uint8) for _ in range(mb // 2)]
    keep = blocks[-1:]
    del blocks
    return keep


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_heap_holes_are_returned():
    keep = heap_holes(240)                                      # 240 MB of holes
    before = rss_mb()
    assert release_freed_memory(keep=0) is True                 # 0: trim whatever the heap holds
    after = rss_mb()
    assert before - after > 100, (before, after)
    assert keep[0].sum() == 2 << 20


@pytest.mark.skipif(free_heap_bytes() is None, reason="glibc >= 2.33 (mallinfo2)")
def test_a_block_end_keeps_a_bounded_free_heap():
    # under the margin nothing is handed back (the next block reuses it without page faults);
    # over it, the heap is trimmed: resident memory stays within the margin of what is used
    keep = heap_holes(240)
    free = free_heap_bytes()
    assert free >= 200 << 20, free
    before = rss_mb()
    assert release_freed_memory(keep=free + (64 << 20)) is False
    assert rss_mb() > before - 20
    assert free_heap_bytes() >= 200 << 20
    assert release_freed_memory(keep=64 << 20) is True
    assert before - rss_mb() > 100
    assert keep[0].sum() == 2 << 20
    assert KEEP_FREE_HEAP == 256 << 20                          # the default margin (engine/memory.py)


# -- DuckDB's buffer pool is capped while a scan writes to a file-backed store ------------------

def limit_of(con) -> str:
    return con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]


def spying_hypothesis(con, seen: list, fail: bool = False, name: str = "digit_spy") -> Hypothesis:
    """A binary 'digit' hypothesis that records the store's memory limit while labels are made."""
    cur = con.cursor()

    def spans(text):
        seen.append(limit_of(cur))
        if fail:
            raise ValueError("hypothesis failed on purpose")
        return [int(c.isdigit()) for c in text]
    return Hypothesis(name + "_fail" if fail else name, spans, "binary")


def store(path, **kw):
    con = dbd.connect(str(path) if path else None, progress=False, **kw)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    return con


def test_scan_caps_duckdb_memory_then_checkpoints_and_restores(tmp_path):
    con = store(tmp_path / "s.duckdb")
    before = limit_of(con)
    assert memory_bytes(before) > memory_bytes("1GB")           # DuckDB's default: most of the RAM
    seen = []
    t = dbd.inspect(con, "planted", ["planted"], [spying_hypothesis(con, seen)], "snippets")
    assert seen and set(seen) == {"122.0 MiB"}                  # '128MB' during the scan
    assert limit_of(con) == before
    # the scan's CHECKPOINT wrote its rows to the file: the write-ahead log is empty
    wal = tmp_path / "s.duckdb.wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert con.sql("SELECT count(*) FROM labels WHERE hypothesis = 'digit_spy'").fetchall()[0][0] > 0
    r = {row["unit"]: row["score"] for row in t.to_pylist() if row["measure"] == "corr"}
    assert r[0] == pytest.approx(1.0)                           # the planted digit unit, unchanged
    # annotate, extract and the SQL surface are capped too, and restore the limit
    seen.clear()
    dbd.annotate(con, [spying_hypothesis(con, seen, name="digit_spy2")], "snippets")
    assert len(seen) == len(TEXTS) and set(seen) == {"122.0 MiB"}
    assert limit_of(con) == before
    assert con.sql("SELECT count(*) FROM annotate(['in_comment'], 'snippets')").fetchall() == [(1,)]
    dbd.extract(con, "planted", ["planted"], "snippets")
    con.sql("SELECT count(*) FROM inspect('planted', ['mix'], ['in_comment'], 'snippets')").fetchall()
    assert limit_of(con) == before
    dbd.close(con)


def test_scan_inside_a_write_transaction_skips_the_checkpoint(tmp_path):
    # CREATE TABLE AS SELECT over the SQL inspect() is a write transaction: DuckDB refuses a
    # CHECKPOINT then, and the scan still succeeds under the cap
    con = store(tmp_path / "s.duckdb")
    before = limit_of(con)
    con.execute("CREATE TABLE top AS SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets')")
    got = dict(con.sql("SELECT unit, score FROM top WHERE measure = 'corr'").fetchall())
    assert got[0] == pytest.approx(1.0)
    assert limit_of(con) == before
    dbd.close(con)


def test_failed_scan_restores_the_limit_and_keeps_tables(tmp_path):
    con = store(tmp_path / "s.duckdb")
    before = limit_of(con)
    seen = []
    with pytest.raises(Exception, match="failed on purpose"):
        dbd.inspect(con, "planted", ["planted"], [spying_hypothesis(con, seen, fail=True)], "snippets")
    assert seen == ["122.0 MiB"]
    assert limit_of(con) == before
    assert con.sql("SELECT count(*) FROM records").fetchall() == [(len(TEXTS),)]
    dbd.close(con)


@pytest.mark.parametrize("path, kw, expect", [
    (None, {}, None),                                  # in memory: the tables live in the pool
    ("s.duckdb", {"scan_memory_limit": None}, None),   # switched off
    ("s.duckdb", {"scan_memory_limit": "256MB"}, "244.1 MiB"),
])
def test_cap_is_left_off_or_sized_as_asked(tmp_path, path, kw, expect):
    con = store(tmp_path / path if path else None, **kw)
    before = limit_of(con)
    seen = []
    dbd.inspect(con, "planted", ["planted"], [spying_hypothesis(con, seen)], "snippets")
    assert set(seen) == {expect or before}
    assert limit_of(con) == before
    dbd.close(con)


def test_a_lower_user_limit_is_kept(tmp_path):
    con = store(tmp_path / "s.duckdb")
    con.execute("SET memory_limit = '64MB'")
    seen = []
    dbd.inspect(con, "planted", ["planted"], [spying_hypothesis(con, seen)], "snippets")
    assert set(seen) == {"61.0 MiB"} and limit_of(con) == "61.0 MiB"
    dbd.close(con)


def test_restoring_a_displayed_limit_does_not_drift():
    import duckdb
    con = duckdb.connect()
    for value in ["4GB", "3GiB", "1000MB", "12.3 GiB"]:
        con.execute(f"SET memory_limit = '{value}'")
        shown = limit_of(con)
        for _ in range(5):                            # a plain SET of '3.7 GiB' shows '3.6 GiB'
            restore_memory_limit(con, shown)
        assert limit_of(con) == shown
        assert abs(memory_bytes(shown) - memory_bytes(value)) / memory_bytes(value) < 0.03


def test_bad_scan_memory_limit_is_named():
    with pytest.raises(dbd.DeepBaseError, match="scan_memory_limit.*'lots'"):
        dbd.connect(None, scan_memory_limit="lots")
    assert memory_bytes("18.8 GiB") == pytest.approx(18.8 * 2 ** 30)
    assert memory_bytes("128MB") == 128e6


@pytest.mark.parametrize("env, expect", [({}, "64"), ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"}, "7")])
def test_onednn_cache_bounded_unless_the_user_sets_it(env, expect):
    base = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", "import deepbase_duck, os; "
                          "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
                         env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expect
