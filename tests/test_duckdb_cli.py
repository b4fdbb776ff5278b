"""The store in the real DuckDB CLI (duckdb-cli 1.5.6): catalog tables, behavior views over
Parquet, and the pure-SQL macros (alignment, results) give the rows Python gives."""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

import deepbase_duck as dbd

from conftest import TEXTS, planted_adapter

CLI = Path(sys.executable).parent / "duckdb"


def cli_rows(db: str, sql: str) -> list[tuple]:
    out = subprocess.run([str(CLI), "-readonly", "-csv", "-noheader", db, "-c", sql], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [tuple(r) for r in csv.reader(io.StringIO(out.stdout))]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    if not CLI.exists():
        pytest.skip("duckdb-cli is not installed (pip install duckdb-cli==1.5.6, part of the test extra)")
    db = str(tmp_path_factory.mktemp("cli") / "study.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    view = dbd.extract(con, "planted", ["planted"], "snippets")[0]["view"]
    dbd.inspect(con, "planted", ["planted", "mix"], ["digit", "bracket_depth"], "snippets", baseline=True,
                baseline_seed=1)
    # a second dataset, scored later for both models: compare_scores pairs scores per dataset
    dbd.add_dataset(con, "other", [t + "7 (x) 8\n" for t in TEXTS[:8]])
    dbd.inspect(con, "planted", ["planted", "mix"], ["digit"], "other", baseline=True, baseline_seed=1)
    queries = {
        "top": "SELECT model, hypothesis, rank, layer, unit, round(score, 9) FROM top_units(2)",
        "separated": "SELECT model, hypothesis, layer, rank, unit, separated::INTEGER FROM top_units(3, "
                     "measure_name := NULL, by_layer := true)",
        "compare": "SELECT layer, unit, hypothesis, round(delta, 9) FROM compare_scores('planted', "
                   "'planted~untrained') LIMIT 5",
        "compare_datasets": "SELECT dataset, count(*), count(DISTINCT hypothesis) FROM compare_scores('planted', "
                            "'planted~untrained') GROUP BY ALL ORDER BY ALL",
        "compare_ds": "SELECT dataset, layer, unit, hypothesis, round(coalesce(score_a, -9), 9), "   # a constant
                      "round(coalesce(score_b, -9), 9) FROM compare_scores('planted', "          # unit: NULL
                      "'planted~untrained', ds := 'other') ORDER BY ALL",
        "view": f"SELECT count(*), sum(act[1])::DECIMAL(18, 4) FROM {view}",
        "labels": "SELECT hypothesis, count(*), sum(value) FROM symbol_labels('snippets', 'chars-test', "
                  "['digit', 'bracket_depth']) GROUP BY ALL ORDER BY ALL",
        "catalog": "SELECT name, kind FROM hypotheses ORDER BY name",
    }
    want = {k: con.sql(q).fetchall() for k, q in queries.items()}
    dbd.close(con)
    return db, queries, want


@pytest.mark.parametrize("name", ["top", "separated", "compare", "compare_datasets", "compare_ds", "view",
                                  "labels", "catalog"])
def test_cli_gives_the_rows_python_gives(store, name):
    db, queries, want = store
    got = cli_rows(db, queries[name])
    assert len(got) == len(want[name]) > 0
    for g, w in zip(got, want[name]):
        for a, b in zip(g, w):
            if isinstance(b, float):
                assert float(a) == pytest.approx(b, abs=1e-9)
            else:
                assert a == ("" if b is None else str(b))


def test_compare_scores_pairs_per_dataset(store):
    """Both models were scored on 'snippets' (digit, bracket_depth) and later on 'other' (digit):
    one row per dataset, and ds := keeps one dataset (the rows Python and the CLI agree on above)."""
    db, queries, want = store
    # 2 layers: 'planted' (5 units) and 'mix' (4 units)
    assert want["compare_datasets"] == [("other", 9, 1), ("snippets", 18, 2)]
    assert {r[0] for r in want["compare_ds"]} == {"other"} and len(want["compare_ds"]) == 9


def test_cli_reads_an_export_as_the_store_has_it(tmp_path):
    """An export read in the DuckDB 1.5 CLI: a model and a dataset named like numbers stay
    VARCHAR ('007'), columns keep the store's order and act its FLOAT[width]; the export's
    folder is named 'out[1]' beside a folder 'out1' that a glob of that name would read."""
    if not CLI.exists():
        pytest.skip("duckdb-cli is not installed (pip install duckdb-cli==1.5.6, part of the test extra)")
    con = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    try:
        dbd.register_model(con, "007", planted_adapter())
        dbd.add_dataset(con, "2024", TEXTS[:4])
        dbd.inspect(con, "007", ["planted"], ["digit"], "2024", keep_activations=True)
        dbd.export(con, str(tmp_path / "out1"))
        dbd.inspect(con, "007", ["mix"], ["digit"], "2024")
        written = dbd.export(con, str(tmp_path / "out[1]"), activations=True)
        want = [(c, t) for c, t, *_ in con.sql("DESCRIBE scores").fetchall()]
        n_scores = con.sql("SELECT count(*) FROM scores").fetchall()[0][0]
    finally:
        dbd.close(con)
    db = written["duckdb"]
    assert cli_rows(db, "SELECT column_name, column_type FROM (DESCRIBE scores)") == want
    assert cli_rows(db, "SELECT column_name, column_type FROM (DESCRIBE activations)") == [
        ("model", "VARCHAR"), ("layer", "VARCHAR"), ("dataset", "VARCHAR"), ("record_id", "INTEGER"),
        ("pos", "INTEGER"), ("act", "FLOAT[5]")]
    assert cli_rows(db, "SELECT model, count(*) FROM scores GROUP BY ALL") == [("007", str(n_scores))]
    assert cli_rows(db, "SELECT DISTINCT model, dataset FROM activations") == [("007", "2024")]
