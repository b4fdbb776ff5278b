"""Edge cases of the pure-SQL macros (sql/10_alignment.sql, 20_sampling.sql, 30_results.sql): a NULL
or unknown name (hypothesis, tokenisation, dataset, model, measure, query id) is an error that
names the argument and its value and says what is allowed, never an empty result that reads as
"nothing there"; compare_scores' measure_name := NULL compares every measure, as top_units' ranks
every measure; stratified_records refuses a hypothesis whose labelled records are all of one class.

One store file is built for the module and closed; every case runs in a read-only Python
connection and in the DuckDB 1.5 CLI (pip package duckdb-cli), which reads the macros stored in
the file. ``build_store`` and ``ERRORS`` are importable, so the cases can be replayed against
older macro files.
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import deepbase_duck as dbd
from deepbase_duck.hypotheses.core import Hypothesis, register

from conftest import TEXTS, planted_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

CLI = Path(sys.executable).parent / "duckdb"
TOK = "chars-test"
NO_SCORES_QID = 50        # a queries row without scores, as a compare_layers query leaves


def edge_zero(text):      # binary, 0 everywhere: one class (0) on every record
    return [False] * len(text)


def edge_first(text):     # binary, 1 on the first character: every record holds both classes
    return [i == 0 for i in range(len(text))]


def edge_cat(text):       # categorical, every character 'y': one class (code 1)
    return ["y"] * len(text)


def build_store(path: str) -> None:
    """snippets (24 records, symbols of chars-test) with labels of digit and the edge_*
    hypotheses; query 1 scores planted and its untrained copy with corr (digit, bracket_depth),
    query 2 planted alone with iou (digit), and query 50 wrote no scores."""
    register(Hypothesis("edge_zero", edge_zero, "binary"))
    register(Hypothesis("edge_first", edge_first, "binary"))
    register(Hypothesis("edge_cat", edge_cat, "categorical", categories=("x", "y")))
    con = dbd.connect(path, progress=False)
    try:
        dbd.register_model(con, "planted", planted_adapter())
        dbd.add_dataset(con, "snippets", TEXTS)
        dbd.extract(con, "planted", ["planted"], "snippets")               # stores the symbols
        dbd.inspect(con, "planted", ["planted", "mix"], ["digit", "bracket_depth"], "snippets", baseline=True)
        dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", measures=["iou"])
        dbd.annotate(con, ["digit", "edge_zero", "edge_first", "edge_cat"], "snippets")
        con.execute("INSERT INTO queries (query_id, model, dataset) VALUES (?, 'planted', 'snippets')", [NO_SCORES_QID])
        assert con.sql("SELECT DISTINCT query_id FROM scores ORDER BY 1").fetchall() == [(1,), (2,)]
    finally:
        dbd.close(con)


# (query, fragments its error must hold): each was an empty result (or, for the count(*)
# cases, rows) before
ERRORS = [
    # 2. stratified_records: a NULL hypothesis
    ("SELECT * FROM stratified_records('snippets', 'chars-test', NULL, NULL)",
     ["stratified_records: hyp must name a hypothesis, got NULL",
      "hyp must name a binary or categorical hypothesis of this store: 'digit', 'edge_cat', 'edge_first', "
      "'edge_zero'"]),
    # 3. stratified_records: one class present
    ("SELECT * FROM stratified_records('snippets', 'chars-test', 'edge_zero', NULL)",
     ["stratified_records: hypothesis 'edge_zero' has a single class over the labelled records of dataset "
      "'snippets' (tok 'chars-test'): class 0, 24 records; a balanced set needs records of at least two classes"]),
    ("SELECT * FROM stratified_records('snippets', 'chars-test', 'edge_zero', 5, seed := 2)",
     ["hypothesis 'edge_zero' has a single class", "class 0, 24 records"]),
    ("SELECT * FROM stratified_records('snippets', 'chars-test', 'edge_cat', 3)",
     ["hypothesis 'edge_cat' has a single class", "class 1 ('y'), 24 records"]),
    ("SELECT * FROM stratified_records('snippets', 'chars-test', 'edge_first', NULL)",
     ["hypothesis 'edge_first' has a single class", "class 0, 24 records, as each of them holds it besides "
      "other classes"]),
    # 4. stratified_records: an unknown or NULL tokenisation, an unknown or NULL dataset
    ("SELECT * FROM stratified_records('snippets', 'nope-tok', 'digit', NULL)",
     ["stratified_records: tok 'nope-tok' has no symbols stored for dataset 'snippets' "
      "(tokenisations with symbols there: 'chars-test';"]),
    ("SELECT * FROM stratified_records('snippets', NULL, 'digit', NULL)",
     ["stratified_records: tok must name a tokenisation with symbols stored for dataset 'snippets', got NULL"]),
    ("SELECT * FROM stratified_records('nope', 'chars-test', 'digit', NULL)",
     ["stratified_records: ds 'nope' is not a dataset of this store (datasets: 'snippets')"]),
    ("SELECT * FROM stratified_records(NULL, 'chars-test', 'digit', 4)",
     ["stratified_records: ds must name a dataset, got NULL"]),
    # 5. top_units: a measure not in the query, an unknown query, a query that wrote no scores,
    # and the default measure absent from the latest query with scores
    ("SELECT * FROM top_units(3, measure_name := 'cor')",
     ["top_units: measure_name 'cor' has no unit scores in query 2 (the latest query with scores); "
      "its measures with unit scores: 'iou' (measure_name := NULL ranks every measure)"]),
    ("SELECT * FROM top_units(3, qid := 1, measure_name := 'iou')",
     ["top_units: measure_name 'iou' has no unit scores in query 1; its measures with unit scores: 'corr'"]),
    ("SELECT * FROM top_units(3, qid := 99)",
     ["top_units: qid 99 has no scores (no such query); qid must be NULL (the latest query with scores) or a "
      "query with scores: 1, 2"]),
    (f"SELECT * FROM top_units(3, qid := {NO_SCORES_QID})",
     [f"top_units: qid {NO_SCORES_QID} has no scores (the query wrote none: a compare_layers query writes "
      "similarities)"]),
    ("SELECT * FROM top_units(3)", ["top_units: measure_name 'corr' has no unit scores in query 2 (the latest"]),
    # 6. symbol_labels: NULL hypotheses, unknown names in them, an unknown tokenisation
    ("SELECT * FROM symbol_labels('snippets', 'chars-test', NULL)",
     ["symbol_labels: hyps must be a list of hypothesis names, got NULL"]),
    ("SELECT * FROM symbol_labels('snippets', 'chars-test', ['digit', 'nope', NULL])",
     ["symbol_labels: hyps holds names that are not hypotheses of this store: 'nope', NULL (hypotheses: "
      "'bracket_depth', 'digit', 'edge_cat', 'edge_first', 'edge_zero')"]),
    ("SELECT * FROM symbol_labels('snippets', 'nope-tok', ['digit'])",
     ["symbol_labels: tok 'nope-tok' has no symbols stored for dataset 'snippets' (tokenisations with symbols "
      "there: 'chars-test'"]),
    ("SELECT * FROM symbol_labels(NULL, 'chars-test', ['digit'])", ["symbol_labels: ds must name a dataset, got NULL"]),
    # 1. and the same pattern in compare_scores: unknown or NULL models, measures, datasets
    ("SELECT * FROM compare_scores('planted', 'nope')",
     ["compare_scores: model_b 'nope' has no unit scores; models with unit scores: 'planted', 'planted~untrained'"]),
    ("SELECT * FROM compare_scores(NULL, 'planted')",
     ["compare_scores: model_a must name a model with unit scores, got NULL"]),
    ("SELECT * FROM compare_scores('planted', 'planted~untrained', measure_name := 'cor')",
     ["compare_scores: measure_name 'cor' has no unit scores of model_a 'planted'; its measures: 'corr', 'iou' "
      "(measure_name := NULL compares every measure)"]),
    ("SELECT * FROM compare_scores('planted', 'planted~untrained', measure_name := 'iou')",
     ["compare_scores: measure_name 'iou' has no unit scores of model_b 'planted~untrained'; its measures: 'corr'"]),
    ("SELECT * FROM compare_scores('planted', 'planted~untrained', ds := 'snipets')",
     ["compare_scores: ds 'snipets' is not a dataset of this store; ds must be NULL (every dataset) or one of: "
      "'snippets'"]),
    # the sampling macros: an unknown or NULL dataset
    ("SELECT * FROM seeded_order('nope')", ["seeded_order: ds 'nope' is not a dataset of this store (datasets: "
                                            "'snippets')"]),
    ("SELECT * FROM sample_records(NULL, 3)", ["sample_records: ds must name a dataset, got NULL"]),
    ("SELECT * FROM sample_records('nope', 3, seed := 1)", ["sample_records: ds 'nope' is not a dataset"]),
    ("SELECT * FROM sample_fraction('nope', 0.5)", ["sample_fraction: ds 'nope' is not a dataset"]),
    ("SELECT * FROM train_test_split(NULL)", ["train_test_split: ds must name a dataset, got NULL"]),
    # a guard's error was pruned when the query read none of its columns: seeded_order gave the
    # 24 records plus a NULL row for a bad seed
    ("SELECT count(*) FROM seeded_order('snippets', seed := 2.5)",
     ["seeded_order: seed must be a non-negative integer or NULL, got 2.5"]),
    ("SELECT rank FROM seeded_order('snippets', seed := -1)", ["seeded_order: seed must be a non-negative integer"]),
    ("SELECT count(*) FROM seeded_order(NULL)", ["seeded_order: ds must name a dataset, got NULL"]),
    ("SELECT pos FROM symbol_labels('snippets', 'chars-test', NULL)", ["symbol_labels: hyps must be a list"]),
    ("SELECT count(unit) FROM top_units(3, qid := 99)", ["top_units: qid 99 has no scores"]),
    ("SELECT count(unit) FROM compare_scores('planted', 'nope')", ["compare_scores: model_b 'nope'"]),
]

# argument errors come before the data's: a bad count with one class present names the count
ERRORS.append(("SELECT * FROM stratified_records('snippets', 'chars-test', 'edge_zero', -1)",
               ["stratified_records: n_per_class must be a non-negative integer or NULL, got -1"]))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sql_edge") / "edge.duckdb")
    build_store(path)
    return path


@pytest.fixture(scope="module")
def ro(store):
    con = duckdb.connect(store, read_only=True)
    yield con
    con.close()


def cli(store: str, sql: str) -> subprocess.CompletedProcess:
    if not CLI.exists():
        pytest.skip("duckdb-cli is not installed")
    return subprocess.run([str(CLI), "-readonly", "-csv", "-noheader", store, "-c", sql],
                          capture_output=True, text=True, timeout=120)


def python_error(con, sql: str) -> str:
    with pytest.raises(duckdb.Error) as info:
        con.sql(sql).fetchall()
    return str(info.value)


@pytest.mark.parametrize("sql,fragments", ERRORS, ids=[f"{i}" for i in range(len(ERRORS))])
def test_error_names_the_argument_in_python(ro, sql, fragments):
    msg = python_error(ro, sql)
    for fragment in fragments:
        assert fragment in msg


@pytest.mark.parametrize("sql,fragments", ERRORS, ids=[f"{i}" for i in range(len(ERRORS))])
def test_error_names_the_argument_in_the_duckdb_cli(store, sql, fragments):
    out = cli(store, sql)
    assert out.returncode != 0, out.stdout
    for fragment in fragments:
        assert fragment in out.stderr + out.stdout


# -- good arguments: the rows, in Python and in the CLI ---------------------------------------

def cli_rows(store: str, sql: str) -> list[tuple]:
    out = cli(store, sql)
    assert out.returncode == 0, out.stderr
    return [tuple(r) for r in csv.reader(io.StringIO(out.stdout))]


def test_compare_scores_null_measure_compares_every_measure(store, ro):
    """measure_name := NULL: the rows of each measure, as its own call gives them, with the
    measure in the last column (it gave no rows)."""
    cols = "layer, unit, hypothesis, score_a, score_b, delta, dataset"
    every = ro.sql(f"SELECT {cols}, measure FROM compare_scores('planted', 'planted', measure_name := NULL) "
                   "ORDER BY ALL").fetchall()
    per_measure = sorted(r + (m,) for m in ("corr", "iou") for r in ro.sql(
        f"SELECT {cols} FROM compare_scores('planted', 'planted', measure_name := '{m}')").fetchall())
    assert every == per_measure and {r[-1] for r in every} == {"corr", "iou"}
    assert len(every) == 18 + 5                            # corr: 9 units x 2 hypotheses; iou: 5 units x digit
    base = ro.sql(f"SELECT {cols}, measure FROM compare_scores('planted', 'planted~untrained')").fetchall()
    assert ro.sql(f"SELECT {cols}, measure FROM compare_scores('planted', 'planted~untrained', "
                  "measure_name := NULL)").fetchall() == base
    assert len(base) == 18 and {r[-1] for r in base} == {"corr"}
    got = cli_rows(store, "SELECT measure, count(*) FROM compare_scores('planted', 'planted', measure_name := NULL) "
                          "GROUP BY ALL ORDER BY ALL")
    assert got == [("corr", "18"), ("iou", "5")]


def test_top_units_null_qid_is_the_latest_query_with_scores(store, ro):
    """Query 50 is the latest row of `queries` but wrote no scores: qid NULL ranks query 2."""
    latest = ro.sql("SELECT unit, score FROM top_units(2, measure_name := 'iou')").fetchall()
    assert latest == ro.sql("SELECT unit, score FROM top_units(2, qid := 2, measure_name := 'iou')").fetchall()
    assert len(latest) == 2
    assert cli_rows(store, "SELECT count(*) FROM top_units(3, measure_name := NULL)") == [("3",)]


def test_good_arguments_keep_their_rows(store, ro):
    """Two classes present: the balanced set; a registered dataset without labels of the
    hypothesis, or an empty hyps list, still gives no rows."""
    rows = ro.sql("SELECT class, count(*) FROM stratified_records('snippets', 'chars-test', 'digit', NULL) "
                  "GROUP BY ALL ORDER BY ALL").fetchall()
    assert rows == [(0, 3), (1, 3)]                        # only "no digits here" (x 3) has no digit
    assert cli_rows(store, "SELECT class, count(*) FROM stratified_records('snippets', 'chars-test', 'digit', "
                           "NULL) GROUP BY ALL ORDER BY ALL") == [("0", "3"), ("1", "3")]
    assert ro.sql("SELECT count(*) FROM symbol_labels('snippets', 'chars-test', [])").fetchall() == [(0,)]
    n = sum(len(t) for t in TEXTS)
    assert ro.sql("SELECT count(*) FROM symbol_labels('snippets', 'chars-test', ['digit', 'edge_cat'])"
                  ).fetchall() == [(2 * n,)]
    assert ro.sql("SELECT count(*) FROM seeded_order('snippets', seed := 3)").fetchall() == [(24,)]


def test_empty_store_top_units_has_nothing_to_rank(con):
    """No scores at all: qid NULL names no query, and top_units gives no rows (a qid is an error)."""
    assert con.sql("SELECT * FROM top_units()").fetchall() == []
    assert "qid 1 has no scores (no such query)" in python_error(con, "SELECT * FROM top_units(qid := 1)")
    assert "none, nothing is scored" in python_error(con, "SELECT * FROM top_units(qid := 1)")


def test_registered_empty_dataset_gives_no_rows(con):
    con.execute("INSERT INTO datasets (name) VALUES ('empty')")
    for sql in ["seeded_order('empty')", "sample_records('empty', 3)", "sample_fraction('empty', 0.5)",
                "train_test_split('empty')"]:
        assert con.sql(f"SELECT * FROM {sql}").fetchall() == []
