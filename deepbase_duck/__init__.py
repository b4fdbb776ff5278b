"""deepbase_duck: Deep Neural Inspection inside DuckDB.

    import deepbase_duck as dbd
    con = dbd.connect("study.duckdb")
    dbd.register_model(con, "charlstm", "deepbase_duck.models.zoo:charlstm")
    dbd.add_dataset(con, "snippets", ["def f(x):\\n    return 'a' + x\\n"])
    con.sql("SELECT * FROM inspect('charlstm', ['lstm1'], ['in_string'], 'snippets') "
            "ORDER BY abs(score) DESC LIMIT 5").show()

Every function here takes the connection returned by ``connect`` and mirrors one SQL entry
point registered on it (see sql/90_surface.sql).

Importing the package is light: torch, scipy, pyarrow and the engine load on the first use of
what needs them (``connect``, or a name such as ``dbd.CharAdapter``; see ``_load``), so that
``deepbase-duck --help`` and a mistyped command answer at once instead of after seconds of
imports.
"""
from __future__ import annotations

import atexit
import os
import threading
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# engine.memory.bound_onednn_cache's setting (ONEDNN_CACHE_CAPACITY), made here, before any
# submodule can import torch, without importing the engine (and torch) itself
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from .errors import (ActivationError, DeepBaseError, EmptyDatasetError, HypothesisError,  # noqa: E402
                     UnknownNameError)

__version__ = "0.1.0"

_OPEN: "weakref.WeakSet" = weakref.WeakSet()

# names of the package that need the heavy modules, and where they come from: bound by _load
_LAZY = {
    "SCAN_MEMORY_LIMIT": ("engine.memory", None), "bound_onednn_cache": ("engine.memory", None),
    "memory_bytes": ("engine.memory", None), "store": ("store", ""),
    "Session": ("catalog", None), "_SESSIONS": ("catalog", None), "session_of": ("catalog", None),
    "CharAdapter": ("extraction", None), "Encoded": ("extraction", None), "ImageAdapter": ("extraction", None),
    "ModelAdapter": ("extraction", None), "Retain": ("extraction", None),
    "Hypothesis": ("hypotheses", None), "get_hypothesis": ("hypotheses", None), "hypothesis": ("hypotheses", None),
    "register_hypothesis": ("hypotheses", "register"), "held_versions": ("hypotheses.core", None),
    "hypothesis_library": ("hypotheses.library", ""), "report": ("reports", None),
    "read_records": ("corpora.files", None), "GridHypothesis": ("hypotheses.grid", None),
    "drop_hypothesis": ("hypotheses.regex", None),
}
_LOAD_LOCK = threading.RLock()
_load_state = "no"                         # "no", "loading" (by the thread holding the lock), "done"


def _load() -> None:
    """Import the heavy part of the package (the engine and torch, the catalog, the built-in
    hypotheses, reports) and bind the names of ``_LAZY``, once, in the order the package always
    imported them. A name looked up on the package while this runs (a submodule's ``from ..
    import store``) is not there yet: Python then imports the submodule itself."""
    global _load_state
    import importlib
    with _LOAD_LOCK:
        if _load_state != "no":            # done, or under way in this thread (a nested look-up)
            return
        _load_state = "loading"
        try:
            bound = {}
            for name, (module, attr) in _LAZY.items():
                mod = importlib.import_module(f".{module}", __name__)
                bound[name] = mod if attr == "" else getattr(mod, attr or name)
            globals().update(bound)
            _load_state = "done"
        finally:
            if _load_state != "done":      # interrupted (Ctrl-C) or failed: the next use tries again
                _load_state = "no"


def __getattr__(name: str):
    if name in _LAZY:
        _load()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


def connect(path: str | None = None, threads: int | None = None, progress: bool = True,
            scan_memory_limit: str | None = "128MB", read_only: bool = False):
    """Open (or create) the store at ``path`` (None: in memory) and return its DuckDB connection,
    with the catalog created, the macros of sql/ loaded and deepbase_duck's UDFs registered.

    ``scan_memory_limit``: DuckDB's memory limit while ``inspect``, ``extract`` or ``annotate``
    writes to a file-backed store (default '128MB', engine.memory.SCAN_MEMORY_LIMIT, spelled out
    here so that importing the package does not load the engine; None leaves DuckDB's own limit), restored
    after each; see engine/memory.py.

    Other threads: use ``dbd.cursor(con)``, one per thread (DuckDB 2.0 refuses concurrent calls
    on one connection). A plain ``con.cursor()`` sees the store's tables, views and pure-SQL
    macros (top_units, compare_scores, the sampling macros) but not the Python surface
    (``inspect``, ``register_model``, ... are TEMP macros, kept per DuckDB connection) nor the
    Python API; ``dbd.cursor`` gives both. Queries and catalog changes (inspect, extract,
    annotate, compare_layers, register_model, add_dataset, drop_dataset), exports and reports
    (which read many tables in turn and may update the catalog) from several cursors run one at
    a time per store (a second waits for the first); SQL over the stored tables runs
    concurrently. A store file is open once per process: connect again after ``close``.

    ``read_only=True``: open an existing store file without writing to it (DuckDB read-only:
    several processes may read it at once, and a file made read-only opens): the SQL surface and
    the Python API are there to read results (top_units, compare_scores, symbol_labels, reports,
    exports), and every call that writes (inspect, annotate, extract, register_model,
    add_dataset, define_hypothesis, ...) is refused before it starts, naming read-only. A store
    an earlier deepbase_duck wrote must be opened writable once first (its catalog is updated).
    """
    _load()
    import duckdb
    from .engine.extract import refresh_views
    from .errors import check_int

    if path == "":
        # DuckDB opened '' in memory, and the activations went to '<current folder>.acts', beside
        # it, where they stayed after close, for the next connect('') to find
        raise DeepBaseError("connect: path is ''; give the path of a store file, or None for a store in memory")
    if threads is not None:
        # (0 was DuckDB's default, every core, and 2.5 two threads; -1 DuckDB's syntax error)
        try:
            threads = check_int("connect: threads", threads, 1)
        except DeepBaseError as exc:
            raise DeepBaseError(f"{exc} (or None: DuckDB's default, one per core)") from None
    from .hypotheses.store import register_stored_hypotheses
    from .surface.udfs import register_udfs

    if scan_memory_limit is not None:
        memory_bytes(scan_memory_limit)           # a bad size fails here, not mid-scan
    earlier = _open_session(path)
    if earlier is not None:
        # DuckDB would hand out a second connection to the same database, whose UDFs this one
        # registered already (and a session of its own over the same activation folder)
        raise DeepBaseError(f"the store {path} is already open in this process as connection {earlier.con!r} "
                            f"(from an earlier deepbase_duck.connect): use that connection, or "
                            f"dbd.close() it first")
    if not isinstance(read_only, bool):
        raise DeepBaseError(f"read_only must be True or False, got {read_only!r}")
    con = store.open_database(path, threads, read_only=read_only)
    session = Session(con, path, store.activation_root(path), progress=progress)
    session.scan_memory_limit = scan_memory_limit
    _SESSIONS[con] = session
    try:
        try:
            register_udfs(session)
        except duckdb.CatalogException as exc:
            if "already exists" not in str(exc):
                raise
            raise DeepBaseError(f"the store {path} is still open in this process (a connection or cursor of an "
                                f"earlier deepbase_duck.connect was not closed with dbd.close): close it "
                                f"first") from None
        store.apply_sql(con, "python")
        if read_only:
            _temporary_views(session)
        else:
            refresh_views(session, clean=True)
        register_stored_hypotheses(con)           # the store's regex hypotheses, for this process too
    except BaseException:
        _SESSIONS.pop(con, None)                  # nothing of the failed connection stays open
        session.close()
        raise
    _OPEN.add(session)
    return con


def _temporary_views(session) -> None:
    """connect's ``refresh_views`` for a read-only store: the view of each behavior whose files are
    there, over this store's folder (which may have moved with the store since the stored view
    was made), as a TEMP view of the connection, which stands before the stored one; nothing is
    settled or dropped (that writes)."""
    from .engine.extract import view_sql
    for directory, view, width in store.q_all(
            session.con, "SELECT b.directory, b.view_name, b.width FROM behaviors b "
                         "WHERE EXISTS (SELECT 1 FROM behavior_parts p WHERE p.behavior_id = b.behavior_id)"):
        folder = session.act_root / directory
        if folder.is_dir() and any(folder.glob("part-*.parquet")):
            sql = view_sql(session, {"view_name": view, "directory": directory, "width": width})
            session.con.execute(sql.replace("CREATE OR REPLACE VIEW", "CREATE OR REPLACE TEMP VIEW", 1))


def _open_session(path: str | None):
    """The session of an open deepbase_duck.connect() to the store file ``path`` in this
    process, or None (always None in memory: each such store is its own)."""
    if path in (None, ":memory:"):
        return None
    import duckdb
    here = os.path.realpath(path)
    for s in list(_OPEN):
        if s.db_path in (None, ":memory:") or os.path.realpath(s.db_path) != here:
            continue
        try:
            s.con.list_filesystems()              # raises once the connection is closed
        except duckdb.ConnectionException:
            continue
        return s
    return None


def cursor(con):
    """A new cursor of ``con`` (a connection from ``connect``, or a cursor from here) for work in
    another thread, with all that ``con`` has: the SQL surface of sql/90_surface.sql (inspect,
    register_model, compare_layers, ...) and the Python API (``dbd.inspect(cur, ...)``), over the
    same store, models and activation folder. Use one per thread; DuckDB 2.0 refuses concurrent
    calls on one connection or cursor.

    Why not ``con.cursor()``: the Python surface's macros are TEMP macros, which DuckDB keeps per
    connection (a cursor is a connection of its own), since macros stored in the file would show
    in the DuckDB CLI and BI tools, where Python UDFs cannot run. ``con.cursor()`` still reads
    the store's tables, views and pure-SQL macros.

    ``cur.close()`` or ``dbd.close(cur)`` closes the cursor only; ``dbd.close(con)`` closes its
    cursors too (DuckDB closes a connection's cursors with it).
    """
    parent = _session(con)
    sub = parent.cursor_session()
    try:
        store.apply_sql(sub.con, "python")
        if store.is_read_only(sub.con):       # TEMP macros and views are the connection's own: again here
            store.apply_sql_read_only(sub.con)
            _temporary_views(sub)
    except BaseException:
        sub.con.close()
        raise
    _SESSIONS[sub.con] = sub
    return sub.con


def _session(con):
    """session_of(con), its refusal naming dbd.cursor for a plain cursor of a connection."""
    _load()
    try:
        return session_of(con)
    except DeepBaseError as exc:
        raise DeepBaseError(f"{exc} (for another thread, take a cursor with dbd.cursor(con), not con.cursor(): "
                            f"it has deepbase_duck's SQL surface and Python API)") from None


def close(con) -> None:
    """Close the connection (and delete the temporary activation folder of an in-memory store);
    of a cursor from ``dbd.cursor``, the cursor only."""
    _session(con).close()


@atexit.register
def _close_all():  # close connections before the interpreter tears DuckDB down
    for s in list(_OPEN):
        try:
            s.close()
        except Exception:
            pass


def register_model(con, name: str, adapter, params: dict | None = None) -> dict:
    """Register a model: a ModelAdapter, or a loader spec 'pkg.module:function' (+ params)."""
    return _session(con).register_model(name, adapter, params)


def add_dataset(con, name: str, records, description: str = "", replace: bool = False) -> int:
    """Store records (strings or dicts with 'text' and 'source') as a dataset."""
    return _session(con).add_dataset(name, records, description, replace)


def drop_dataset(con, name: str) -> dict:
    """Delete a dataset and all that was stored from its records (symbols, labels, activations
    with their views and files); query results (queries, scores) stay. Returns what was dropped."""
    _check_names("drop_dataset", "name", name, "dataset", many=False)
    return _session(con).drop_dataset(name)


def define_hypothesis(con, name: str, pattern: str, kind: str = "binary", flags: str = "", description: str = "",
                      replace: bool = False) -> dict:
    """Define a hypothesis by a regular expression (Python ``re``) and store it in the store, so
    that every process opening the store (the shell, another script) computes its labels; the
    SQL macro ``define_hypothesis`` mirrors it (hypotheses/regex.py). ``kind``: 'binary' (the
    matches' characters hold 1) or 'categorical' (the pattern's named groups are the
    categories); ``flags``: letters of a, i, m, s, x. Another definition of a stored name needs
    ``replace=True``. Returns the definition, with its version."""
    from .hypotheses.store import define_hypothesis as _define
    return _define(_session(con), name, pattern, kind, flags, description, replace)


def _check_names(call: str, what: str, value, one: str, objects: tuple = (), many: bool = True):
    """``value`` with a None, an empty name or a value that is no name refused by ``call``, naming
    it and, in a list, its place: the engine read them as names and answered "unknown hypothesis
    None" (SQL's NULL in a list arrives as None), as if the store lacked a hypothesis of that
    name. With ``many`` only the items of a list or tuple are checked (what else is given, None
    or a set, the engine answers for); else ``value`` itself, one name. ``objects``: the types
    taken besides strings (Hypothesis objects)."""
    def bad(x, where):
        if x is None:
            return f"{where} is None (NULL)"
        if isinstance(x, objects):
            return None
        if not isinstance(x, str):
            return f"{where} is {type(x).__name__} {x!r}, not a {one} name (a string)"
        if not x.strip():
            return f"{where} is the empty name {x!r}"
        return None
    if not many:
        why = bad(value, what)
        if why:
            raise DeepBaseError(f"{call}: {why}; give a {one} name")
    elif isinstance(value, (list, tuple)):
        for i, x in enumerate(value):
            why = bad(x, f"{what}[{i}]")
            if why:
                raise DeepBaseError(f"{call}: {why}; give a {one} name there or leave it out of the list "
                                    f"({what}={value!r})")
    return value


def annotate(con, hypotheses, dataset: str, record_ids=None) -> list[dict]:
    """Compute and store labels of hypotheses (names or Hypothesis objects) for a dataset."""
    from .hypotheses.core import Hypothesis, held_versions
    from .hypotheses.store import annotate as _annotate
    if hypotheses is None:                 # (else: 'NoneType' object is not iterable)
        raise DeepBaseError("annotate: hypotheses is None (NULL); give a hypothesis name or a list of them")
    _check_names("annotate", "hypotheses", hypotheses, "hypothesis", (Hypothesis,))
    _check_names("annotate", "dataset", dataset, "dataset", many=False)
    with held_versions():                  # each hypothesis' version as it is now, once for the run
        return _annotate(_session(con), hypotheses, dataset, record_ids)


def extract(con, model: str, layers, dataset: str, dtype: str = "float32", record_ids=None,
            batch_size: int = 16, pipeline: bool | None = None) -> list[dict]:
    """Store the activations of layers of a registered model over a dataset (cached, resumable).
    ``pipeline``: forward passes one batch ahead in a thread (None: where the model runs on CUDA)."""
    from .engine.extract import extract as _extract
    _check_names("extract", "model", model, "model", many=False)
    _check_names("extract", "layers", layers, "layer")
    _check_names("extract", "dataset", dataset, "dataset", many=False)
    return _extract(_session(con), model, layers, dataset, dtype, record_ids, batch_size, pipeline=pipeline)


def _options(fn, skip: int) -> list[str]:
    """The keyword options of engine function ``fn`` after its first ``skip`` parameters (the
    session and the positional ones), without its ``**`` catch-all."""
    import inspect as _pyinspect
    params = list(_pyinspect.signature(fn).parameters.values())[skip:]
    return [p.name for p in params if p.kind is not p.VAR_KEYWORD]


def _check_keywords(call: str, kwargs: dict, options, measures=(), named=()) -> dict:
    """``kwargs`` of ``call`` (dbd.inspect, dbd.compare_layers) checked before they reach the
    engine: ``max_records`` (the name the SQL macros and the CLI's --max-records use) is taken as
    ``limit`` (both given: an error), and a keyword that is neither one of ``options`` nor a
    measure name (a dict of that measure's parameters) is an UnknownKeywordError suggesting the
    closest name, instead of the engine's "parameters given for measure 'max_eror'"."""
    from .errors import UnknownKeywordError, _close_names
    kwargs = dict(kwargs)
    if "max_records" in kwargs:
        if "limit" in kwargs:
            raise UnknownKeywordError(f"{call}: give limit or max_records, not both (max_records is another name "
                                      f"of limit: the first N records by id)")
        kwargs["limit"] = kwargs.pop("max_records")
    for key in kwargs:
        if key in options or key in measures:
            continue
        settings = sorted({*options, "max_records"})
        close = _close_names(key, [*named, *settings, *measures], n=1)       # (regardless of case: Max_Error)
        if close:
            raise UnknownKeywordError(f"{call}: unknown keyword {key!r} (did you mean {close[0]}?)")
        shown = f"options: {', '.join(settings)}"
        if measures:
            shown += f"; or a measure name with a dict of its parameters: {', '.join(sorted(measures))}"
        raise UnknownKeywordError(f"{call}: unknown keyword {key!r}; {shown}")
    return kwargs


def inspect(con, model: str, layers, hypotheses, dataset: str, measures=("corr",), **kwargs):
    """Score every unit of ``layers`` against ``hypotheses``; returns a pyarrow.Table of scores
    (also stored in the ``scores`` table). ``kwargs``: the options of engine/inspect.py's
    ``inspect`` (``limit``, also spelled ``max_records`` as in SQL and the CLI: the first N records
    by id; ``max_error``, ``keep_activations``, ...) and per-measure parameter dicts
    (``corr={"intervals": "symbols"}``); any other keyword is an error naming the closest one."""
    from .engine.inspect import inspect as _inspect
    from .hypotheses.core import Hypothesis, held_versions
    from .inspectors import MEASURES
    kwargs = _check_keywords("inspect", kwargs, _options(_inspect, 6), MEASURES,
                             named=("model", "layers", "hypotheses", "dataset", "measures"))
    _check_names("inspect", "model", model, "model")               # (a list of checkpoints)
    _check_names("inspect", "layers", layers, "layer")
    _check_names("inspect", "hypotheses", hypotheses, "hypothesis", (Hypothesis,))
    _check_names("inspect", "dataset", dataset, "dataset", many=False)
    if measures is not None:                                        # None: the default, corr
        _check_names("inspect", "measures", measures, "measure")
    with held_versions():                  # each hypothesis' version as it is now, once for the query
        return _inspect(_session(con), model, layers, hypotheses, dataset, measures, **kwargs)


def compare_layers(con, groups, dataset: str, **kwargs):
    """Linear CKA between every pair of unit groups ('model:layer' or (model, layer)) over the
    same symbols of a dataset; returns a pyarrow.Table (also stored in ``similarities``).
    ``kwargs``: ``limit`` (or ``max_records``, as in SQL), ``batch_size``, ``device``,
    ``record_ids``, ``progress``; any other keyword is an error naming the closest one."""
    from .engine.compare import compare_layers as _compare
    kwargs = _check_keywords("compare_layers", kwargs, _options(_compare, 3), named=("groups", "dataset"))
    return _compare(_session(con), groups, dataset, **kwargs)


def export(con, out_dir: str, activations: bool = False, text: bool = False, overwrite: bool = False) -> dict:
    """Export scores (hive-partitioned by model and layer), the catalog and optionally the
    activations as Parquet, plus a DuckDB 1.5-readable ``study.duckdb`` of views over them."""
    from .exports import export_store
    if out_dir is None or (isinstance(out_dir, str) and not out_dir.strip()):
        # (None failed in pathlib with a TypeError; '' was the current folder)
        raise DeepBaseError(f"export: out_dir is {out_dir!r}; give the path of a folder to export to")
    return export_store(_session(con), out_dir, activations, text, overwrite)


__all__ = [
    "connect", "cursor", "close", "register_model", "add_dataset", "drop_dataset", "read_records", "define_hypothesis",
    "drop_hypothesis",
    "annotate", "extract", "inspect", "compare_layers", "export",
    "report",
    "Hypothesis", "hypothesis", "register_hypothesis", "get_hypothesis", "ModelAdapter", "CharAdapter",
    "Encoded", "Retain", "ImageAdapter", "GridHypothesis", "DeepBaseError", "UnknownNameError", "HypothesisError", "ActivationError",
    "EmptyDatasetError",
]
