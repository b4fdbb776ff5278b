"""Python UDFs behind the SQL table macros of sql/90_surface.sql.

DuckDB 2.0 has no Python table functions, so each entry point is a scalar Arrow UDF that takes
constant arguments and returns a LIST of STRUCT rows; the table macros UNNEST them. Inside a
UDF the connection that runs the outer query is busy, so the work runs on a cursor (a second
connection to the same database). Each UDF is a thin call of the same library function the
Python API calls, with the same arguments.

Errors: DuckDB shows only "Python exception occurred while executing the UDF: <Type>: <msg>";
our messages name the culprit, and the full traceback of the last failed call is kept in
``session.udf_tracebacks``: ``SELECT last_error()`` shows it (the macro over ``dbd_last_error(0)``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
import traceback
from decimal import Decimal, InvalidOperation

import pyarrow as pa

from ..catalog import DatasetExistsError, Session, loader_params
from ..errors import DeepBaseError, refused_for_input, without_caller
from ..inspectors.base import MEASURES

RESULT_STRUCT = ("STRUCT(query_id INTEGER, model VARCHAR, layer VARCHAR, unit INTEGER, hypothesis VARCHAR, "
                 "measure VARCHAR, score DOUBLE, n BIGINT, ci_low DOUBLE, ci_high DOUBLE, p_value DOUBLE, "
                 "q_value DOUBLE, detail VARCHAR)[]")
EXTRACT_STRUCT = ("STRUCT(model VARCHAR, layer VARCHAR, behavior_id INTEGER, view VARCHAR, dtype VARCHAR, "
                  "width INTEGER, extracted BIGINT, reused BIGINT, seconds DOUBLE)[]")
ANNOTATE_STRUCT = "STRUCT(hypothesis VARCHAR, labeled BIGINT, reused BIGINT)[]"
COMPARE_STRUCT = ("STRUCT(query_id INTEGER, dataset VARCHAR, model_a VARCHAR, layer_a VARCHAR, model_b VARCHAR, "
                  "layer_b VARCHAR, measure VARCHAR, score DOUBLE, n BIGINT)[]")
HYP_STRUCT = "STRUCT(name VARCHAR, kind VARCHAR, description VARCHAR, version VARCHAR)[]"
DEFINE_STRUCT = "STRUCT(name VARCHAR, kind VARCHAR, version VARCHAR, categories VARCHAR[])"
DROP_STRUCT = ("STRUCT(name VARCHAR, kind VARCHAR, pattern VARCHAR, flags VARCHAR, version VARCHAR, "
               "categories VARCHAR[], labeled_records BIGINT)")


def _cursor_session(session: Session) -> Session:
    """The session a UDF call works in: ``session`` over a cursor of its own, sharing its loaded
    models, what it has checked of them (their tensor shapes, tokenisations), its writer lock and
    its folder (Session.cursor_session)."""
    return session.cursor_session()


def _rows(arrays):
    """Turn the UDF's ChunkedArray arguments into per-row Python tuples."""
    cols = [a.to_pylist() for a in arrays]
    return list(zip(*cols)) if cols else []


# the threads running a deepbase_duck UDF now (ident -> calls under way): DuckDB runs a query's UDFs
# on its own worker threads, where no Ctrl-C reaches them (interrupt_udfs)
_RUNNING: dict[int, int] = {}
_RUNNING_LOCK = threading.Lock()


def interrupt_udfs() -> int:
    """Raise KeyboardInterrupt in every thread other than the main one that runs a deepbase_duck
    UDF now, as Ctrl-C raises it in the main thread; returns how many. Python delivers a signal
    to the main thread only, where DuckDB then merely waits for the UDF (an inspect scanned on to
    its end, stored its scores and only then reported 'Query interrupted')."""
    import ctypes
    main = threading.main_thread().ident
    n = 0
    with _RUNNING_LOCK:
        for ident in _RUNNING:
            if ident != main:
                n += ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                                ctypes.py_object(KeyboardInterrupt))
    return n


_CTRL_C_CHAINED = None        # the handler stop_udfs_on_ctrl_c installed (None: not installed)


def chained_ctrl_c():
    """The SIGINT handler ``stop_udfs_on_ctrl_c`` installed, or None."""
    return _CTRL_C_CHAINED


def stop_udfs_on_ctrl_c() -> bool:
    """Make Ctrl-C stop the deepbase_duck UDFs of every connection's queries (``interrupt_udfs``)
    as well as the main thread: once per process, from the main thread, and only where Ctrl-C
    raises KeyboardInterrupt through Python's own handler (a program's or notebook's own
    handler is left as it is). Without it, ``con.sql("SELECT * FROM inspect(...)")`` interrupted
    in a script only stopped the DuckDB query, which waited for the UDF to scan to its end and
    store its scores. The handler stays for the life of the process (after ``dbd.close`` it
    finds no UDF to stop and does what Python's own does). Returns whether it was installed now."""
    import signal
    global _CTRL_C_CHAINED
    if _CTRL_C_CHAINED or threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return False

    def handler(signum, frame):
        interrupt_udfs()
        previous(signum, frame)
    signal.signal(signal.SIGINT, handler)
    _CTRL_C_CHAINED = handler
    return True


class KeptTraceback(str):
    """A kept UDF traceback's text (what last_error() shows), with ``input_error``: whether the
    call was refused for its input (errors.refused_for_input)."""
    input_error = False


def _udf(session: Session, fn):
    """Run ``fn(sub_session, *row)`` for each input row; keep tracebacks; re-raise plainly."""
    @functools.wraps(fn)
    def wrapper(*arrays):
        out = []
        ident = threading.get_ident()
        with _RUNNING_LOCK:
            _RUNNING[ident] = _RUNNING.get(ident, 0) + 1
        try:
            sub = _cursor_session(session)
            try:
                for row in _rows(arrays):
                    out.append(fn(sub, *row))
            except BaseException as exc:       # an interruption too: last_error() must not show an older one
                kept = KeptTraceback(traceback.format_exc())
                kept.input_error = refused_for_input(exc)      # (the shell shows a refusal as one line)
                session.udf_tracebacks.append(kept)
                del session.udf_tracebacks[:-20]
                _notes_in_message(exc)
                raise
            finally:
                sub.con.close()
        finally:
            with _RUNNING_LOCK:
                if _RUNNING[ident] == 1:
                    del _RUNNING[ident]
                else:
                    _RUNNING[ident] -= 1
        return out
    return wrapper


def _notes_in_message(exc: BaseException) -> None:
    """DuckDB shows a UDF's exception as its type and ``str()``, without the notes Python
    tracebacks print: a note the engine added (the records of the batch a model failed on,
    engine/extract.py ``naming_records``) goes into the message's one argument, where there is
    one, so that a SQL user sees it too (``last_error()`` keeps the whole traceback)."""
    from ..engine.extract import NOTE_PREFIX
    notes = [n for n in (getattr(exc, "__notes__", None) or []) if n.startswith(NOTE_PREFIX)]
    if notes and len(exc.args) == 1 and isinstance(exc.args[0], str) and notes[-1] not in exc.args[0]:
        exc.args = (f"{exc.args[0]} ({notes[-1]})",)


def _list(v, call: str | None = None, what: str = ""):
    """A SQL list argument as a Python list (one text as a list of one). With ``call``: a NULL or
    empty item is refused naming its place, counted from 1 as SQL does (the engine read NULL as a
    name: "unknown hypothesis None")."""
    if v is None:
        return None
    out = [v] if isinstance(v, str) else list(v)
    if call is not None:
        for i, x in enumerate(out, 1):
            if x is None or (isinstance(x, str) and not x.strip()):
                raise DeepBaseError(f"{call}: {what}[{i}] is {'NULL' if x is None else repr(x)}; give a name there "
                                    f"or leave it out of the list")
    return out


def _default(v, default):
    """A SQL argument: NULL gives ``default``; any other value (0 and '' included) is passed on,
    for the library to check. (``v or default`` took engine := '' and dtype := '' for 'local' and
    'float32', which Python's inspect refuses by name.)"""
    return default if v is None else v


def _models(model: str):
    """A model name, or several, as the macro passes them: ``to_json(model)``, so that a list
    arrives as a JSON array and any name (brackets, commas, quotes, spaces) comes through as
    registered."""
    return None if model is None else json.loads(model)


def _number(name: str, text: str | None):
    """A whole-number SQL argument, which the macro passes as text so that nothing is rounded on
    the way (CAST(2.5 AS BIGINT) is 3): an int when it is a whole number (2.0 too), else the
    fraction as a float, for the library's own check to refuse by name as in Python.

    Read exactly (Decimal), not through a float: a float holds no fraction beyond 2^52 and no odd
    integer beyond 2^53, so seed := 9007199254740993.0 ran as seed 9007199254740992 and seed :=
    4503599627370496.5 as seed 4503599627370496, each a scan order other than the one the
    sampling macros give that seed (they refuse the fraction). A fraction that no float keeps is
    refused here, naming it as given."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value, exact = float(text), Decimal(text.strip())
    except (ValueError, InvalidOperation):
        raise DeepBaseError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value):    # NaN, infinity (or beyond a float): for the library to refuse
        return value
    if exact == exact.to_integral_value():
        return int(exact)
    if value.is_integer():          # a fraction the float lost: the library would take it as whole
        raise DeepBaseError(f"{name} must be a whole number, got {text}")
    return value


@contextlib.contextmanager
def _as_called(sql_name: str, *library_names: str):
    """A refusal of the library function a SQL function runs names the SQL function, which the
    user called ('add_ptb_dataset: n ...', not 'ptb_records: n ...' or a bare 'unknown split')."""
    try:
        yield
    except DeepBaseError as exc:
        if str(exc).startswith(sql_name + ": "):
            raise
        raise type(exc)(f"{sql_name}: {without_caller(str(exc), library_names)}") from None


def _exists(fn: str, name: str, appends: str) -> str:
    """The error of a SQL dataset builder whose dataset name holds other records: the library's
    message says replace=True, which these functions do not take."""
    return (f"{fn}: dataset {name!r} already exists with other records{appends}; give this one another name, or "
            f"delete the stored one first (Python: dbd.drop_dataset(con, {name!r}))")


def register_udfs(session: Session) -> None:
    con = session.con
    stop_udfs_on_ctrl_c()
    from ..engine.extract import extract
    from ..engine.inspect import inspect
    from ..hypotheses.core import held_versions, registry
    from ..hypotheses.store import annotate

    def do_inspect(sub, model, layers, hypotheses, dataset, measures, max_records, batch_size, keep, params,
                   baseline, control, permutations, max_error, seed, engine=None, ray_address=None, top_k=None,
                   reuse=True, plateau_tol=None, min_support=None, device=None, stable_windows=None,
                   baseline_seed=None, dtype=None):
        try:
            measure_params = json.loads(params) if params else {}
        except json.JSONDecodeError as exc:
            raise DeepBaseError(f"inspect: params is not valid JSON ({exc}): {params!r}") from None
        if not isinstance(measure_params, dict) or not all(isinstance(v, dict) for v in measure_params.values()):
            raise DeepBaseError("inspect: params must be a JSON object of per-measure objects, e.g. "
                                "'{\"probe\": {\"l1\": 0.001}}'")
        for key in measure_params:       # only measures: other keys would reach inspect() as its settings
            if key not in MEASURES:
                raise DeepBaseError(f"inspect: params key {key!r} is not a measure; valid measures: "
                                    f"{', '.join(sorted(MEASURES))} (settings of the query itself are inspect's own "
                                    f"arguments, e.g. seed := 1)")
        n = {k: _number(f"inspect: {k}", v) for k, v in
             [("max_records", max_records), ("batch_size", batch_size), ("permutations", permutations),
              ("seed", seed), ("top_k", top_k), ("min_support", min_support), ("stable_windows", stable_windows),
              ("baseline_seed", baseline_seed)]}
        with held_versions():              # each hypothesis' version as it is now, once for the query
            t = inspect(sub, _models(model), _list(layers, "inspect", "layers"),
                        _list(hypotheses, "inspect", "hypotheses"), dataset,
                        _list(measures, "inspect", "measures") or ["corr"], limit=n["max_records"],
                        batch_size=_default(n["batch_size"], 16), keep_activations=bool(keep), progress=sub.progress,
                        baseline=bool(baseline), control=bool(control), permutations=n["permutations"] or 0,
                        max_error=max_error, seed=_default(n["seed"], 0), engine=_default(engine, "local"),
                        ray_address=ray_address, top_k=n["top_k"], reuse=reuse is not False,
                        plateau_tol=plateau_tol, min_support=n["min_support"] or 0, device=device or None,
                        stable_windows=n["stable_windows"],
                        baseline_seed=_default(n["baseline_seed"], 0), dtype=_default(dtype, "float32"), **measure_params)
        return t.to_pylist()

    def do_compare(sub, groups, dataset, max_records, batch_size, device=None):
        from ..engine.compare import compare_layers
        return compare_layers(sub, _list(groups), dataset,
                              limit=_number("compare_layers: max_records", max_records),
                              batch_size=_default(_number("compare_layers: batch_size", batch_size), 16),
                              device=device or None, progress=sub.progress).to_pylist()

    def do_extract(sub, model, layers, dataset, dtype, batch_size):
        return extract(sub, model, _list(layers, "extract_activations", "layers"), dataset, _default(dtype, "float32"), None,
                       _default(_number("extract_activations: batch_size", batch_size), 16), progress=sub.progress)

    def do_annotate(sub, hypotheses, dataset):
        with held_versions():
            return annotate(sub, _list(hypotheses, "annotate", "hypotheses"), dataset, progress=sub.progress)

    def do_register(sub, name, loader, params):
        info = sub.register_model(name, loader, loader_params(params, f"register_model({name!r}): params"))
        session.adapters[name] = sub.adapters[name]
        return info["checksum"]

    def do_hypotheses(sub, _dummy):
        return [{"name": h.name, "kind": h.kind, "description": h.description, "version": h.version}
                for h in sorted(registry().values(), key=lambda h: h.name)]

    def do_define_hypothesis(sub, name, pattern, kind, flags, description, replace):
        from ..hypotheses.store import define_hypothesis
        d = define_hypothesis(sub, name, pattern, kind, flags, description, replace)
        return {k: d[k] for k in ("name", "kind", "version", "categories")}

    def do_drop_hypothesis(sub, name):
        from ..hypotheses.regex import drop_hypothesis
        return drop_hypothesis(sub, name)

    def do_last_error(sub, _dummy):
        return session.udf_tracebacks[-1] if session.udf_tracebacks else None

    def do_add_stdlib(sub, name, split, limit_chars, max_chars):
        from ..corpora.code import code_records          # as the CLI's add-stdlib and the demo
        split = _default(split, "heldout")               # (only NULL: split := '' is refused by name)
        with _as_called("add_stdlib_dataset", "code_records", "stdlib_records"):
            recs = code_records(split, max_chars=_default(_number("add_stdlib_dataset: max_chars", max_chars), 2000),
                                limit_chars=_number("add_stdlib_dataset: limit_chars", limit_chars))
        try:
            return sub.add_dataset(name, recs, f"Python standard library, {split} split")
        except DatasetExistsError:      # the library says replace=True, which the SQL function has not
            raise DatasetExistsError(_exists("add_stdlib_dataset", name, " (it appends only to records it stored with "
                                             "the same split and max_chars, for a larger limit_chars)")) from None

    def do_add_ptb(sub, name, split, n, seed):
        from ..corpora.ptb import ptb_records
        n, seed = _number("add_ptb_dataset: n", n), _default(_number("add_ptb_dataset: seed", seed), 0)
        split = _default(split, "test")
        with _as_called("add_ptb_dataset", "ptb_records"):
            recs = ptb_records(split, n, seed)
        try:
            return sub.add_dataset(name, recs, f"Penn Treebank (Mikolov LM text), {split} split, "
                                               f"{len(recs)} sentences, seed {seed or 0}")
        except DatasetExistsError:
            raise DatasetExistsError(_exists("add_ptb_dataset", name, "")) from None

    specs = [
        ("dbd_inspect", do_inspect, ["VARCHAR", "VARCHAR[]", "VARCHAR[]", "VARCHAR", "VARCHAR[]", "VARCHAR",
                                     "VARCHAR", "BOOLEAN", "VARCHAR", "BOOLEAN", "BOOLEAN", "VARCHAR", "DOUBLE",
                                     "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "BOOLEAN", "DOUBLE", "VARCHAR",
                                     "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR"],
         RESULT_STRUCT),
        ("dbd_compare", do_compare, ["VARCHAR[]", "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR"], COMPARE_STRUCT),
        ("dbd_extract", do_extract, ["VARCHAR", "VARCHAR[]", "VARCHAR", "VARCHAR", "VARCHAR"], EXTRACT_STRUCT),
        ("dbd_annotate", do_annotate, ["VARCHAR[]", "VARCHAR"], ANNOTATE_STRUCT),
        ("dbd_register_model", do_register, ["VARCHAR", "VARCHAR", "VARCHAR"], "VARCHAR"),
        ("dbd_hypotheses", do_hypotheses, ["INTEGER"], HYP_STRUCT),
        ("dbd_define_hypothesis", do_define_hypothesis, ["VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR",
                                                         "BOOLEAN"], DEFINE_STRUCT),
        ("dbd_drop_hypothesis", do_drop_hypothesis, ["VARCHAR"], DROP_STRUCT),
        ("dbd_last_error", do_last_error, ["INTEGER"], "VARCHAR"),
        ("dbd_add_stdlib_dataset", do_add_stdlib, ["VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR"], "BIGINT"),
        ("dbd_add_ptb_dataset", do_add_ptb, ["VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR"], "BIGINT"),
    ]
    for name, fn, params, ret in specs:
        con.create_function(name, _fixed_arity(_udf(session, fn), len(params)), params, ret, type="arrow",
                            null_handling="special", side_effects=True)


def _fixed_arity(wrapped, n: int):
    """DuckDB matches declared parameter types against the Python signature, so the UDF needs
    exactly ``n`` positional parameters (a *args function is refused)."""
    names = ", ".join(f"a{i}" for i in range(n))
    fn = eval(f"lambda {names}: _pa.array(_w({names}))", {"_pa": pa, "_w": wrapped})  # noqa: S307
    fn.__name__ = wrapped.__name__
    return fn
