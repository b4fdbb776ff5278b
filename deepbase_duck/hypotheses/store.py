"""Materialise hypothesis labels in the store, once per (hypothesis version, dataset, record).

Labels are computed in Python from each record's text and appended in transactions of a few
hundred records, together with the rows of ``labeled_records`` that say which records are done:
an interrupted run resumes where it stopped, and labels are reused by every model.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import store
from ..errors import HypothesisError, UnknownNameError, check_name
from .core import Hypothesis, is_builtin, register, registry
from .regex import RegexHypothesis, regex_hypothesis
from ..progress import progress_bar

CHUNK = 256


def catalog_hypothesis(con, name: str) -> dict | None:
    row = store.q_one(con, "SELECT name, kind, version, categories, description FROM hypotheses WHERE name = ?",
                      [name])
    if row is None:
        return None
    return {"name": row[0], "kind": row[1], "version": row[2], "categories": row[3], "description": row[4]}


def resolve(con, names) -> list[dict]:
    """Catalog descriptions of ``names`` (one name or Hypothesis, or a list of them): a registered
    Python hypothesis wins; then a regular-expression hypothesis defined in this store (its
    stored definition, whatever another store opened in this process defines under that name);
    a name known only to the store (labels computed in another session) is used with its stored
    labels."""
    if isinstance(names, (str, Hypothesis)):
        names = [names]
    out = []
    for name in names:
        live = registry().get(name) if isinstance(name, str) else None
        defined = stored_definition(con, name) if isinstance(name, str) and (
            live is None or isinstance(live, RegexHypothesis)) else None
        if isinstance(name, Hypothesis):
            h = name
        elif defined is not None:
            h = hypothesis_of_definition(defined)
        elif live is not None:
            h = live
            _warn_if_shadowing(con, name, live)
        else:
            row = catalog_hypothesis(con, name)
            if row is None:
                stored = [r[0] for r in store.q_all(con, "SELECT name FROM hypotheses")]
                raise UnknownNameError("hypothesis", name, set(registry()) | set(stored))
            out.append(dict(row, live=None))
            continue
        version = h.version
        _check_stored_meaning(con, h, version)
        out.append({"name": h.name, "kind": h.kind, "version": version,
                    "categories": list(h.categories) if h.categories else None, "live": h})
    return out


def _check_stored_meaning(con, h: Hypothesis, version: str) -> None:
    """Refuse ``h`` where the store holds labels of its version computed as another kind, with
    other categories or with other settings (``version_settings``: an image grid's size and
    coverage). A version given by hand (``version="1"``) stays the same when these are edited,
    and the stored values (a categorical label is the code of its category, 0..K-1; a grid
    hypothesis' label is a cell's index) were read with the new meaning: reordered categories
    swapped the labels, a categorical hypothesis made binary read its codes as 0/1, the cells of
    a 2x2 grid were read as the first cells of a 4x4 one. (A version computed from the code
    changes with all of them.) Settings are known for labels stored since they were recorded
    (``stored_settings``); those of older stores are not checked."""
    row = catalog_hypothesis(con, h.name)
    if row is None or row["version"] != version:
        return
    cats = list(h.categories) if h.categories else None
    settings, known = h.version_settings(), stored_settings(con, h.name, version)
    if row["kind"] == h.kind and (list(row["categories"]) if row["categories"] else None) == cats and \
            (known is None or known == settings):
        return
    if not _labels_stored(con, h.name, version):
        return                               # nothing stored under the old meaning
    was = row["kind"] + (f" with categories {list(row['categories'])}" if row["categories"] else "")
    now = h.kind + (f" with categories {cats}" if cats else "")
    if was == now:                           # the settings differ
        was, now = f"with settings {_settings_text(known)}", f"has settings {_settings_text(settings)}"
    else:
        now = "is now " + now
        was = "as " + was
    raise HypothesisError(
        f"hypothesis {h.name!r}: this store holds labels of its version {version!r} computed {was}, and it "
        f"{now} under the same version, so those labels would be read with the new meaning; give it "
        f"a new version (version=...), or none, so that its version follows its code and settings")


def _settings_text(settings: str) -> str:
    return repr(settings) if settings else "none"


def _labels_stored(con, name: str, version: str) -> bool:
    return store.q_one(con, "SELECT 1 FROM labeled_records WHERE hypothesis = ? AND version = ? LIMIT 1",
                       [name, version]) is not None


def _settings_key(name: str) -> str:
    """The dbd_meta key of the settings a hypothesis' catalog version was computed with (dbd_meta,
    a key-value table every store holds: no new column for stores written before to migrate)."""
    return f"hypothesis_settings {name}"


def stored_settings(con, name: str, version: str) -> str | None:
    """The ``version_settings`` that the labels of hypothesis ``name`` at ``version`` are computed
    with, as the store recorded them with its catalog row; None where unknown (a store written
    before they were recorded, or a record of another version)."""
    import json
    row = store.q_one(con, "SELECT value FROM dbd_meta WHERE key = ?", [_settings_key(name)])
    if row is None:
        return None
    try:
        got = json.loads(row[0])
        return got["settings"] if got.get("version") == version and isinstance(got.get("settings"), str) else None
    except (ValueError, TypeError, AttributeError, KeyError):
        return None                          # a row edited by hand: unknown


_SHADOWING_WARNED: set = set()


def _warn_if_shadowing(con, name: str, live) -> None:
    """Warn (once per name and process) when a Python hypothesis registered in this process
    takes the place of a regular expression this store defines under the same name: the Python
    one is used (resolve), which a user who defined the regex in SQL would not guess."""
    if isinstance(live, RegexHypothesis) or name in _SHADOWING_WARNED:
        return
    defined = stored_definition(con, name)
    if defined is None:
        return
    _SHADOWING_WARNED.add(name)
    import warnings
    warnings.warn(f"hypothesis {name!r}: this store defines it as the regular expression {defined['pattern']!r}, "
                  f"and a Python hypothesis of that name is registered in this process; the Python one is used "
                  f"(its labels are stored under its own version). Rename one of them to keep both",
                  UserWarning, stacklevel=3)


# -- regular-expression hypotheses stored with the store (hypotheses/regex.py) ----------------
_DEFINITION_COLUMNS = ("name", "kind", "pattern", "flags", "categories", "description", "version")


def stored_definition(con, name: str) -> dict | None:
    """The stored definition of the regular-expression hypothesis ``name``, or None."""
    row = store.q_one(con, f"SELECT {', '.join(_DEFINITION_COLUMNS)} FROM hypothesis_definitions WHERE name = ?",
                      [name])
    return None if row is None else dict(zip(_DEFINITION_COLUMNS, row))


def stored_definitions(con) -> list[dict]:
    """Every stored definition, by name."""
    rows = store.q_all(con, f"SELECT {', '.join(_DEFINITION_COLUMNS)} FROM hypothesis_definitions ORDER BY name")
    return [dict(zip(_DEFINITION_COLUMNS, r)) for r in rows]


_BUILT: dict[tuple, RegexHypothesis] = {}     # a definition's values -> its hypothesis, built once


def hypothesis_of_definition(d: dict) -> RegexHypothesis:
    """The RegexHypothesis of a stored definition (checked again: a row edited by hand, or a
    pattern another Python's ``re`` reads otherwise, is refused by name)."""
    key = (d["name"], d["kind"], d["pattern"], d["flags"], d["description"] or "")
    h = _BUILT.get(key)
    if h is None:
        try:
            h = regex_hypothesis(d["name"], d["pattern"], d["kind"], d["flags"], d["description"] or "")
        except HypothesisError as exc:
            raise HypothesisError(f"the stored definition of hypothesis {d['name']!r} (table "
                                  f"hypothesis_definitions) cannot be used: {exc}") from None
        _BUILT[key] = h
    return h


def register_stored_hypotheses(con) -> list[str]:
    """Register in this process the regular-expression hypotheses stored in the store of ``con``
    (``connect`` calls it), so that ``available_hypotheses()``, the CLI and every query take them
    by name; returns their names. A name this process already holds for a built-in or Python
    hypothesis keeps it (a warning says so); a stored definition that cannot be read is skipped
    with a warning, so that the store still opens."""
    import warnings
    names = []
    for d in stored_definitions(con):
        held = registry().get(d["name"])
        if held is not None and not isinstance(held, RegexHypothesis):
            warnings.warn(f"hypothesis {d['name']!r} of this process ({held.source}) hides the regular-expression "
                          f"hypothesis of that name stored in the store ({d['pattern']!r}): queries use the Python one",
                          stacklevel=2)
            continue
        try:
            register(hypothesis_of_definition(d), stored_name=True)
        except HypothesisError as exc:
            warnings.warn(str(exc), stacklevel=2)
            continue
        names.append(d["name"])
    return names


def _not_null(value, what: str):
    if value is None:
        raise HypothesisError(f"define_hypothesis: {what} is NULL")
    return value


@store.one_writer
def define_hypothesis(session, name, pattern, kind="binary", flags="", description="",
                      replace=False) -> dict:
    """Define (or, with ``replace``, redefine) the regular-expression hypothesis ``name``: store
    its definition in the store and register it in this process. Refused: a name of a built-in
    or Python hypothesis of this process, or of one whose labels the store holds from Python
    code; another definition under a stored name without ``replace`` (the same one again is
    accepted as it is). Returns the definition (its version follows kind, pattern and flags, so
    an edited pattern recomputes the labels at their next use)."""
    con = session.con
    for value, what in ((name, "name"), (pattern, "pattern"), (kind, "kind"), (flags, "flags"),
                        (replace, "replace")):
        _not_null(value, what)
    if not isinstance(replace, bool):
        raise HypothesisError(f"define_hypothesis: replace must be true or false, got {replace!r}")
    check_name("hypothesis", name, lambda n: stored_definition(con, n) is not None or
               catalog_hypothesis(con, n) is not None, HypothesisError)
    h = regex_hypothesis(name, pattern, kind, flags, description)
    held = registry().get(h.name)
    if held is not None and not isinstance(held, RegexHypothesis):
        what = "a built-in hypothesis" if is_builtin(held) else f"a Python hypothesis of this process ({held.source})"
        raise HypothesisError(f"define_hypothesis: the name {h.name!r} is {what}; give the new one another name")
    with store.Transaction(con):
        old = stored_definition(con, h.name)
        if old is None:
            row = catalog_hypothesis(con, h.name)
            if row is not None and not replace:
                raise HypothesisError(
                    f"define_hypothesis: the store holds labels of a hypothesis named {h.name!r} computed by Python "
                    f"code ({row['kind']}); give the new one another name, or replace := true (Python: "
                    f"replace=True) to define {h.name!r} by this pattern instead")
        elif [old[k] for k in ("kind", "pattern", "flags", "description")] != \
                [h.kind, h.pattern, h.flags, h.description]:
            if not replace:
                raise HypothesisError(
                    f"define_hypothesis: hypothesis {h.name!r} is already defined in this store as {old['kind']} "
                    f"pattern {old['pattern']!r}" + (f" flags {old['flags']!r}" if old["flags"] else "") +
                    "; give replace := true (Python: replace=True) to redefine it (its labels are then "
                    "computed again), or another name")
        con.execute("DELETE FROM hypothesis_definitions WHERE name = ?", [h.name])
        con.execute("INSERT INTO hypothesis_definitions (name, kind, pattern, flags, categories, description, "
                    "version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [h.name, h.kind, h.pattern, h.flags, list(h.categories) if h.categories else None,
                     h.description, h.version])
    register(hypothesis_of_definition(stored_definition(con, h.name)), stored_name=True)
    return h.definition()


#: Catalog rows of new versions waiting for their first stored labels: (name, version) -> the
#: row's values (``_catalog_row``), written by append_labels in the transaction that stores them.
_WAITING: dict[tuple[str, str], list] = {}


def _catalog_row(h: Hypothesis, version: str) -> list:
    """The catalog row's values of ``h`` at ``version``, and last the settings its labels are
    computed with (recorded in dbd_meta: ``stored_settings``)."""
    return [h.name, h.kind, h.description, version, list(h.categories) if h.categories else None, h.source,
            h.version_settings()]


def _write_catalog_row(con, values: list, settings: bool = True) -> None:
    """Write the catalog row of ``values`` (``_catalog_row``) and, with ``settings``, record its
    settings for its version."""
    import json
    con.execute("DELETE FROM hypotheses WHERE name = ?", [values[0]])
    con.execute("INSERT INTO hypotheses (name, kind, description, version, categories, source) "
                "VALUES (?, ?, ?, ?, ?, ?)", values[:6])
    if settings:
        con.execute("INSERT INTO dbd_meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [_settings_key(values[0]), json.dumps({"version": values[3], "settings": values[6]})])


def upsert_catalog(con, h: Hypothesis, version: str | None = None) -> None:
    """Bring the catalog row of ``h`` to ``version`` (default: its current one), kind,
    categories and description now (a description edited alone changes no version: the labels
    stay), and record its settings. (``labels_to_compute`` does so only where no labels of the
    row's version are stored; else the row changes with the first labels of the new version, see
    there.) Settings not recorded (a store written before they were) while labels of this
    version are stored stay unknown: the labels may have been computed with others."""
    values = _catalog_row(h, h.version if version is None else version)
    row = catalog_hypothesis(con, h.name)
    same = bool(row) and [row["version"], row["kind"], row["categories"], row["description"]] == \
        [values[3], values[1], values[4], values[2]]
    known = stored_settings(con, h.name, values[3])
    record = known != values[6] and (known is not None or not _labels_stored(con, h.name, values[3]))
    if same and not record:
        return
    with store.Transaction(con):
        _write_catalog_row(con, values, settings=record)


def missing_records(con, hyps: list[dict], dataset: str, record_ids: np.ndarray) -> dict[str, np.ndarray]:
    """For each hypothesis, the ids among ``record_ids`` whose labels (of its version) are not
    stored yet; one query for all of them."""
    ids = np.asarray(record_ids, dtype=np.int64)
    wanted = pa.table({"hypothesis": pa.array([h["name"] for h in hyps], pa.string()),
                       "version": pa.array([h["version"] for h in hyps], pa.string())})
    con.register("__dbd_label_ids", pa.table({"record_id": pa.array(ids.astype(np.int32))}))
    con.register("__dbd_label_hyps", wanted)
    try:
        done = store.q_arrow(con, "SELECT l.hypothesis, l.record_id FROM labeled_records l "
                                  "JOIN __dbd_label_hyps w USING (hypothesis, version) "
                                  "SEMI JOIN __dbd_label_ids i ON i.record_id = l.record_id "
                                  "WHERE l.dataset = ?", [dataset])
    finally:
        con.unregister("__dbd_label_ids")
        con.unregister("__dbd_label_hyps")
    names = done.column(0).to_numpy(zero_copy_only=False)
    recs = done.column(1).to_numpy().astype(np.int64)
    return {h["name"]: np.setdiff1d(ids, recs[names == h["name"]]) for h in hyps}


def labels_to_compute(con, hyps: list[dict], dataset: str, record_ids) -> dict[str, np.ndarray]:
    """For each hypothesis (``resolve``'s dicts), the records among ``record_ids`` whose labels
    must be computed; raises when one is needed from a hypothesis known only to the store, and
    brings the catalog row of every hypothesis with Python code to its current version.

    Where labels of the row's (older) version are stored and this version has labels to compute,
    the row changes only with the first labels of the new version (append_labels, one
    transaction), as the old labels go: until then the catalog, which the SQL macros
    (``symbol_labels``), reports and processes without the hypothesis' code read, names the
    version whose labels the store holds. A call that fails before storing any (an edited
    hypothesis raising on its first record) leaves both as they were."""
    missing = missing_records(con, hyps, dataset, record_ids)
    for h in hyps:
        gap = missing[h["name"]]
        if len(gap) and h["live"] is None:
            raise HypothesisError(
                f"hypothesis {h['name']!r} is known to this store only by its stored labels, and "
                f"{len(gap)} selected record(s) of dataset {dataset!r} have none (record ids "
                f"{', '.join(map(str, gap[:5].tolist()))}{', ...' if len(gap) > 5 else ''}): register its "
                f"Python code in this process (@dbd.hypothesis) to label them, or select only labelled records")
    for h in hyps:
        if h["live"] is None:
            continue
        row = catalog_hypothesis(con, h["name"])
        if row is not None and row["version"] != h["version"] and len(missing[h["name"]]) and store.q_one(
                con, "SELECT 1 FROM labeled_records WHERE hypothesis = ? AND version = ? LIMIT 1",
                [h["name"], row["version"]]) is not None:
            _WAITING[(h["name"], h["version"])] = _catalog_row(h["live"], h["version"])
        else:
            upsert_catalog(con, h["live"], h["version"])
    return missing


@store.one_writer
def annotate(session, hypotheses, dataset: str, record_ids=None, progress: bool | None = None) -> list[dict]:
    """Compute and store the labels of ``hypotheses`` (a name or Hypothesis, or a list of them) for
    the records of ``dataset`` (all, or ``record_ids``: each a record of the dataset, a repeated
    one counted once). Returns one summary dict per hypothesis.

    Records are processed in chunks; each chunk's labels of every hypothesis and the rows of
    ``labeled_records`` that mark them done are appended in one transaction, so an interrupted
    run keeps its finished chunks and resumes after them. DuckDB's memory is capped meanwhile
    on a file-backed store (engine/memory.py)."""
    from ..engine.memory import capped_store_memory   # (engine imports this module)
    with capped_store_memory(session):
        return _annotate(session, hypotheses, dataset, record_ids, progress)


def _annotate(session, hypotheses, dataset: str, record_ids=None, progress: bool | None = None) -> list[dict]:
    """annotate's work; the store's DuckDB memory is capped around it (engine/memory.py)."""
    con = session.con
    session.check_dataset(dataset)
    ids = session.select_records(dataset, record_ids)     # checked; a repeated id counts once
    hyps, seen = resolve(con, hypotheses), set()
    hyps = [h for h in hyps if not (h["name"] in seen or seen.add(h["name"]))]   # a name given twice: once
    missing = labels_to_compute(con, hyps, dataset, ids)
    todo = np.unique(np.concatenate([m for m in missing.values()])) if hyps else np.zeros(0, np.int64)
    need = {h["name"]: set(missing[h["name"]].tolist()) for h in hyps}
    bar = progress_bar(len(todo), f"labels {dataset}", "rec", session.progress if progress is None else progress)
    checked = set()                      # hypothesis versions whose other versions are gone (append_labels)
    for lo in range(0, len(todo), CHUNK):
        chunk = todo[lo:lo + CHUNK]
        texts = session.texts(dataset, chunk)
        rows = []
        for h in hyps:
            live = h["live"]
            rids = [int(r) for r in chunk if int(r) in need[h["name"]]]
            got = live.spans_many([texts[r] for r in rids], [f"{dataset}:{r}" for r in rids])
            rows.extend((live.name, h["version"], r, *spans) for r, spans in zip(rids, got))   # the query's
        append_labels(con, dataset, rows, checked)
        bar.update(len(chunk))
    bar.close()
    return [{"hypothesis": h["name"], "labeled": int(len(missing[h["name"]])),
             "reused": int(len(ids) - len(missing[h["name"]]))} for h in hyps]


def append_labels(con, dataset: str, rows: list, checked: set | None = None) -> None:
    """Append computed labels, rows of (hypothesis, version, record_id, starts, ends, values),
    and their ``labeled_records`` marks (one per row, also for a record without spans) in one
    transaction: a (hypothesis, record) is marked done exactly when its spans are stored. The
    labels of other versions of these hypotheses, on every dataset, are deleted in the same
    transaction, and a catalog row waiting for this version's first labels (labels_to_compute)
    is written (the store keeps one version of a hypothesis: the one whose labels it holds).

    ``checked``: a set the caller keeps over one call's chunks (one writer at a time: no other
    version can be stored meanwhile); the (hypothesis, version) pairs in it are not looked at
    again, and those of these rows are added once they are stored."""
    if not rows:
        return
    n = [len(r[3]) for r in rows]
    total = int(sum(n))
    row_of = pa.array(np.repeat(np.arange(len(rows), dtype=np.int32), n))   # each span's row
    labels = pa.table({                  # string columns by Arrow's take: no Python str per span
        "hypothesis": pa.array([r[0] for r in rows], pa.string()).take(row_of),
        "version": pa.array([r[1] for r in rows], pa.string()).take(row_of),
        "dataset": pa.array([dataset], pa.string()).take(pa.array(np.zeros(total, np.int32))),
        "record_id": pa.array(np.repeat([r[2] for r in rows], n).astype(np.int32)),
        "start_char": pa.array(_cat([r[3] for r in rows], np.int32)),
        "end_char": pa.array(_cat([r[4] for r in rows], np.int32)),
        "value": pa.array(_cat([r[5] for r in rows], np.float64)),
    })
    done = pa.table({
        "hypothesis": pa.array([r[0] for r in rows], pa.string()),
        "version": pa.array([r[1] for r in rows], pa.string()),
        "dataset": pa.array([dataset] * len(rows), pa.string()),
        "record_id": pa.array(np.asarray([r[2] for r in rows], np.int32)),
        "n_spans": pa.array(np.asarray(n, np.int32)),
    })
    keys = [k for k in dict.fromkeys((r[0], r[1]) for r in rows) if checked is None or k not in checked]
    with store.Transaction(con):
        for name, version in keys:
            if store.q_one(con, "SELECT 1 FROM labeled_records WHERE hypothesis = ? AND version <> ? LIMIT 1",
                           [name, version]) is not None:
                con.execute("DELETE FROM labels WHERE hypothesis = ? AND version <> ?", [name, version])
                con.execute("DELETE FROM labeled_records WHERE hypothesis = ? AND version <> ?", [name, version])
            waiting = _WAITING.get((name, version))
            if waiting is not None:
                row = catalog_hypothesis(con, name)
                if row is None or row["version"] != version:
                    _write_catalog_row(con, waiting)
        if labels.num_rows:
            store.insert_arrow(con, "labels", labels)
        store.insert_arrow(con, "labeled_records", done)
    if checked is not None:
        checked.update(keys)


def _cat(parts, dtype):
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
