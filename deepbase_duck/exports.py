"""Export a store for BI tools and other readers: Parquet files plus a small DuckDB file.

    out/
      scores/model=<m>/layer=<l>/*.parquet        hive-partitioned by model and layer (a store
                                                   without scores: scores/data_0.parquet, no rows)
      similarities.parquet, queries.parquet, models.parquet, layers.parquet, datasets.parquet,
      hypotheses.parquet, behaviors.parquet        the catalog, one file each
      activations/model=<m>/layer=<l>/dataset=<d>/*.parquet   (with activations=True: per model,
                                                   layer and dataset the activations of the
                                                   model's current weights and tokenisation,
                                                   float32 preferred, whichever model name stored
                                                   them: weights registered under two names are
                                                   exported under each name)
      study.duckdb                                 DuckDB 1.5-readable: one view per file set above

The partitioned files also hold their partition columns (model, layer, dataset), so a reader of
one file keeps them. The .duckdb file holds only views (each Parquet file named one by one, no
glob, so the folder's name may hold [ ] or *, under the macro ``export_root()``: the folder the
export was written to, or, for a copied or moved export, the one ``SET VARIABLE deepbase_export
= '<folder>'`` names; columns in the store's order and of its types: partition values as
VARCHAR, read from the files, not by DuckDB's hive reader, which in DuckDB 1.5 reads a model
named 'NULL' as NULL; act as FLOAT[width] where the exported layers share one width) and the
pure-SQL macros over them (top_units, compare_scores; with ``text=True`` also symbol_labels and
sampling), so any DuckDB 1.5+ client (the CLI, duckdb-engine / SQLAlchemy, ADBC) reads it, and
tools that read Parquet use the files directly (pyarrow.dataset, polars, Spark...). Nothing in it needs
Python UDFs. Records, symbols and labels are left out unless ``text=True`` (they can be large).
``overwrite=True`` replaces an earlier export in ``out_dir`` and nothing else: the earlier export
is moved aside while the new one is written, and restored if that fails (it is refused up front
while its study.duckdb is open in this process). The aside folder, ``.<name>.earlier-export-*``
beside ``out_dir``, names its destination in a file ``destination``; once the new export is
written it is renamed ``.<name>.replaced-export-*`` and deleted. A process killed in between
(SIGKILL, power loss) leaves the earlier export there: the next export to ``out_dir`` puts it back
when ``out_dir`` is missing or empty, and otherwise warns naming where it is; it never deletes it
(``recover_earlier_exports``). An export runs under the store's writer lock (``store.one_reader``):
it reads many tables one after another and may update the catalog (``forget_missing_parts``), so
a query on another cursor must not commit in between. A store opened read-only exports too (the
export is written elsewhere); only forgetting parts whose files are gone would write there,
and fails by name. What an export could not include (activations
asked for but none stored, or stored ones whose files were deleted by hand) is said in the
returned dict's ``notes`` (a line of text), and no ``activations`` view is made then.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import duckdb

from . import store

CATALOG = ["models", "layers", "datasets", "hypotheses", "hypothesis_definitions", "queries", "behaviors", "similarities"]
TEXT_TABLES = ["records", "symbols", "labels", "labeled_records"]   # labeled_records: stratified_records


def _lit(path) -> str:
    """A path as a SQL string literal (quotes doubled)."""
    return "'" + Path(path).as_posix().replace("'", "''") + "'"


def check_replaceable(session, out: Path) -> None:
    """Refuse to delete ``out`` unless it holds an earlier export and nothing else: never the
    folder of the store or of its activations, nor a folder with other files."""
    from .errors import DeepBaseError
    db = session.db_path if session.db_path not in (None, ":memory:") else None
    store_files = [Path(p).resolve() for p in (db, session.act_root) if p]
    for f in store_files:
        if f == out or out in f.parents:
            raise DeepBaseError(f"export folder {out} holds the store ({f}); overwrite would delete it: "
                                f"export to another folder")
    known = ({"scores", "scores.parquet", "activations", "study.duckdb", "study.duckdb.wal"}
             | {f"{t}.parquet" for t in CATALOG + TEXT_TABLES})
    other = sorted(p.name for p in out.iterdir() if p.name not in known)
    # the names an export writes are not enough: a folder of one's own named 'activations' or
    # 'scores' (or a folder 'models.parquet') is no export's, and its files would go with it
    other += sorted(str(p.relative_to(out)) for p in out.iterdir() if p.name in known
                    and not _export_entry(p))
    if other:
        raise DeepBaseError(f"export folder {out} holds files no export writes ({', '.join(other[:5])}"
                            f"{' ...' if len(other) > 5 else ''}); overwrite replaces only an earlier export")


PARTITIONS = {"scores": ("model", "layer"), "activations": ("model", "layer", "dataset")}
EMPTY_SCORES = "data_0.parquet"    # scores/<this>: the scores of a store that has none (no partition)


def _export_entry(p: Path) -> bool:
    """Whether ``p``, an entry of an export folder named as an export names its files, is laid
    out as an export writes it: the Parquet partition folders (``scores/model=<m>/layer=<l>/``,
    ``activations/model=<m>/layer=<l>/dataset=<d>/``) holding nothing but ``.parquet`` files, the
    other names plain files."""
    keys = PARTITIONS.get(p.name)
    if keys is None:
        return p.is_file() or p.is_symlink()
    if (p.name == "scores" and p.is_dir() and not p.is_symlink() and [q.name for q in p.iterdir()] == [EMPTY_SCORES]
            and (p / EMPTY_SCORES).is_file()):
        return True                     # the export of a store without scores

    def layout(folder: Path, depth: int) -> bool:
        if folder.is_symlink() or not folder.is_dir():
            return False
        for q in folder.iterdir():
            if depth == len(keys):
                if not (q.name.endswith(".parquet") and (q.is_file() or q.is_symlink())):
                    return False
            elif not (q.name.startswith(keys[depth] + "=") and layout(q, depth + 1)):
                return False
        return True
    return layout(p, 0)


def _ident(name: str) -> str:
    """A column name as a SQL identifier (double quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _str_lit(value: str) -> str:
    """A string as a SQL string literal (quotes doubled), taken as it is (not as a path)."""
    return "'" + value.replace("'", "''") + "'"


ROOT_VARIABLE = "deepbase_export"   # SET VARIABLE deepbase_export = '<folder>': where a moved export is now
# DuckDB's readers glob every path, and a glob such as 'out[1]/x' would match 'out1/x' instead:
# each [ * ? of a path is written as a one-character class ([[], [*], [?]), which matches only itself
GLOB_CHARS = r"([\[*?])"


def _root_macro(out: Path) -> str:
    """The macro ``export_root()`` the views name their files under: the folder the export was
    written to, or the one ``SET VARIABLE deepbase_export = '<folder>'`` names (absolute, or
    relative to the reader's working directory), so that a copied or moved export folder reads
    after that one line. DuckDB keeps no setting in the file and resolves a relative path in a
    view against the reader's working directory, not the file's folder: the views cannot find
    a moved folder by themselves. [ * ? in either folder are escaped (GLOB_CHARS)."""
    written = re.sub(GLOB_CHARS, r"[\1]", out.as_posix())
    return (f"CREATE OR REPLACE MACRO export_root() AS rtrim(coalesce(regexp_replace(getvariable("
            f"{_str_lit(ROOT_VARIABLE)}), {_str_lit(GLOB_CHARS)}, '[\\1]', 'g'), {_str_lit(written)}), '/')")


def _rel_lit(out: Path, f: Path) -> str:
    """A file of the export as a SQL expression: ``export_root()`` and the file's path inside
    the folder, [ * ? escaped."""
    inside = re.sub(GLOB_CHARS, r"[\1]", "/" + f.relative_to(out).as_posix())
    return f"(export_root() || {_str_lit(inside)})"


def _files_view(out: Path, name: str, files: list[Path], columns: list[tuple[str, str]]) -> str:
    """A view over Parquet ``files`` named one by one under ``export_root()`` (no glob: the
    folder's own name may hold [ ] or *, see GLOB_CHARS) giving ``columns`` [(name, type)] in
    that order and of those types, a list coming back as the store's fixed-size array. The hive
    partition columns are read from the files, which hold them (``WRITE_PARTITION_COLUMNS``),
    not by DuckDB's hive reader: DuckDB 1.5 (the CLI) reads a folder ``model=NULL`` (or
    ``null``) as SQL NULL, so a model named 'NULL' lost its name and merged with one named
    'null' there, and a model named '007' must stay '007', not 7."""
    cols = ", ".join(f"CAST({_ident(c)} AS {t}) AS {_ident(c)}" for c, t in columns)
    return (f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} "
            f"FROM read_parquet([{', '.join(_rel_lit(out, f) for f in files)}], hive_partitioning = false)")


def _view_comment(name: str) -> str:
    """What a BI tool shows beside a view: where it reads, and how to re-point a moved export."""
    return (f"COMMENT ON VIEW {name} IS " + _str_lit(
        f"Reads the Parquet files under export_root(), the folder this export was written to. After copying "
        f"or moving that folder, run first: SET VARIABLE {ROOT_VARIABLE} = '<its new path>'"))


HIVE_KEYS = ("model", "layer", "dataset")    # the partition columns of scores and activations


def check_out_dir(out: Path) -> None:
    """Refuse, before anything is written, a folder the export could not be read back from."""
    from .errors import DeepBaseError
    if out.exists() and not out.is_dir():
        raise DeepBaseError(f"export folder {out} is a file, not a folder: give the path of a folder")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DeepBaseError(f"export folder {out} cannot be made: {blocking} is a file")
    if "?" in str(out):
        raise DeepBaseError(f"export folder {out} holds a '?', which DuckDB takes for the start of a database "
                            f"file's options (study.duckdb could not be opened): choose another folder")
    if os.sep == "/" and "\\" in str(out):
        raise DeepBaseError(f"export folder {out} holds a '\\', which DuckDB's Parquet writer takes for a folder "
                            f"separator (the partitions of scores would be written elsewhere): choose another folder")
    keyed = [part for part in out.parts if part.split("=", 1)[0] in HIVE_KEYS and "=" in part]
    if keyed:
        raise DeepBaseError(f"export folder {out} has a folder named {keyed[0]!r}, which readers of the hive "
                            f"partitions below it would take for the partition's own value: choose another folder")


def check_not_open(out: Path) -> None:
    """Refuse to replace an earlier export whose study.duckdb is open through a DuckDB connection
    of this process (or written by another process): DuckDB would keep serving the old file to
    this process' connections under the new one's name."""
    from .errors import DeepBaseError
    db = out / "study.duckdb"
    if not db.is_file():
        return
    try:        # a configuration no caller uses: an instance of this file open in this process refuses it
        probe = duckdb.connect(str(db), read_only=True, config={"custom_user_agent": "deepbase_duck export probe"})
    except duckdb.ConnectionException as exc:
        if "different configuration" not in str(exc):
            raise
        raise DeepBaseError(f"export folder {out}: the earlier export's {db} is open in this process through a "
                            f"DuckDB connection; close it (con.close()) before replacing that export, or export "
                            f"to another folder. Nothing was changed") from None
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise
        held = re.search(r"PID (\d+)", str(exc))
        raise DeepBaseError(f"export folder {out}: the earlier export's {db} is open for writing in another "
                            f"process{f' (PID {held.group(1)})' if held else ''}; close it there before replacing "
                            f"that export, or export to another folder. Nothing was changed") from None
    probe.close()


ASIDE = ".earlier-export-"         # .<name>.earlier-export-XXXX/export: an earlier export, kept while replaced
REPLACED = ".replaced-export-"     # the same folder once the new export is written: only to delete
MARK = "destination"               # the file in an aside folder naming the export folder it belongs to


def _aside_prefix(out: Path, kind: str = ASIDE) -> str:
    return f".{out.name[:40]}{kind}"


def _move_aside(out: Path) -> Path:
    """Move the export in ``out`` into a new hidden folder beside it (as ``<aside>/export``, with
    ``<aside>/destination`` naming ``out``); returns that folder."""
    aside = Path(tempfile.mkdtemp(prefix=_aside_prefix(out), dir=out.parent))
    try:
        (aside / MARK).write_text(str(out), encoding="utf-8")
        os.replace(out, aside / "export")
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    return aside


def _discard(aside: Path) -> None:
    """Delete an aside folder whose export was replaced: renamed first (one atomic step), so that
    a process killed while deleting it leaves a folder the next export knows to be garbage."""
    gone = aside.with_name(aside.name.replace(ASIDE, REPLACED, 1))
    try:
        os.replace(aside, gone)
    except OSError:
        gone = aside
    shutil.rmtree(gone, ignore_errors=True)


def _aside_destination(aside: Path, out: Path) -> Path | None:
    """The export folder an aside folder belongs to: the one its ``destination`` file names; for
    one without that file (written by an earlier version), ``out`` when the folder's name is
    ``out``'s prefix and ``out``'s name is whole in it (at most 40 characters), else None."""
    try:
        return Path(aside.joinpath(MARK).read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        pass
    if len(out.name) <= 40 and aside.name.startswith(_aside_prefix(out)):
        return out
    return None


def recover_earlier_exports(out: Path) -> Path | None:
    """Before an export to ``out``: find what an export killed while replacing an earlier one
    left beside its folder. An aside folder of ``out`` holding an export (the new one was never
    written whole: a written one renames its aside folder first) is moved back into ``out``
    when ``out`` is missing or empty, with a warning; otherwise a warning names where it is, and
    it stays (``out`` may hold a partial new export, or files written since: which one to keep
    is the user's call). Aside folders of other export folders in the same parent are named in a
    warning only (their own folder's next export may never come); folders that hold no export
    (killed before the move, or a replaced export being deleted) are deleted. Returns the
    folder restored from, or None."""
    parent = out.parent
    if not parent.is_dir():
        return None
    own, others = [], []
    for p in sorted(parent.iterdir()):
        if not (p.name.startswith(".") and p.is_dir()):
            continue
        if REPLACED in p.name and p.name.startswith(_aside_prefix(out, REPLACED)):
            shutil.rmtree(p, ignore_errors=True)       # the earlier export of a completed replacement
            continue
        if ASIDE not in p.name:
            continue
        dest = _aside_destination(p, out)
        if not (p / "export").is_dir():
            if dest == out:                              # killed before its export was moved in
                shutil.rmtree(p, ignore_errors=True)
            continue
        (own if dest == out else others).append((p, dest))
    restored = None
    if own and (not out.exists() or (out.is_dir() and not any(out.iterdir()))):
        own.sort(key=lambda a: a[0].stat().st_mtime)      # the newest aside: the export last in place
        restored = own.pop()[0]
        os.replace(restored / "export", out)
        shutil.rmtree(restored, ignore_errors=True)
        warnings.warn(f"export folder {out}: an earlier export to it was interrupted (its process killed, or "
                      f"the machine stopped) while replacing the export there; that export, kept in {restored}, "
                      f"was put back in {out}", stacklevel=3)
    for p, _ in own:
        warnings.warn(f"export folder {out}: an earlier export to it was interrupted while replacing the export "
                      f"that was there; that export is kept in {p / 'export'}, and {out} holds what was written "
                      f"since (maybe a partial export). Move it back, or delete it once you do not need it; "
                      f"it is never deleted for you", stacklevel=3)
    for p, dest in others:
        where = f"of {dest}" if dest is not None else "of a folder beside it"
        warnings.warn(f"{p / 'export'} holds an earlier export {where}, left there by an export that was "
                      f"interrupted while replacing it: the next export to {dest or 'that folder'} puts it back "
                      f"if that folder is missing or empty; or move it back yourself", stacklevel=3)
    return restored


@store.one_reader                   # reads; a read-only store (dbd.connect(path, read_only=True)) exports too
def export_store(session, out_dir: str, activations: bool = False, text: bool = False,
                 overwrite: bool = False) -> dict:
    """Write the export to ``out_dir``; returns {name: path} of what was written, and 'notes'
    (one line of text) when something asked for could not be exported. A failure leaves no
    partial export behind: the folder is left empty, or holds the earlier export it was to
    replace. A kill leaves the earlier export beside it, for the next export to find
    (``recover_earlier_exports``). Runs holding the store's writer lock (see the module's
    docstring)."""
    from .errors import DeepBaseError
    out = Path(out_dir).resolve()
    check_out_dir(out)
    restored = recover_earlier_exports(out)
    aside = None                           # the earlier export, kept until the new one is written
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            why = f" (it holds the earlier export put back from {restored})" if restored else ""
            raise FileExistsError(f"export folder {out} is not empty{why}; pass overwrite=True (CLI: --overwrite) "
                                  f"to replace an earlier export there")
        check_replaceable(session, out)
        check_not_open(out)
        try:
            aside = _move_aside(out)
        except OSError as exc:
            raise DeepBaseError(f"export folder {out}: the earlier export cannot be moved aside while the new one "
                                f"is written ({exc.strerror or exc}); nothing was changed") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = _write(session, out, activations, text)
    except BaseException:
        for p in out.iterdir() if out.is_dir() else ():   # only what this export wrote: the folder was empty
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        if aside is not None:              # the earlier export back in its place
            if out.is_dir():
                out.rmdir()
            os.replace(aside / "export", out)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        _discard(aside)
    return written


def _stored_activations(session) -> tuple[list[tuple], list[str]]:
    """(view, model, layer, dataset) of the behaviors an export holds: per registered model, layer
    and dataset one behavior of the model's current checksum and tokenisation, whichever model
    name stored it (the same weights under two names: under each), float32 preferred, the
    latest; and notes on those skipped because their files are gone (deleted or moved by hand:
    ``forget_missing_parts`` takes them out of the catalog, with a warning)."""
    from .engine.extract import forget_missing_parts
    con = session.con
    candidates = store.q_all(con, "SELECT DISTINCT b.behavior_id, b.directory, b.view_name, b.model, b.layer, "
                                  "b.dataset FROM behaviors b JOIN models m ON m.checksum = b.model_checksum "
                                  "AND m.tokenization = b.tokenization WHERE EXISTS (SELECT 1 FROM behavior_parts p "
                                  "WHERE p.behavior_id = b.behavior_id) ORDER BY b.behavior_id")
    notes = []
    for bid, directory, view, model, layer, dataset in candidates:
        b = {"behavior_id": bid, "directory": directory, "view_name": view, "model": model, "layer": layer,
             "dataset": dataset}
        lost = forget_missing_parts(session, b)
        if lost:
            left = store.q_scalar(con, "SELECT count(*) FROM behavior_parts WHERE behavior_id = ?", [bid])
            notes.append(f"the stored activations of model {model!r}, layer {layer!r} on dataset {dataset!r} "
                         f"{f'of {lost} records were' if left else 'were'} left out: their files are gone from "
                         f"{session.act_root / directory}")
    views = {r[0] for r in store.q_all(con, "SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    rows = store.q_all(con, "SELECT b.view_name, m.name, b.layer, b.dataset FROM behaviors b "
                            "JOIN models m ON m.checksum = b.model_checksum AND m.tokenization = b.tokenization "
                            "WHERE EXISTS (SELECT 1 FROM behavior_parts p WHERE p.behavior_id = b.behavior_id) "
                            "AND list_contains(?, b.view_name) "
                            "QUALIFY row_number() OVER (PARTITION BY m.name, b.layer, b.dataset "
                            "ORDER BY b.dtype = 'float32' DESC, b.behavior_id DESC) = 1 "
                            "ORDER BY m.name, b.layer, b.dataset", [sorted(views)])
    return rows, notes


@contextlib.contextmanager
def _partition_names(con, what: str, names=None):
    """Say which name is at fault when a hive partition's folder name (``model=<name>``, its
    non-ASCII bytes percent-encoded) is longer than the file system allows (255 bytes): DuckDB's
    own error names only the path. ``names``: the partition values of this COPY (None: the scores'
    models and layers)."""
    try:
        yield
    except duckdb.IOException as exc:
        from .errors import DeepBaseError
        if "too long" not in str(exc).lower():
            raise
        if names is None:
            names = [n for (n,) in store.q_all(con, "SELECT DISTINCT model FROM scores UNION "
                                                    "SELECT DISTINCT layer FROM scores")]
        longest = sorted(names, key=lambda n: len(n.encode("utf-8")), reverse=True)[:3]
        raise DeepBaseError(f"export: the {what} are written in folders named after each model, layer and "
                            f"dataset, and one such name is too long for a folder name once encoded (non-ASCII "
                            f"characters take 3 to 12 characters each); the longest names: "
                            f"{', '.join(repr(n) for n in longest)}. Register the model under a shorter name "
                            f"(the same weights share what is stored) and export again") from None


def _write(session, out: Path, activations: bool, text: bool) -> dict:
    con = session.con
    written, views = {}, []
    scores_dir = out / "scores"
    score_cols = [(c, t) for c, t, *_ in store.q_all(con, "DESCRIBE scores")]
    n_scores = store.q_scalar(con, "SELECT count(*) FROM scores")
    if n_scores:
        with _partition_names(con, "scores"):
            con.execute(f"COPY scores TO {_lit(scores_dir)} (FORMAT parquet, PARTITION_BY (model, layer), "
                        "WRITE_PARTITION_COLUMNS true)")     # in the files too: see _files_view
        written["scores"] = f"{scores_dir.as_posix()}/**/*.parquet"
        views.append(("scores", sorted(scores_dir.rglob("*.parquet")), score_cols))
    else:       # no partitions to write: one empty file in scores/ keeps the schema (model and layer
        # in it, as no folder name holds them), so that readers of scores/ read an empty table
        scores_dir.mkdir()
        empty = scores_dir / EMPTY_SCORES
        con.execute(f"COPY scores TO {_lit(empty)} (FORMAT parquet)")
        written["scores"] = f"{scores_dir.as_posix()}/**/*.parquet"
        views.append(("scores", [empty], score_cols))
    for table in CATALOG + (TEXT_TABLES if text else []):
        path = out / f"{table}.parquet"
        con.execute(f"COPY {table} TO {_lit(path)} (FORMAT parquet)")
        written[table] = path.as_posix()
        views.append((table, [path], [(c, t) for c, t, *_ in store.q_all(con, f"DESCRIBE {table}")]))
    notes = []
    if activations:
        act_dir = out / "activations"
        # one stored behavior per (model, layer, dataset): the model's current weights and
        # tokenisation, float32 preferred, the latest (others are older weights or copies)
        rows, notes = _stored_activations(session)
        act_types = set()
        for view, model, layer, dataset in rows:
            with _partition_names(con, "activations", (model, layer, dataset)):
                con.execute(f"COPY (SELECT ? AS model, ? AS layer, ? AS dataset, record_id, pos, act FROM {view}) "
                            f"TO {_lit(act_dir)} (FORMAT parquet, PARTITION_BY (model, layer, dataset), "
                            "WRITE_PARTITION_COLUMNS true, APPEND)", [model, layer, dataset])
            act_types.add(store.q_scalar(con, f"SELECT column_type FROM (DESCRIBE {view}) WHERE column_name = 'act'"))
        if rows:
            written["activations"] = f"{act_dir.as_posix()}/**/*.parquet"
            # act is FLOAT[width] in the behavior views: kept where every layer exported has one
            # width, else FLOAT[] (one column cannot hold arrays of several sizes)
            act = act_types.pop() if len(act_types) == 1 else "FLOAT[]"
            cols = [(c, "VARCHAR") for c in HIVE_KEYS] + [("record_id", "INTEGER"), ("pos", "INTEGER"), ("act", act)]
            views.append(("activations", sorted(act_dir.rglob("*.parquet")), cols))
        else:
            notes.append("no activations were exported: none of the registered models' current weights has "
                         "stored activations (store them with extract, or inspect with keep_activations=True), "
                         "so study.duckdb has no activations view")
    db = out / "study.duckdb"
    side = duckdb.connect(str(db), config={"storage_compatibility_version": "v1.5.0"})
    try:
        side.execute(_root_macro(out))
        for view in views:
            side.execute(_files_view(out, *view))
            side.execute(_view_comment(view[0]))
        # the macros over what was exported: results always; alignment and sampling with the text
        wanted = ("10_", "20_", "30_") if text else ("30_",)
        for name, text_sql in store.sql_files("pure"):
            if name.startswith(wanted):
                side.execute(text_sql)
        side.execute("CHECKPOINT")
    finally:
        side.close()
    written["duckdb"] = db.as_posix()
    if notes:
        written["notes"] = "; ".join(notes)
    return written
