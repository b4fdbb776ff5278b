"""Stored data that survives kills and concurrent cursors: an export killed while replacing an
earlier one (the earlier export is put back or named, never lost), export and report under the
store's writer lock, activation parts that the views read only once committed (a kill at every
step of the write protocol, in a real subprocess), an image model's stale tokenisation row, and
Ctrl-C before an extraction's first commit."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import duckdb
import pytest
import torch
from conftest import TEXTS, planted_adapter

import deepbase_duck as dbd
from deepbase_duck.catalog import session_of

TESTS = str(Path(__file__).resolve().parent)


# -- 1. an export killed while replacing an earlier one ------------------------------------------
def killed_mid_overwrite(out: Path, marker: bool = True, suffix: str = "k1ll3d") -> Path:
    """The state a kill leaves after an overwrite moved the earlier export in ``out`` aside (as
    export_store does: a hidden folder beside it, the export inside as ``export``, and, since
    this version, a ``destination`` file naming ``out``); returns the aside folder."""
    aside = out.parent / f".{out.name[:40]}.earlier-export-{suffix}"
    aside.mkdir()
    if marker:
        (aside / "destination").write_text(str(out.resolve()))
    os.replace(out, aside / "export")
    return aside


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def exported_query_ids(out: Path) -> list[int]:
    return [q for (q,) in duckdb.sql(f"SELECT query_id FROM read_parquet('{out}/queries.parquet') ORDER BY 1"
                                     ).fetchall()]


@pytest.fixture
def exported(tmp_path, planted):
    """A store with one query, exported to tmp_path/out."""
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    out = tmp_path / "out"
    dbd.export(planted, str(out))
    return planted, out


@pytest.mark.parametrize("marker", [True, False], ids=["marked", "earlier-version"])
def test_an_export_killed_before_writing_gets_its_earlier_export_back(exported, marker):
    """Killed after the move and before the new export began (the folder missing): the next export
    puts the earlier one back (with a warning) before going on; without overwrite it then stops,
    since the folder is not empty, and the earlier export is whole in its place."""
    con, out = exported
    before = files_of(out)
    aside = killed_mid_overwrite(out, marker)
    with pytest.warns(UserWarning, match=r"was put back in .*out"):
        with pytest.raises(FileExistsError, match="earlier export put back"):
            dbd.export(con, str(out))
    assert files_of(out) == before and not aside.exists()
    assert exported_query_ids(out) == [1]
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", reuse=False)
    dbd.export(con, str(out), overwrite=True)                # and replaced as usual
    assert exported_query_ids(out) == [1, 2]
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_an_export_killed_right_after_making_its_folder_gets_its_earlier_export_back(exported):
    con, out = exported
    before = files_of(out)
    aside = killed_mid_overwrite(out)
    out.mkdir()                                             # the new export's folder, still empty
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", reuse=False)
    with pytest.warns(UserWarning, match=rf"kept in {aside}, was put back"):
        dbd.export(con, str(out), overwrite=True)
    assert not aside.exists() and [p.name for p in out.parent.iterdir()] == ["out"]
    assert exported_query_ids(out) == [1, 2] and files_of(out) == before


def test_an_export_killed_mid_write_keeps_the_earlier_export_and_names_it(exported, tmp_path):
    """Killed while writing the new export: the folder holds a partial export, so the earlier one
    is not put back over it, nor deleted: each later export to the folder (and one to a folder
    beside it) warns naming where it is."""
    con, out = exported
    before = files_of(out)
    aside = killed_mid_overwrite(out)
    (out / "scores").mkdir(parents=True)
    (out / "models.parquet").write_bytes(b"half written")
    with pytest.warns(UserWarning, match=rf"that export is kept in {aside / 'export'}"):
        dbd.export(con, str(out), overwrite=True)
    assert files_of(aside / "export") == before             # untouched
    assert exported_query_ids(out) == [1]                   # the new export is whole
    with pytest.warns(UserWarning, match=rf"{aside / 'export'} holds an earlier export of {out}"):
        dbd.export(con, str(tmp_path / "other"))
    with pytest.warns(UserWarning, match=rf"kept in {aside / 'export'}"):
        with pytest.raises(FileExistsError):
            dbd.export(con, str(out))
    assert files_of(aside / "export") == before


def test_leftovers_that_hold_no_export_are_deleted_quietly(exported):
    """Killed before the move (an aside folder with no export), or while deleting the earlier
    export after the new one was written (renamed .replaced-export- first): nothing of the user's
    is in them, so the next export deletes them without a warning."""
    con, out = exported
    empty = out.parent / ".out.earlier-export-empty"
    empty.mkdir()
    (empty / "destination").write_text(str(out.resolve()))
    replaced = out.parent / ".out.replaced-export-gone"
    (replaced / "export" / "scores").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dbd.export(con, str(out), overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["out"]


# -- 2. export and report take the writer lock ----------------------------------------------------
def _paused(monkeypatch, module, name, when):
    """Patch ``module.name`` so that its first call for which ``when(*args)`` holds signals
    ``reached`` and waits for ``go``; returns (reached, go)."""
    reached, go, real = threading.Event(), threading.Event(), getattr(module, name)

    def wrapper(*args, **kwargs):
        if when(*args) and not reached.is_set():
            reached.set()
            assert go.wait(60)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return reached, go


def _on_cursor(con):
    """(run, errors): ``run(job)`` calls ``job(cursor)`` on a new dbd.cursor of ``con`` (for a
    thread of its own), adding what it raises to ``errors``."""
    errors = []

    def run(job):
        cur = dbd.cursor(con)
        try:
            job(cur)
        except Exception as exc:          # noqa: BLE001  (returned)
            errors.append(repr(exc))
        finally:
            dbd.close(cur)
    return run, errors


def test_export_holds_the_writer_lock_so_a_query_cannot_commit_halfway(tmp_path, planted, monkeypatch):
    """An export paused between copying the scores and the queries (two cursors, two threads):
    an inspect on the other cursor waits for it, so the exported queries and scores agree."""
    from deepbase_duck import store
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    reached, go = _paused(monkeypatch, store, "q_all",
                          lambda con, sql, *a: sql == "DESCRIBE models" and threading.current_thread().name == "export")
    run, errors = _on_cursor(planted)
    out = tmp_path / "out"
    exporter = threading.Thread(target=run, args=(lambda cur: dbd.export(cur, str(out)),), name="export")
    exporter.start()
    assert reached.wait(60)
    waited = _waits_for(run, exporter, go, lambda cur: dbd.inspect(cur, "planted", ["planted"], ["digit"],
                                                                   "snippets", reuse=False), 3)
    assert errors == []
    assert waited, "the inspect committed while the export was half-way"
    assert exported_query_ids(out) == [1]
    qids = duckdb.sql(f"SELECT DISTINCT query_id FROM read_parquet('{out}/scores/**/*.parquet', "
                      f"hive_partitioning = true) ORDER BY 1").fetchall()
    assert qids == [(1,)]
    assert planted.sql("SELECT count(*) FROM queries").fetchall() == [(2,)]


def _waits_for(run, holder, go, job, patience: float) -> bool:
    """Run ``job`` on another cursor (``run``) while ``holder``, a thread paused until ``go``,
    holds the store; let both finish. Whether ``job`` was still waiting after ``patience`` s."""
    query = threading.Thread(target=run, args=(job,))
    query.start()
    query.join(patience)
    waited = query.is_alive()
    go.set()
    holder.join(60)
    query.join(60)
    return waited


def test_report_holds_the_writer_lock(tmp_path, planted, monkeypatch):
    """A report paused while it reads the store (on a cursor, in a thread): the writer lock is
    held, and an extract on another cursor waits for the report to finish."""
    from deepbase_duck.reports import data
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    reached, go = _paused(monkeypatch, data, "select_query", lambda *a: threading.current_thread().name == "report")
    run, errors = _on_cursor(planted)
    reporter = threading.Thread(target=run, args=(lambda cur: dbd.report(cur, str(tmp_path / "r.html")),),
                                name="report")
    reporter.start()
    assert reached.wait(60)
    lock = session_of(planted).write_lock
    got = lock.acquire(timeout=1)          # another thread's writer: must wait for the report
    if got:
        lock.release()
    waited = _waits_for(run, reporter, go, lambda cur: dbd.extract(cur, "planted", ["planted"], "snippets"), 2)
    assert errors == []
    assert not got and waited, "a writer ran while the report was reading the store"
    assert (tmp_path / "r.html").is_file()


# -- 3. activation parts: a kill at each step of the write protocol -------------------------------
KILL = r"""
import os, sys
sys.path.insert(0, {tests!r})
import pyarrow.parquet as pq
import deepbase_duck as dbd
from conftest import TEXTS, planted_adapter
import deepbase_duck.engine.extract  # (the package loads its engine on first use)
ex = sys.modules["deepbase_duck.engine.extract"]
db, point = sys.argv[1], sys.argv[2]
con = dbd.connect(db, progress=False)
dbd.register_model(con, "planted", planted_adapter())
dbd.add_dataset(con, "snippets", TEXTS[:12])
calls = []

def killed_at(name, nth, before=None):
    real = getattr(ex, name) if name != "write_table" else pq.write_table
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            if before:
                before(*args)
            os._exit(9)                  # no finally, no atexit, no rollback: as SIGKILL
        return real(*args, **kwargs)
    if name == "write_table":
        ex.pq = type("pq", (), {{"write_table": staticmethod(wrapper)}})
    else:
        setattr(ex, name, wrapper)

if point == "mid-write":                 # the second batch's first part, half written
    killed_at("write_table", 3, lambda table, path: open(path, "wb").write(b"PAR1 half"))
elif point == "before-commit":           # the second batch's parts written, not committed
    killed_at("commit_parts", 2)
elif point == "after-commit":            # the second batch committed, none of its parts published
    killed_at("publish_part", 3)
elif point == "mid-publish":             # the second batch committed, one of its two parts published
    killed_at("publish_part", 4)
dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=4)
os._exit(0)
"""


def _symbols(ids) -> int:
    return sum(len(TEXTS[i]) for i in ids)


def _view_state(con, view) -> tuple[set, int, int]:
    """(records the view reads, its rows, its distinct (record, pos) pairs)"""
    recs = {r for (r,) in con.sql(f"SELECT DISTINCT record_id FROM {view}").fetchall()}
    rows, distinct = con.sql(f"SELECT count(*), count(DISTINCT (record_id, pos)) FROM {view}").fetchall()[0]
    return recs, rows, distinct


def _committed(con) -> dict:
    """{view: records the catalog lists as stored}"""
    out = {}
    for view, rec in con.sql("SELECT view_name, record_id FROM behaviors LEFT JOIN behavior_records "
                             "USING (behavior_id)").fetchall():
        out.setdefault(view, set())
        if rec is not None:
            out[view].add(rec)
    return out


@pytest.mark.parametrize("point", ["mid-write", "before-commit", "after-commit", "mid-publish"])
def test_a_kill_at_each_step_of_the_part_protocol(tmp_path, point):
    """A subprocess extracting two layers in batches of 4 records is killed (os._exit) during the
    second batch: mid-write, with its parts written but not committed, after the commit before
    any rename, between its two renames. A plain DuckDB reader opened before deepbase_duck (the
    CLI) sees no row the catalog does not list; connect settles the folders (uncommitted files
    deleted, committed ones published), after which each view reads exactly the committed
    records; the extraction then resumes and stores the activations of a fresh store, once."""
    db = str(tmp_path / "s.duckdb")
    proc = subprocess.run([sys.executable, "-c", KILL.format(tests=TESTS), db, point], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    reader = duckdb.connect(db, read_only=True)
    try:
        committed = _committed(reader)
        assert sorted(committed) == ["behavior_1", "behavior_2"]
        want = {"mid-write": 4, "before-commit": 4, "after-commit": 8, "mid-publish": 8}[point]
        assert [len(r) for r in committed.values()] == [want, want]
        for view, recs in committed.items():
            seen, rows, distinct = _view_state(reader, view)
            assert seen <= recs, f"{view} reads records the catalog does not list: {seen - recs}"
            assert rows == distinct == _symbols(seen)
            if point in ("mid-write", "before-commit"):
                assert seen == recs
    finally:
        reader.close()
    con = dbd.connect(db, progress=False)
    try:
        for view, recs in _committed(con).items():
            seen, rows, distinct = _view_state(con, view)
            assert seen == recs and rows == distinct == _symbols(recs)
        listed = {f"{d}/{f}" for d, f in con.sql("SELECT directory, file FROM behavior_parts "
                                                  "JOIN behaviors USING (behavior_id)").fetchall()}
        assert {f"{p.parent.name}/{p.name}" for p in Path(db + ".acts").glob("*/*")} == listed
        dbd.register_model(con, "planted", planted_adapter())
        res = dbd.extract(con, "planted", ["planted", "mix"], "snippets", batch_size=4)
        assert [(r["extracted"], r["reused"]) for r in res] == [(12 - want, want)] * 2
        fresh = dbd.connect(None, progress=False)
        try:
            dbd.register_model(fresh, "planted", planted_adapter())
            dbd.add_dataset(fresh, "snippets", TEXTS[:12])
            ref = dbd.extract(fresh, "planted", ["planted", "mix"], "snippets", batch_size=4)
            for r, f in zip(res, ref):
                got = con.sql(f"SELECT record_id, pos, act FROM {r['view']} ORDER BY ALL").fetchall()
                assert len(got) == _symbols(range(12))
                assert got == fresh.sql(f"SELECT record_id, pos, act FROM {f['view']} ORDER BY ALL").fetchall()
        finally:
            dbd.close(fresh)
    finally:
        dbd.close(con)


# -- 4. an image model's row with an old tokenisation ---------------------------------------------
class TinyConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def tiny_image_model():
    """A loader (this module is on sys.path under pytest): a 2-unit convolution on a 4 x 4 grid."""
    from deepbase_duck.extraction.image_adapter import ImageAdapter
    return ImageAdapter(TinyConv(), grid=4, size=16, name="tiny", device="cpu")


def test_an_image_model_whose_row_holds_an_old_tokenization_follows_its_adapter(tmp_path):
    """A store of an earlier version: the model's row, its stored activations and symbols keyed by
    a tokenisation whose resampling rule the adapter no longer uses. The next session's first
    query loads the model, moves its row to the adapter's tokenisation (with a warning) and so
    runs the model instead of reading the old rule's activations; its scores equal a fresh
    store's."""
    from deepbase_duck.corpora import scenes
    from deepbase_duck.hypotheses.grid import concept_hypothesis
    concept_hypothesis("colour:red", grid=4, name="tiny_red")
    db = str(tmp_path / "s.duckdb")
    old = "image-grid4:tiny-16-0ld0ru1e"
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "tiny", "test_store_robustness:tiny_image_model")
        new = con.sql("SELECT tokenization FROM models").fetchall()[0][0]
        assert new != old and new.startswith("image-grid4:")
        dbd.add_dataset(con, "scenes", scenes.scene_records(6, seed=3))
        dbd.extract(con, "tiny", ["conv"], "scenes")
        for table in ("models", "behaviors", "symbols", "tokenized_records"):
            con.execute(f"UPDATE {table} SET tokenization = ?", [old])
    finally:
        dbd.close(con)
    con = dbd.connect(db, progress=False)
    try:
        with pytest.warns(UserWarning, match=rf"model 'tiny': its loader now gives tokenization '{new}', not '{old}'"):
            got = dbd.inspect(con, "tiny", ["conv"], ["tiny_red"], "scenes", measures=["corr"])
        assert con.sql("SELECT tokenization FROM models").fetchall() == [(new,)]
        source, toks = con.sql("SELECT source, params->>'tokenizations' FROM queries").fetchall()[0]
        assert source == "model" and new in toks
        assert con.sql("SELECT count(*) FROM behaviors WHERE tokenization = ?", params=[old]).fetchall() == [(1,)]
        fresh = dbd.connect(None, progress=False)
        try:
            dbd.register_model(fresh, "tiny", "test_store_robustness:tiny_image_model")
            dbd.add_dataset(fresh, "scenes", scenes.scene_records(6, seed=3))
            want = dbd.inspect(fresh, "tiny", ["conv"], ["tiny_red"], "scenes", measures=["corr"])
        finally:
            dbd.close(fresh)
        assert got.column("score").to_pylist() == pytest.approx(want.column("score").to_pylist())
    finally:
        dbd.close(con)


# -- 5. Ctrl-C before an extraction's first commit ------------------------------------------------
def test_ctrl_c_before_the_first_commit_leaves_no_behavior_row(tmp_path, monkeypatch):
    """An empty behaviors row would be listed (and exported to BI tools) as stored activations with
    no view to read: Ctrl-C before the first commit drops it, as an error does; one whose parts
    committed stays, and the extraction resumes after them."""
    extract = sys.modules["deepbase_duck.engine.extract"]
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS[:8])
        commit, calls = extract.commit_parts, []

        def interrupted(session, written):
            calls.append(1)
            if calls == [1] or len(calls) == 3:
                raise KeyboardInterrupt
            return commit(session, written)
        monkeypatch.setattr(extract, "commit_parts", interrupted)
        with pytest.raises(KeyboardInterrupt):
            dbd.extract(con, "planted", ["planted"], "snippets", batch_size=4)
        assert con.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
        assert not any(Path(db + ".acts").glob("*/*"))
        out = dbd.export(con, str(tmp_path / "out"))
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out['behaviors']}')").fetchall() == [(0,)]
        with pytest.raises(KeyboardInterrupt):        # the first batch commits, the second is interrupted
            dbd.extract(con, "planted", ["planted"], "snippets", batch_size=4)
        monkeypatch.undo()
        assert con.sql("SELECT count(*) FROM behavior_records").fetchall() == [(4,)]
        res = dbd.extract(con, "planted", ["planted"], "snippets", batch_size=4)
        assert (res[0]["extracted"], res[0]["reused"]) == (4, 4)
        assert con.sql(f"SELECT count(DISTINCT record_id), count(*) FROM {res[0]['view']}").fetchall() == [
            (8, _symbols(range(8)))]
    finally:
        dbd.close(con)


def test_a_missing_activation_folder_forgets_nothing_until_it_is_made_again(tmp_path):
    """The whole '<store>.acts' folder gone (a drive not mounted) is an error that changes
    nothing: put back, the stored activations are read; deleted on purpose and made again
    empty, they are computed again (with the usual warning)."""
    import shutil
    import warnings
    from deepbase_duck.errors import DeepBaseError
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", "ray_models:planted")
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "planted", ["planted"], "snippets")
    parts = con.sql("SELECT count(*) FROM behavior_parts").fetchall()[0][0]
    assert parts > 0
    root, away = Path(db + ".acts"), tmp_path / "elsewhere"
    shutil.move(str(root), str(away))
    with pytest.raises(DeepBaseError, match=r"activation folder of this store, .*s\.duckdb\.acts, is missing.*put it "
                                            r"back.*make it again, empty"):
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", reuse=False)
    assert con.sql("SELECT count(*) FROM behavior_parts").fetchall()[0][0] == parts
    assert not root.exists()
    dbd.close(con)
    shutil.move(str(away), str(root))              # back: read as stored, at a fresh opening too
    con = dbd.connect(db, progress=False)
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", reuse=False)
    params = con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
    assert '"activation_records_computed": 0' in params
    shutil.rmtree(root)
    root.mkdir()                                   # deleted on purpose: made again, empty
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", reuse=False)
    assert any("part files are missing" in str(w.message) for w in seen)
    assert con.sql("SELECT count(*) FROM behavior_parts").fetchall()[0][0] == 0
    dbd.close(con)
