"""The DuckDB 1.5 CLI and BI path: the pure-SQL macros of the README's "In the DuckDB CLI and BI
tools" and "Sampling" sections, run in the real duckdb-cli 1.5.6 and in Python's DuckDB, on a
store and on its export, give the same rows and the same errors."""
from __future__ import annotations

import csv
import hashlib
import io
import math
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

import deepbase_duck as dbd

from conftest import TEXTS, planted_adapter

CLI = Path(sys.executable).parent / "duckdb"


def cli(db: str, sql: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "-readonly", "-csv", "-noheader", db, "-c", sql], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def cli_rows(db: str, sql: str, cwd=None) -> list[tuple]:
    out = cli(db, sql, cwd)
    assert out.returncode == 0, out.stderr
    return [tuple(r) for r in csv.reader(io.StringIO(out.stdout))]


def cli_error(db: str, sql: str) -> str:
    out = cli(db, sql)
    assert out.returncode != 0, f"expected an error from {sql}, got {out.stdout}"
    return out.stderr


def py_rows(db: str, sql: str) -> list[tuple]:
    """Rows as the CLI's CSV writes them (text; NULL as NULL, booleans lower case)."""
    con = duckdb.connect(db, read_only=True)
    try:
        return [tuple("NULL" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in r)
                for r in con.sql(sql).fetchall()]
    finally:
        con.close()


def py_error(db: str, sql: str) -> str:
    con = duckdb.connect(db, read_only=True)
    try:
        with pytest.raises(duckdb.Error) as exc:
            con.sql(sql).fetchall()
        return str(exc.value)
    finally:
        con.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not CLI.exists():
        pytest.skip("duckdb-cli is not installed (pip install duckdb-cli==1.5.6, part of the test extra)")
    root = tmp_path_factory.mktemp("clibi")
    db = str(root / "study.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.inspect(con, "planted", ["planted", "mix"], ["digit", "bracket_depth"], "snippets", baseline=True,
                baseline_seed=1, keep_activations=True)
    dbd.inspect(con, "planted", ["planted"], ["digit", "in_string"], "snippets", measures=["corr", "iou"])
    written = dbd.export(con, str(root / "out"), activations=True, text=True)
    dbd.close(con)
    return {"store": db, "export": written["duckdb"]}


@pytest.mark.parametrize("where", ["store", "export"])
@pytest.mark.parametrize("qid", ["1.5", "'1.5'", "'nan'", "'inf'"])
def test_top_units_refuses_a_qid_that_is_not_a_whole_number(built, where, qid):
    """qid := 1.5 is no query id: it was reported as 'has no scores (no such query)'."""
    sql = f"SELECT * FROM top_units(2, qid := {qid})"
    for err in (cli_error(built[where], sql), py_error(built[where], sql)):
        assert "top_units: qid must be a query id (a whole number)" in err
        assert "no such query" not in err


LIST_ARGS = [
    ("SELECT * FROM top_units(2, measure_name := ['corr'])",
     "top_units: measure_name must name one measure (text), or be NULL (every measure), got ['corr'] of type VARCHAR[]"),
    ("SELECT * FROM compare_scores(['planted'], 'planted~untrained')",
     "compare_scores: model_a must name a model (text), got ['planted'] of type VARCHAR[]"),
    ("SELECT * FROM compare_scores('planted', ['planted~untrained'])",
     "compare_scores: model_b must name a model (text), got ['planted~untrained'] of type VARCHAR[]"),
    ("SELECT * FROM compare_scores('planted', 'planted~untrained', measure_name := ['corr'])",
     "compare_scores: measure_name must name one measure (text), or be NULL (every measure), got ['corr']"),
    ("SELECT * FROM compare_scores('planted', 'planted~untrained', ds := ['snippets'])",
     "compare_scores: ds must name one dataset (text), or be NULL (every dataset), got ['snippets']"),
    ("SELECT * FROM top_units([2])",
     "top_units: k must be a whole number >= 1 (the units per hypothesis), got [2] of type INTEGER[]"),
]


@pytest.mark.parametrize("where", ["store", "export"])
@pytest.mark.parametrize("sql,message", LIST_ARGS)
def test_list_arguments_are_refused_by_name_not_read_as_text(built, where, sql, message):
    """A list where a name goes was compared as text: ['corr'] was the unknown measure '[corr]'."""
    for err in (cli_error(built[where], sql), py_error(built[where], sql)):
        assert message in err
        assert "'[" not in err


def test_compare_scores_counts_a_nan_score_as_null(built, tmp_path):
    """A NaN score (written by hand, or by another tool) sorted first, its delta NaN above every
    number; it now counts as NULL, as in top_units: its row comes last with delta NULL."""
    db = str(tmp_path / "nan.duckdb")
    shutil.copy(built["store"], db)
    con = duckdb.connect(db)
    con.execute("UPDATE scores SET score = 'nan' WHERE model = 'planted' AND layer = 'planted' AND unit = 3 "
                "AND hypothesis = 'digit' AND measure = 'corr'")
    pairs = con.sql("SELECT a.layer, a.unit, a.hypothesis, a.score, b.score FROM scores a JOIN scores b "
                    "USING (query_id, layer, unit, hypothesis, measure) WHERE a.model = 'planted' "
                    "AND b.model = 'planted~untrained' AND a.measure = 'corr' AND a.unit IS NOT NULL").fetchall()
    con.close()
    deltas = np.array([b - a if a is not None and b is not None else np.nan for *_, a, b in pairs], dtype=float)
    largest = np.nanmax(np.abs(deltas))           # the reference: numpy, NaN ignored
    sql = "SELECT layer, unit, hypothesis, score_a, delta FROM compare_scores('planted', 'planted~untrained')"
    for rows in (cli_rows(db, sql), py_rows(db, sql)):
        assert float(rows[0][4]) == pytest.approx(largest, abs=1e-12)
        nan_row = [r for r in rows if r[:3] == ("planted", "3", "digit")]
        assert nan_row == [("planted", "3", "digit", "NULL", "NULL")]
        assert all(r[4] == "NULL" for r in rows[rows.index(nan_row[0]):])    # NULLs last
        assert not any(r[4].lower() == "nan" for r in rows)


def test_export_keeps_a_model_named_null_in_the_cli(tmp_path):
    """DuckDB 1.5's hive reader reads a folder model=NULL (or null) as SQL NULL: the export's
    views read in the CLI merged models 'NULL' and 'null' into one NULL model."""
    if not CLI.exists():
        pytest.skip("duckdb-cli is not installed (pip install duckdb-cli==1.5.6, part of the test extra)")
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        for name in ("NULL", "null", "a b"):
            dbd.register_model(con, name, planted_adapter())
        dbd.add_dataset(con, "NULL", TEXTS[:4])
        dbd.inspect(con, ["NULL", "null", "a b"], ["planted"], ["digit"], "NULL", keep_activations=True)
        written = dbd.export(con, str(tmp_path / "out"), activations=True)
        sql = "SELECT model, layer, count(*), round(sum(score), 9) FROM scores GROUP BY ALL ORDER BY ALL"
        want = [tuple(str(v) for v in r) for r in con.sql(sql).fetchall()]
        act_sql = "SELECT model, dataset, count(*) FROM activations GROUP BY ALL ORDER BY ALL"
        n_symbols = sum(len(t) for t in TEXTS[:4])
    finally:
        dbd.close(con)
    assert len(want) == 3
    assert cli_rows(written["duckdb"], sql) == want
    assert py_rows(written["duckdb"], sql) == want
    assert cli_rows(written["duckdb"], "SELECT count(*) FROM scores WHERE model IS NULL") == [("0",)]
    assert cli_rows(written["duckdb"], act_sql) == [(m, "NULL", str(n_symbols)) for m in ("NULL", "a b", "null")]
    assert cli_rows(written["duckdb"], "SELECT model, count(width) FROM top_units(1) GROUP BY ALL ORDER BY ALL") == [
        ("NULL", "1"), ("a b", "1"), ("null", "1")]


def md5_order(ds: str, ids: list[int], seed: int, stream: str = "order") -> list[int]:
    """The README's seeded order, independently: ids by the first 13 hex digits of
    md5('<stream>:<seed>:<record_id>:<ds>'), ties by id."""
    key = {i: int(hashlib.md5(f"{stream}:{seed}:{i}:{ds}".encode()).hexdigest()[:13], 16) for i in ids}
    return sorted(ids, key=lambda i: (key[i], i))


README_QUERIES = [
    "SELECT * FROM top_units(3)",
    "SELECT * FROM top_units(k := 2, qid := 1, measure_name := NULL, by_layer := true)",
    "SELECT * FROM top_units(2, measure_name := 'iou')",
    "SELECT * FROM compare_scores('planted', 'planted~untrained') LIMIT 10",
    "SELECT * FROM compare_scores('planted', 'planted~untrained', measure_name := NULL, ds := 'snippets')",
    "SELECT hypothesis, count(*), sum(value) FROM symbol_labels('snippets', 'chars-test', ['digit', 'in_string']) "
    "GROUP BY ALL ORDER BY ALL",
    "SELECT * FROM seeded_order('snippets', 3)",
    "SELECT * FROM sample_records('snippets', 5, seed := 1)",
    "SELECT * FROM sample_fraction('snippets', 0.5, 2)",
    "SELECT * FROM train_test_split('snippets', 0.3, 7)",
    "SELECT * FROM stratified_records('snippets', (SELECT tokenization FROM models WHERE name = 'planted'), "
    "'in_string', NULL)",
    "SELECT s.seed, o.* FROM range(3) AS s(seed), LATERAL stratified_records('snippets', 'chars-test', 'digit', 2, "
    "seed := s.seed) AS o ORDER BY ALL",
]


@pytest.mark.parametrize("sql", README_QUERIES)
def test_readme_macros_agree_in_the_cli_and_python_on_store_and_export(built, sql):
    """Every documented macro gives one result: CLI and Python, store and export (floats to 1e-12)."""
    results = [f(built[w], sql) for w in ("store", "export") for f in (cli_rows, py_rows)]
    assert len(results[0]) > 0
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, b in zip(results[0], other):
            for x, y in zip(a, b):
                try:
                    assert math.isclose(float(x), float(y), abs_tol=1e-12)
                except ValueError:
                    assert x == y


@pytest.mark.parametrize("where", ["store", "export"])
def test_cli_sampling_is_the_md5_order(built, where):
    """seeded_order, sample_records and train_test_split in the CLI against hashlib's md5."""
    db = built[where]
    ids = [int(r[0]) for r in cli_rows(db, "SELECT record_id FROM records WHERE dataset = 'snippets'")]
    for seed in (0, 1, 5):
        order = md5_order("snippets", ids, seed)
        assert [int(r[0]) for r in cli_rows(db, f"SELECT record_id FROM seeded_order('snippets', {seed})")] == order
        assert [int(r[0]) for r in cli_rows(db, f"SELECT * FROM sample_records('snippets', 4, {seed})")] == order[:4]
        test = {i for i in ids if int(hashlib.md5(f"split:{seed}:{i}:snippets".encode()).hexdigest()[:13], 16)
                < 0.3 * 2 ** 52}
        got = cli_rows(db, f"SELECT record_id, split FROM train_test_split('snippets', 0.3, {seed})")
        assert {int(i) for i, s in got if s == "test"} == test and len(got) == len(ids)


def test_export_written_from_a_relative_path_reads_from_any_directory(tmp_path, monkeypatch):
    """dbd.export(con, 'out') from one working directory; the CLI opens out/study.duckdb from
    another (the views name each file by its absolute path) and reads the store's rows."""
    if not CLI.exists():
        pytest.skip("duckdb-cli is not installed (pip install duckdb-cli==1.5.6, part of the test extra)")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    con = dbd.connect("s.duckdb", progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS[:4])
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
        dbd.export(con, "out", text=True)
        want = [tuple(str(v) for v in r) for r in con.sql("SELECT model, layer, unit, round(score, 9) FROM top_units(2)")
                .fetchall()]
    finally:
        dbd.close(con)
    db = str(work / "out" / "study.duckdb")
    assert cli_rows(db, "SELECT model, layer, unit, round(score, 9) FROM top_units(2)", cwd="/") == want
    assert cli_rows(db, "SELECT count(*) FROM seeded_order('snippets')", cwd=str(tmp_path)) == [("4",)]
