"""Dropping a hypothesis defined in SQL (``drop_hypothesis``: library, SQL, CLI) and opening a
store read-only (``dbd.connect(path, read_only=True)``, ``--read-only``): what is dropped, what a
later definition of the name is served, what a read-only store allows and refuses."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError, HypothesisError, UnknownNameError
from deepbase_duck.hypotheses import core

from conftest import TEXTS, planted_adapter, planted_per_record, snapshot

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def forget_names():
    """The names these tests define leave the process registry afterwards."""
    yield
    for name in [n for n in core._REGISTRY if n.startswith("rx_")]:
        core._REGISTRY.pop(name)


def re_labels(pattern: str) -> np.ndarray:
    """Per-character 0/1 labels of ``pattern`` over TEXTS, straight from re.finditer."""
    out = []
    for text in TEXTS:
        y = np.zeros(len(text))
        for m in re.finditer(pattern, text):
            y[m.start():m.end()] = 1
        out.append(y)
    return np.concatenate(out)


def scores_of(t, hypothesis: str) -> dict:
    return {r["unit"]: r["score"] for r in t.to_pylist() if r["hypothesis"] == hypothesis and r["measure"] == "corr"}


def test_drop_deletes_what_was_stored_for_it_and_a_new_pattern_is_never_served_the_old(planted):
    con = planted
    X, _, _ = planted_per_record(["digit"])
    v1 = con.sql("SELECT define_hypothesis('rx_num', '[0-9]+')").fetchall()[0][0]["version"]
    t1 = dbd.inspect(con, "planted", ["planted"], ["rx_num", "digit"], "snippets")
    assert con.sql("SELECT count(*) FROM labeled_records WHERE hypothesis = 'rx_num'").fetchall()[0][0] == len(TEXTS)
    n_scores = con.sql("SELECT count(*) FROM scores").fetchall()[0][0]

    d = con.sql("SELECT drop_hypothesis('rx_num')").fetchall()[0][0]
    assert (d["name"], d["pattern"], d["version"], d["labeled_records"]) == ("rx_num", "[0-9]+", v1, len(TEXTS))
    left = {t: con.sql(f"SELECT count(*) FROM {t} WHERE {c} = 'rx_num'").fetchall()[0][0]
            for t, c in [("labels", "hypothesis"), ("labeled_records", "hypothesis"), ("hypotheses", "name"),
                         ("hypothesis_definitions", "name")]}
    assert left == dict.fromkeys(left, 0)
    # the other hypothesis' labels and the query results stay
    assert con.sql("SELECT count(*) FROM labeled_records WHERE hypothesis = 'digit'").fetchall()[0][0] == len(TEXTS)
    assert con.sql("SELECT count(*) FROM scores").fetchall()[0][0] == n_scores
    # gone from this process too: a query of the name is an error naming it
    assert "rx_num" not in core.registry()
    with pytest.raises(UnknownNameError, match="rx_num"):
        dbd.inspect(con, "planted", ["planted"], ["rx_num"], "snippets")

    # the same name, another pattern: its labels and scores are the new pattern's, by a scan
    dbd.define_hypothesis(con, "rx_num", "[(){}\\[\\]]")
    t2 = dbd.inspect(con, "planted", ["planted"], ["rx_num"], "snippets")
    assert con.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0] != "cache"
    y2 = re_labels("[(){}\\[\\]]")
    got = scores_of(t2, "rx_num")
    for unit in (0, 1, 3, 4):                     # unit 2 is constant: no correlation
        assert got[unit] == pytest.approx(np.corrcoef(X[:, unit], y2)[0, 1], abs=1e-9)
    assert got[0] != pytest.approx(scores_of(t1, "rx_num")[0], abs=1e-3)
    stored = con.sql("SELECT DISTINCT version FROM labels WHERE hypothesis = 'rx_num'").fetchall()
    assert stored == [(dbd.define_hypothesis(con, "rx_num", "[(){}\\[\\]]")["version"],)]

    # a Python-defined or built-in name, an unknown one and NULL are refused by name; nothing changes
    @dbd.hypothesis("rx_py")
    def rx_py(text):
        return [(0, 1)]
    before = snapshot(con)
    for name, error, words in [("digit", HypothesisError, "built-in"), ("rx_py", HypothesisError, "Python"),
                               ("rx_nope", UnknownNameError, "rx_nope.*rx_num")]:
        with pytest.raises(error, match=words):
            dbd.drop_hypothesis(con, name)
    with pytest.raises(duckdb.Error, match="NULL"):
        con.sql("SELECT drop_hypothesis(NULL)").fetchall()
    assert snapshot(con) == before


def test_drop_of_a_name_a_python_hypothesis_shadows_keeps_the_python_labels(planted):
    con = planted
    dbd.define_hypothesis(con, "rx_shadow", "[0-9]")
    dbd.annotate(con, ["rx_shadow"], "snippets")

    with pytest.warns(UserWarning, match="Python one is used"):
        @dbd.hypothesis("rx_shadow")
        def rx_shadow(text):
            return [(0, 1)]
        dbd.annotate(con, ["rx_shadow"], "snippets")
    python_version = core.registry()["rx_shadow"].version
    dbd.drop_hypothesis(con, "rx_shadow")
    assert con.sql("SELECT count(*) FROM hypothesis_definitions").fetchall()[0][0] == 0
    assert con.sql("SELECT DISTINCT version FROM labeled_records WHERE hypothesis = 'rx_shadow'").fetchall() == \
        [(python_version,)]
    held = core.registry()["rx_shadow"]
    assert held.version == python_version and held.source != "regex '[0-9]'"


def cli(capsys, *args) -> tuple[int, str, str]:
    """``deepbase-duck ARGS`` in this process: (status, stdout, stderr)."""
    from deepbase_duck.cli import main
    status = main([*args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_drop_hypothesis_cli(tmp_path, capsys):
    db = str(tmp_path / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.add_dataset(con, "d", TEXTS[:4])
    dbd.define_hypothesis(con, "rx_cli", "[a-z]+", flags="i")
    dbd.annotate(con, ["rx_cli"], "d")
    dbd.close(con)
    status, out, err = cli(capsys, "drop-hypothesis", db, "rx_cli")
    assert status == 0, err
    assert "rx_cli: dropped" in out and "'[a-z]+'" in out and "4 records" in out
    status, out, err = cli(capsys, "drop-hypothesis", db, "rx_cli")
    assert status == 2 and "unknown hypothesis 'rx_cli'" in err and len(err.splitlines()) == 1
    status, out, err = cli(capsys, "drop-hypothesis", db, "in_string")
    assert status == 2 and "built-in" in err
    con = dbd.connect(db, progress=False)
    try:
        assert con.sql("SELECT count(*) FROM labels").fetchall() == [(0,)]
        assert con.sql("SELECT count(*) FROM hypothesis_definitions").fetchall() == [(0,)]
    finally:
        dbd.close(con)


@pytest.fixture
def study(tmp_path):
    """A store file with a query, stored activations and a SQL-defined hypothesis; closed."""
    db = tmp_path / "study.duckdb"
    con = dbd.connect(str(db), progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.define_hypothesis(con, "rx_digits", "[0-9]+")
    t = dbd.inspect(con, "planted", ["planted"], ["digit", "rx_digits"], "snippets", keep_activations=True)
    dbd.close(con)
    return db, t


def files_of(db: Path) -> dict:
    """Every file of the store (the .duckdb, a .wal, the activation folder) with its size and
    modification time: what a read-only session must leave as it was."""
    out = {}
    for p in [db, Path(f"{db}.wal"), *sorted(Path(f"{db}.acts").rglob("*"))]:
        if p.exists():
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def test_read_only_reads_results_and_refuses_writes_up_front(study, tmp_path):
    db, t = study
    before = files_of(db)
    con = dbd.connect(str(db), progress=False, read_only=True)
    try:
        rows = snapshot(con)
        # results, the pure-SQL macros, the alignment macro over the stored labels, stored activations
        top = con.sql("SELECT hypothesis, unit, score FROM top_units(k := 1) ORDER BY hypothesis").fetchall()
        rows_t = [r for r in t.to_pylist() if r["score"] is not None]
        best = {h: max(((r["unit"], r["score"]) for r in rows_t if r["hypothesis"] == h), key=lambda x: abs(x[1]))
                for h in ("digit", "rx_digits")}
        assert [(h, u) for h, u, _ in top] == [(h, best[h][0]) for h in ("digit", "rx_digits")]
        n = con.sql("SELECT count(*) FROM symbol_labels('snippets', 'chars-test', ['rx_digits'])").fetchall()[0][0]
        assert n == sum(len(x) for x in TEXTS)
        view = con.sql("SELECT view_name FROM behaviors").fetchall()[0][0]
        X, _, _ = planted_per_record(["digit"])
        acts = con.sql(f"SELECT act FROM {view} ORDER BY record_id, pos").fetchnumpy()["act"]
        np.testing.assert_allclose(np.stack(acts), X, atol=1e-6)
        assert {"rx_digits"} <= set(core.registry())
        # a report and an export read it
        r = dbd.report(con, str(tmp_path / "r.html"))
        assert r["query_id"] == t.column("query_id")[0].as_py() and Path(r["path"]).stat().st_size > 1000
        written = dbd.export(con, str(tmp_path / "bi"), activations=True)
        assert "activations" in written
        # every call that writes is refused before it starts, naming read-only; SQL as well
        calls = [
            ("inspect", lambda: dbd.inspect(con, "planted", ["planted"], ["in_string"], "snippets")),
            ("inspect", lambda: con.sql("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                                        "reuse := false)").fetchall()),
            ("annotate", lambda: dbd.annotate(con, ["in_string"], "snippets")),
            ("extract", lambda: dbd.extract(con, "planted", ["mix"], "snippets")),
            ("add_dataset", lambda: dbd.add_dataset(con, "more", ["x = 1\n"])),
            ("register_model", lambda: dbd.register_model(con, "again", planted_adapter())),
            ("define_hypothesis", lambda: con.sql("SELECT define_hypothesis('rx_new', 'a+')").fetchall()),
            ("drop_hypothesis", lambda: dbd.drop_hypothesis(con, "rx_digits")),
            ("drop_dataset", lambda: dbd.drop_dataset(con, "snippets")),
        ]
        for what, call in calls:
            with pytest.raises((DeepBaseError, duckdb.Error), match=f"read-only, and {what} writes"):
                call()
        with pytest.raises(duckdb.Error, match="read-only"):
            con.sql("DELETE FROM scores").fetchall()
        assert snapshot(con) == rows
        assert "rx_new" not in core.registry()
    finally:
        dbd.close(con)
    assert files_of(db) == before


def test_read_only_opens_a_store_other_read_only_processes_hold(study, tmp_path, capsys):
    db, _ = study
    holder = subprocess.Popen(                   # another process reading the store (plain DuckDB: starts at once)
        [sys.executable, "-c", "import duckdb, time\n"
                               f"con = duckdb.connect({str(db)!r}, read_only=True)\n"
                               "print('open', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        status, out, err = cli(capsys, "report", str(db), "--out", str(tmp_path / "r.html"), "--read-only", "--quiet")
        assert status == 0, err
        assert (tmp_path / "r.html").stat().st_size > 1000
        status, out, err = cli(capsys, "export", str(db), str(tmp_path / "bi"), "--read-only", "--quiet")
        assert status == 0, err
        side = duckdb.connect(str(tmp_path / "bi" / "study.duckdb"), read_only=True)
        assert side.sql("SELECT count(*) FROM scores").fetchall() == [(10,)]
        side.close()
        status, out, err = cli(capsys, "shell", str(db), "--read-only", "-c", "SELECT count(*) AS n FROM scores;")
        assert status == 0 and re.search(r"\b10\b", out), err
        status, out, err = cli(capsys, "hypotheses", str(db), "--read-only")
        assert status == 0 and "rx_digits" in out
        # a shell statement that would write: status 1, read-only named
        status, out, err = cli(capsys, "shell", str(db), "--read-only", "-c",
                               "SELECT * FROM inspect('planted', ['planted'], ['in_string'], 'snippets');")
        assert status == 1 and "read-only, and inspect writes" in err
        # opened to write, the store is refused by name, with the way out
        status, out, err = cli(capsys, "report", str(db), "--out", str(tmp_path / "r2.html"))
        assert status == 2 and "--read-only" in err and len(err.splitlines()) == 1
        status, out, err = cli(capsys, "shell", str(db), "--read-only", "--create", "-c", "SELECT 1;")
        assert status == 2 and "--read-only" in err
        status, out, err = cli(capsys, "hypotheses", "--read-only")      # no store: the flag acts on nothing
        assert status == 2 and "give the STORE" in err and not out
    finally:
        holder.kill()
        holder.wait()


def chmod_binds(folder: Path) -> bool:
    """Whether a file made read-only by chmod refuses this process's writes: not for root
    (os.geteuid() 0) unless it lacks CAP_DAC_OVERRIDE (setpriv --bounding-set=-dac_override)."""
    if os.geteuid() != 0:
        return True
    probe = folder / "probe"
    probe.write_text("x")
    os.chmod(probe, stat.S_IRUSR)
    try:
        with open(probe, "a"):
            return False
    except PermissionError:
        return True


def test_read_only_opens_a_file_made_read_only(study, tmp_path):
    db, _ = study
    if not chmod_binds(tmp_path):
        pytest.skip("root writes to files whatever their mode (chmod has no effect)")
    os.chmod(db, stat.S_IRUSR | stat.S_IRGRP)
    try:
        with pytest.raises(DeepBaseError, match="read_only=True"):
            dbd.connect(str(db), progress=False)
        con = dbd.connect(str(db), progress=False, read_only=True)
        try:
            assert con.sql("SELECT count(*) FROM scores").fetchall()[0][0] > 0
            with pytest.raises(DeepBaseError, match="read-only, and inspect writes"):
                dbd.inspect(con, "planted", ["planted"], ["in_string"], "snippets")
        finally:
            dbd.close(con)
    finally:
        os.chmod(db, stat.S_IRUSR | stat.S_IWUSR)


def test_read_only_refuses_what_it_cannot_open_without_writing(tmp_path):
    with pytest.raises(DeepBaseError, match="no store at .*read_only opens an existing store"):
        dbd.connect(str(tmp_path / "none.duckdb"), read_only=True)
    assert not (tmp_path / "none.duckdb").exists()
    with pytest.raises(DeepBaseError, match="existing store file"):
        dbd.connect(None, read_only=True)
    plain = tmp_path / "plain.duckdb"
    duckdb.connect(str(plain)).close()
    with pytest.raises(DeepBaseError, match="not a deepbase_duck store"):
        dbd.connect(str(plain), read_only=True)
    # a store an earlier version wrote (without a migrated column): opened writable once, then read-only
    old = tmp_path / "old.duckdb"
    dbd.close(dbd.connect(str(old), progress=False))
    raw = duckdb.connect(str(old), config={"storage_compatibility_version": "v1.5.0"})
    raw.execute("ALTER TABLE scores DROP COLUMN detail")
    raw.close()
    with pytest.raises(DeepBaseError, match=r"earlier deepbase_duck .*scores\.detail.*without read_only"):
        dbd.connect(str(old), read_only=True)
    raw = duckdb.connect(str(old), read_only=True)
    assert "detail" not in [c for c, *_ in raw.sql("DESCRIBE scores").fetchall()]
    raw.close()
    dbd.close(dbd.connect(str(old), progress=False))
    con = dbd.connect(str(old), progress=False, read_only=True)
    assert con.sql("SELECT count(*) FROM scores").fetchall() == [(0,)]
    dbd.close(con)
