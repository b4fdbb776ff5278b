"""The store: one DuckDB database (a file, or memory) plus a folder of Parquet activation parts.

This module opens connections, applies the schema and macros of ``sql/*.sql`` and offers the
few query helpers that always finish their results (DuckDB 2.0 refuses a second query on a
connection whose result is still open). It knows nothing of torch.
"""
from __future__ import annotations

import functools
import importlib.resources
import os
import re
import shutil
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import DeepBaseError

SCHEMA_VERSION = "1"


def sql_files(kind: str = "all") -> list[tuple[str, str]]:
    """(name, text) of the macro files in sql/, in name order.

    kind = 'pure' gives the files that need no Python (they run in the DuckDB CLI), 'python' the
    ones whose macros call deepbase_duck's Python UDFs (prefix ``9``), 'all' both.
    """
    try:
        root = importlib.resources.files("deepbase_duck.sql")
    except ModuleNotFoundError:  # running from a source checkout that was not pip-installed
        root = Path(__file__).resolve().parent.parent / "sql"
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        is_python = entry.name.startswith("9")
        if kind == "all" or (kind == "python") == is_python:
            out.append((entry.name, entry.read_text(encoding="utf-8")))
    return out


def apply_sql(con: duckdb.DuckDBPyConnection, kind: str) -> None:
    for name, text in sql_files(kind):
        try:
            con.execute(text)
        except duckdb.Error as exc:  # pragma: no cover - a broken shipped file
            raise RuntimeError(f"sql/{name} failed to apply: {exc}") from exc


def activation_root(db_path: str | None) -> Path:
    """The folder holding Parquet activation parts: '<store>.acts' beside a file store, the file
    itself where ``db_path`` is a symbolic link to it (a store opened through a link to it, or
    by its own path, has one folder: beside the link, its catalog would have found no file,
    forgotten every stored part, and the next opening by the file's path deleted them). A folder
    that an earlier version made beside a link, where the file has none, is kept."""
    if db_path is None or db_path == ":memory:":
        return Path(tempfile.mkdtemp(prefix="deepbase_duck_acts_"))
    real, beside = os.path.realpath(db_path) + ".acts", os.path.abspath(db_path) + ".acts"
    if real != beside and os.path.isdir(beside) and not os.path.isdir(real):
        return Path(beside)
    return Path(real)


def open_database(path: str | None, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A connection to the store at ``path`` (None: in memory) with the catalog applied.

    Files are written with storage_compatibility_version v1.5.0 so that the DuckDB 1.5 CLI (the
    newest on PyPI) opens them.
    """
    config = {}
    if path not in (None, ":memory:"):
        config["storage_compatibility_version"] = "v1.5.0"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if threads:
        config["threads"] = int(threads)
    try:
        con = duckdb.connect(path if path else ":memory:", config=config)
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise
        held = re.search(r"PID (\d+)", str(exc))
        raise DeepBaseError(
            f"the store {path} is open in another process{f' (PID {held.group(1)})' if held else ''}: DuckDB lets "
            f"one process write a file at a time; close it there (dbd.close(con), or quit that shell) and "
            f"try again, or work on a copy or on its exported Parquet (deepbase-duck export)") from None
    except duckdb.ConnectionException as exc:
        if "different configuration" not in str(exc):
            raise
        raise DeepBaseError(
            f"the store {path} is already open in this process through another DuckDB connection (read-only, "
            f"or with other settings than deepbase_duck's): close that connection first, or open the store "
            f"with deepbase_duck.connect only") from None
    apply_sql(con, "pure")
    con.execute(
        "INSERT INTO dbd_meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
        [SCHEMA_VERSION],
    )
    return con


# -- query helpers that always finish their results ------------------------------------------

def q_all(con, sql: str, params=None) -> list[tuple]:
    return con.sql(sql, params=params).fetchall()


def q_one(con, sql: str, params=None):
    rows = q_all(con, sql, params)
    return rows[0] if rows else None


def q_scalar(con, sql: str, params=None):
    row = q_one(con, sql, params)
    return None if row is None else row[0]


def q_arrow(con, sql: str, params=None) -> pa.Table:
    return con.sql(sql, params=params).to_arrow_table()


def insert_arrow(con, table: str, data: pa.Table, columns: list[str] | None = None) -> None:
    """INSERT an Arrow table into ``table`` (by column name)."""
    name = "__dbd_insert_src"
    con.register(name, data)
    try:
        cols = columns or data.column_names
        col_sql = ", ".join(f'"{c}"' for c in cols)
        con.execute(f"INSERT INTO {table} ({col_sql}) SELECT {col_sql} FROM {name}")
    finally:
        try:
            con.unregister(name)
        except duckdb.Error:   # an aborted transaction refuses it; the INSERT's own error matters
            pass


def one_writer(fn):
    """Run ``fn(session, ...)`` holding the session's ``write_lock``: the queries and catalog
    changes of one store run one at a time, whichever cursor (``dbd.cursor``, another thread)
    they come from; two at once would compute and insert the same labels, symbols and query ids.
    Plain SQL over the store's tables stays concurrent."""
    @functools.wraps(fn)
    def wrapper(session, *args, **kwargs):
        with session.write_lock:
            return fn(session, *args, **kwargs)
    return wrapper


class Transaction:
    """``with Transaction(con):`` BEGIN ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, con):
        self.con = con

    def __enter__(self):
        self.con.execute("BEGIN TRANSACTION")
        return self.con

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.con.execute("COMMIT")
        else:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.Error:
                pass
        return False


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
