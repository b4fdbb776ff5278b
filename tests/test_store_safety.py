"""Opening a store twice in one process, or while another DuckDB connection holds its file: one
clear error, nothing left registered, and the store opens again once the other is closed."""
from __future__ import annotations

import os

import duckdb
import pytest

import deepbase_duck as dbd
from deepbase_duck.catalog import _SESSIONS
from deepbase_duck.errors import DeepBaseError


def test_a_second_connect_to_an_open_store_is_refused_then_works_after_close(tmp_path, monkeypatch):
    db = str(tmp_path / "s.duckdb")
    first = dbd.connect(db, progress=False)
    dbd.add_dataset(first, "d", ["x = 1\n"])
    sessions = len(_SESSIONS)
    monkeypatch.chdir(tmp_path)
    for spelling in (db, "s.duckdb", f"./{os.path.basename(db)}"):
        with pytest.raises(DeepBaseError, match=f"the store {spelling} is already open in this process as "
                                                f"connection .*dbd.close"):
            dbd.connect(spelling, progress=False)
    assert len(_SESSIONS) == sessions                         # nothing of the refused ones kept
    assert first.sql("SELECT count(*) FROM records").fetchall() == [(1,)]   # the first still works
    dbd.close(first)
    again = dbd.connect(db, progress=False)
    try:
        assert again.sql("SELECT count(*) FROM records").fetchall() == [(1,)]
        assert again.sql("SELECT count(*) FROM available_hypotheses()").fetchall()[0][0] > 0   # its UDFs
    finally:
        dbd.close(again)


def test_a_store_whose_connection_was_closed_directly_opens_again(tmp_path):
    db = str(tmp_path / "s.duckdb")
    dbd.connect(db, progress=False).close()                   # DuckDB's close, not dbd.close
    con = dbd.connect(db, progress=False)
    dbd.close(con)


def test_a_read_only_duckdb_connection_holding_the_file_is_named(tmp_path):
    db = str(tmp_path / "s.duckdb")
    dbd.close(dbd.connect(db, progress=False))
    plain = duckdb.connect(db, read_only=True)
    try:
        with pytest.raises(DeepBaseError, match=f"the store {db} is already open in this process through another "
                                                f"DuckDB connection"):
            dbd.connect(db, progress=False)
    finally:
        plain.close()
    dbd.close(dbd.connect(db, progress=False))


def test_a_connect_failing_part_way_keeps_nothing_open(tmp_path, monkeypatch):
    import sys
    extract = sys.modules["deepbase_duck.engine.extract"]    # (the package's `extract` is the function)
    db = str(tmp_path / "s.duckdb")
    sessions = len(_SESSIONS)

    def broken(session, clean=False):
        raise RuntimeError("views failed")
    monkeypatch.setattr(extract, "refresh_views", broken)
    with pytest.raises(RuntimeError, match="views failed"):
        dbd.connect(db, progress=False)
    assert len(_SESSIONS) == sessions
    monkeypatch.undo()
    con = dbd.connect(db, progress=False)                     # not "already open", no UDF left registered
    dbd.close(con)
