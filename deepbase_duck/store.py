"""The store: one DuckDB database (a file, or memory) plus a folder of Parquet activation parts.

This module opens connections, applies the schema and macros of ``sql/*.sql`` and offers the
few query helpers that always finish their results (DuckDB 2.0 refuses a second query on a
connection whose result is still open). It knows nothing of torch.

A store opened read-only (``open_database(path, read_only=True)``, ``dbd.connect(path,
read_only=True)``) is never written: its catalog is checked instead of created or migrated, the
pure-SQL macros are made TEMP macros of the connection, and every call that writes
(``one_writer``) is refused before it starts, so that nothing is left half done. Several
processes may read a store at once that way; a file made read-only (chmod) opens only so.
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


_MACRO = re.compile(r"\bCREATE\s+OR\s+REPLACE\s+MACRO\b", re.IGNORECASE)
_WRITES = re.compile(r"\b(CREATE\s+(OR\s+REPLACE\s+)?(TABLE|VIEW|SEQUENCE|SCHEMA|INDEX|TYPE)"
                     r"|ALTER|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


def apply_sql_read_only(con: duckdb.DuckDBPyConnection) -> None:
    """The pure-SQL macros of sql/ as TEMP macros of ``con``, a read-only connection: DuckDB
    creates those in memory, and they stand before the (maybe older) ones stored in the file.
    A file that creates or alters tables (the catalog, its migrations) is not applied: it
    would write; ``check_catalog`` makes sure the store already has what it makes."""
    for name, text in sql_files("pure"):
        body = "\n".join(line.split("--", 1)[0] for line in text.splitlines())   # not the comments' words
        if _WRITES.search(body):
            continue
        try:
            con.execute(_MACRO.sub("CREATE OR REPLACE TEMP MACRO", text))
        except duckdb.Error as exc:  # pragma: no cover - a broken shipped file
            raise RuntimeError(f"sql/{name} failed to apply as TEMP macros: {exc}") from exc


@functools.lru_cache(maxsize=1)
def catalog_columns() -> frozenset:
    """(table, column) of every table the sql/ files make, as a new store has them."""
    scratch = duckdb.connect(":memory:")
    try:
        apply_sql(scratch, "pure")
        return frozenset(scratch.sql("SELECT table_name, column_name FROM duckdb_columns() "
                                     "WHERE database_name = current_database()").fetchall())
    finally:
        scratch.close()


def check_catalog(con, path) -> None:
    """Refuse a read-only store whose catalog is not this version's: not a deepbase_duck store at
    all, or one an earlier version wrote, which opening it writable would bring up to date (the
    migrations of sql/05_migrations.sql write)."""
    have = set(con.sql("SELECT table_name, column_name FROM duckdb_columns() "
                       "WHERE database_name = current_database()").fetchall())
    if not any(t == "dbd_meta" for t, _ in have):
        raise DeepBaseError(f"{path} is not a deepbase_duck store (it has no table dbd_meta); open a store "
                            f"that deepbase_duck.connect made")
    missing = sorted(catalog_columns() - have)
    if missing:
        shown = ", ".join(f"{t}.{c}" for t, c in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DeepBaseError(f"the store {path} was written by an earlier deepbase_duck (its catalog lacks {shown}), "
                            f"and bringing it up to date writes to it, which read_only forbids: open it once "
                            f"without read_only (dbd.connect(path); CLI: without --read-only), then read-only")


def is_read_only(con) -> bool:
    """Whether ``con`` (a connection or a cursor of one) has its store open read-only."""
    row = q_one(con, "SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()")
    return bool(row and row[0])


class ReadOnlyStoreError(DeepBaseError):
    """A call that writes to a store opened read-only."""


def read_only_error(con, what: str) -> ReadOnlyStoreError:
    path = q_scalar(con, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    return ReadOnlyStoreError(
        f"the store {path} is open read-only, and {what} writes to it; nothing was changed. Open it writable "
        f"(dbd.connect(path) without read_only=True; CLI: without --read-only) to do that")


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


def open_database(path: str | None, threads: int | None = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection to the store at ``path`` (None: in memory) with the catalog applied.

    Files are written with storage_compatibility_version v1.5.0 so that the DuckDB 1.5 CLI (the
    newest on PyPI) opens them. ``read_only``: an existing store file, opened by DuckDB
    read-only and left as it is (its catalog checked, not applied: ``check_catalog``).
    """
    config = {}
    if read_only and path in (None, ":memory:"):
        raise DeepBaseError("read_only=True opens an existing store file; give its path (a store in memory "
                            "starts empty, with nothing to read)")
    if path not in (None, ":memory:"):
        config["storage_compatibility_version"] = "v1.5.0"
        if not read_only:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if threads:
        config["threads"] = int(threads)
    try:
        con = duckdb.connect(path if path else ":memory:", read_only=read_only, config=config)
    except duckdb.IOException as exc:
        text = str(exc).lower()
        if read_only and "does not exist" in text:
            raise DeepBaseError(f"no store at {path}: read_only opens an existing store") from None
        if "permission denied" in text and not read_only:
            raise DeepBaseError(f"the store {path} cannot be opened for writing ({exc}): to read it, open it "
                                f"read-only (dbd.connect(path, read_only=True); CLI: --read-only)") from None
        if "lock" not in text:
            raise
        held = re.search(r"PID (\d+)", str(exc))
        if read_only:
            raise DeepBaseError(
                f"the store {path} is open for writing in another process{f' (PID {held.group(1)})' if held else ''}, "
                f"and DuckDB lets no other process read it meanwhile, read-only or not: close it there "
                f"(dbd.close(con), or quit that shell) and try again, or read the Parquet of an export made "
                f"before (deepbase-duck export)") from None
        raise DeepBaseError(
            f"the store {path} is open in another process{f' (PID {held.group(1)})' if held else ''}: DuckDB lets "
            f"one process write a file at a time; close it there (dbd.close(con), or quit that shell) and "
            f"try again, or work on a copy or on its exported Parquet (deepbase-duck export); if every process "
            f"that holds it only reads, open it read-only here too (dbd.connect(path, read_only=True); "
            f"CLI: --read-only)") from None
    except duckdb.ConnectionException as exc:
        if "different configuration" not in str(exc):
            raise
        raise DeepBaseError(
            f"the store {path} is already open in this process through another DuckDB connection (read-only, "
            f"or with other settings than deepbase_duck's): close that connection first, or open the store "
            f"with deepbase_duck.connect only") from None
    if read_only:
        try:
            check_catalog(con, path)
            apply_sql_read_only(con)
        except BaseException:
            con.close()
            raise
        return con
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
    Plain SQL over the store's tables stays concurrent. On a store opened read-only the call is
    refused before it starts (ReadOnlyStoreError), so that a scan does not run to its end and
    then fail to store its labels or scores."""
    @functools.wraps(fn)
    def wrapper(session, *args, **kwargs):
        with session.write_lock:
            if is_read_only(session.con):
                raise read_only_error(session.con, _call_name(fn))
            return fn(session, *args, **kwargs)
    return wrapper


def one_reader(fn):
    """``one_writer`` for a function that reads the store in one consistent state (an export, a
    report) and so runs on a read-only store too; a write it may still make (activation files
    deleted by hand taken out of the catalog) fails there by name (``Transaction``)."""
    @functools.wraps(fn)
    def wrapper(session, *args, **kwargs):
        with session.write_lock:
            return fn(session, *args, **kwargs)
    return wrapper


def _call_name(fn) -> str:
    """The name a user knows a writer by: 'inspect', 'register_model', ..."""
    return fn.__name__.strip("_")


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
            if isinstance(exc, duckdb.Error) and "read-only mode" in str(exc):   # DuckDB's words
                raise read_only_error(self.con, "this call") from exc
        return False


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
