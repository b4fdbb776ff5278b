"""The SQL surface passes its arguments on as Python would: model names of any spelling, only
measures as params keys, no rounding of whole-number arguments, max_chars 0 refused, and
add_stdlib_dataset builds the CLI's records; compare_layers takes a model name holding ':';
the CLI's top-units table tells checkpoints apart."""
from __future__ import annotations

import re

import duckdb
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

from conftest import TEXTS, planted_adapter, snapshot

AWKWARD = ["ck(1)", "ck(2)", "a=b: c", "in side", "it's, odd"]   # (outer spaces are refused: test_names17)


def sql_error(con, query: str) -> str:
    with pytest.raises(duckdb.Error) as exc:
        con.sql(query).fetchall()
    return str(exc.value)


def test_sql_inspect_takes_a_list_of_models_with_any_names(con):
    """Names with ( ) : = ' , and inner spaces round-trip through the macro, as in Python."""
    for name in AWKWARD:
        dbd.register_model(con, name, planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    listed = ", ".join("'" + n.replace("'", "''") + "'" for n in AWKWARD)
    rows = con.sql(f"SELECT model, count(*) FROM inspect([{listed}], ['planted'], ['digit'], 'snippets') "
                   "GROUP BY ALL ORDER BY ALL").fetchall()
    assert rows == sorted((n, 5) for n in AWKWARD)
    # one name on its own, and a name that looks like a list
    dbd.register_model(con, "[x, y]", planted_adapter())
    for name in ["it's, odd", "[x, y]"]:
        got = con.sql("SELECT DISTINCT model FROM inspect(?, ['planted'], ['digit'], 'snippets')",
                      params=[name]).fetchall()
        assert got == [(name,)]


def test_sql_params_keys_must_be_measures(planted):
    before = snapshot(planted)
    base = "SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets', params := '{}')"
    for key in ["store_scores", "seed", "limit"]:
        msg = sql_error(planted, base.replace("'{}'", "'{\"%s\": {}}'" % key))
        assert f"params key '{key}' is not a measure; valid measures: " in msg and "corr" in msg
    assert snapshot(planted) == before                  # nothing scanned, nothing stored
    # a measure's own settings still pass
    rows = planted.sql(base.replace("'{}'", "'{\"corr\": {\"intervals\": \"symbols\"}}'")).fetchall()
    assert rows == [(5,)] and snapshot(planted)["scores"] == before["scores"] + 5


@pytest.mark.parametrize("setting,python,message", [
    ("max_records := 2.5", dict(limit=2.5), "limit must be an integer >= 0, got 2.5"),
    ("top_k := 1.6", dict(top_k=1.6), "top_k must be a positive integer, got 1.6"),
    ("batch_size := 1.5", dict(batch_size=1.5), "batch_size must be an integer >= 1, got 1.5"),
    ("seed := 0.4, max_error := 0.5", dict(seed=0.4, max_error=0.5), "seed must be an integer >= 0, got 0.4"),
    ("stable_windows := 2.5, top_k := 2", dict(stable_windows=2.5, top_k=2),
     "stable_windows must be a positive integer, got 2.5"),
    ("baseline_seed := 0.5, baseline := true", dict(baseline_seed=0.5, baseline=True),
     "baseline_seed must be an integer >= 0, got 0.5"),
    ("max_records := 'many'", None, "inspect: max_records must be a number, got 'many'"),
])
def test_sql_refuses_fractions_as_python_does(planted, setting, python, message):
    before = snapshot(planted)
    msg = sql_error(planted, f"SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', {setting})")
    assert message in msg
    if python is not None:                              # the Python API's own refusal, word for word
        with pytest.raises(DeepBaseError) as exc:
            dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", **python)
        assert str(exc.value) == message
    assert snapshot(planted) == before


def test_sql_whole_numbers_still_work(planted):
    """Integer literals, 2.0 and a seed beyond a double's exact integers pass unrounded."""
    n3 = planted.sql("SELECT max(n) FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                     "max_records := 3)").fetchall()[0][0]
    n2 = planted.sql("SELECT max(n) FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                     "max_records := 2.0, reuse := false)").fetchall()[0][0]
    assert n2 == sum(len(t) for t in TEXTS[:2]) and n3 == sum(len(t) for t in TEXTS[:3])
    planted.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                "max_error := 0.5, seed := 12345678901234567)").fetchall()
    assert planted.sql("SELECT params->>'seed' FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == \
        [("12345678901234567",)]


def test_sql_compare_layers_and_extract_refuse_fractions(planted):
    before = snapshot(planted)
    q = "SELECT * FROM compare_layers(['planted:planted', 'planted:mix'], 'snippets', {})"
    assert "limit must be an integer >= 0, got 2.5" in sql_error(planted, q.format("max_records := 2.5"))
    assert "batch_size must be an integer >= 1, got 1.5" in sql_error(planted, q.format("batch_size := 1.5"))
    assert "batch_size must be an integer >= 1, got 2.5" in sql_error(
        planted, "SELECT * FROM extract_activations('planted', ['planted'], 'snippets', batch_size := 2.5)")
    assert snapshot(planted) == before
    assert planted.sql(q.format("max_records := 3")).fetchall()[0][-1] == sum(len(t) for t in TEXTS[:3])


def test_sql_compare_layers_splits_groups_at_the_last_colon(con):
    dbd.register_model(con, "run:1", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    want = dbd.compare_layers(con, [("run:1", "planted"), ("run:1", "mix")], "snippets").to_pylist()[0]
    got = con.sql("SELECT model_a, layer_a, model_b, layer_b, score FROM "
                  "compare_layers(['run:1:planted', 'run:1:mix'], 'snippets')").fetchall()
    assert got == [("run:1", "planted", "run:1", "mix", pytest.approx(want["score"]))]
    for group, side in [(":planted", "model"), ("run:1:", "layer")]:
        msg = sql_error(con, f"SELECT * FROM compare_layers(['{group}', 'run:1:mix'], 'snippets')")
        assert f"unit group '{group}' has an empty {side}" in msg


def test_sql_add_stdlib_dataset_refuses_max_chars_0(con):
    msg = sql_error(con, "SELECT add_stdlib_dataset('code', limit_chars := 1000, max_chars := 0)")
    assert "max_chars must be an integer >= 1, got 0" in msg
    assert con.sql("SELECT count(*) FROM records").fetchall() == [(0,)]


def test_cli_add_stdlib_and_sql_give_the_same_records(tmp_path, capsys):
    from deepbase_duck.cli import main
    db = str(tmp_path / "s.duckdb")
    assert main(["--quiet", "add-stdlib", db, "cli", "--chars", "3000", "--max-chars", "300"]) == 0
    assert main(["--quiet", "add-stdlib", db, "zero", "--chars", "3000", "--max-chars", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-chars must be an integer >= 1, got 0" in err and err.strip().count("\n") == 0
    con = dbd.connect(db, progress=False)
    try:
        assert con.sql("SELECT add_stdlib_dataset('sql', limit_chars := 3000, max_chars := 300)").fetchall()[0][0] > 1
        rows = {d: con.sql("SELECT source, text FROM records WHERE dataset = ? ORDER BY record_id",
                           params=[d]).fetchall() for d in ("cli", "sql")}
        desc = con.sql("SELECT count(DISTINCT description) FROM datasets").fetchall()
    finally:
        dbd.close(con)
    assert rows["cli"] == rows["sql"] and len(rows["cli"]) > 1
    assert desc == [(1,)]


def test_cli_top_units_table_names_the_model_of_each_checkpoint(con):
    from deepbase_duck.cli import top_units_table
    for name in ["early", "final"]:
        dbd.register_model(con, name, planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    qid = dbd.inspect(con, ["early", "final"], ["planted"], ["digit"], "snippets").column("query_id")[0].as_py()
    lines = top_units_table(con, qid, 2).splitlines()
    assert lines[0].split()[:3] == ["hypothesis", "model", "layer"]
    assert [ln[19:].split()[:2] for ln in lines[2:]] == [["early", "planted"]] * 2 + [["final", "planted"]] * 2
    qid = dbd.inspect(con, "early", ["planted"], ["digit"], "snippets", baseline=True).column("query_id")[0].as_py()
    lines = top_units_table(con, qid, 1).splitlines()
    assert "model" not in lines[0] and [ln[19:].split()[0] for ln in lines[2:]] == ["planted", "planted~u"]


def test_sql_dataset_builders_refuse_fractions_as_python_does(con):
    """add_stdlib_dataset and add_ptb_dataset took their counts through a BIGINT cast (2.5 -> 3)."""
    from deepbase_duck.corpora.ptb import ptb_records
    from deepbase_duck.corpora.stdlib import stdlib_records
    before = con.sql("SELECT count(*) FROM datasets").fetchall()
    for sql, message in [
        ("SELECT add_stdlib_dataset('x', limit_chars := 2500.5)", "limit_chars must be an integer >= 1, got 2500.5"),
        ("SELECT add_stdlib_dataset('x', limit_chars := 3000, max_chars := 1.5)", "max_chars must be an integer >= 1, got 1.5"),
        ("SELECT add_ptb_dataset('p', n := 2.5)", "n must be an integer >= 1, got 2.5"),
        ("SELECT add_ptb_dataset('p', n := 3, seed := 0.5)", "seed must be an integer >= 0, got 0.5"),
    ]:
        with pytest.raises(Exception, match=re.escape(message)):
            con.sql(sql).fetchall()
    assert con.sql("SELECT count(*) FROM datasets").fetchall() == before
    with pytest.raises(dbd.DeepBaseError, match=re.escape("n must be an integer >= 1, got 2.5")):
        ptb_records("test", 2.5)
    with pytest.raises(dbd.DeepBaseError, match=re.escape("max_chars must be an integer >= 1, got 0")):
        stdlib_records("heldout", 0, 100)
    assert con.sql("SELECT add_ptb_dataset('p', n := 3.0, seed := 1)").fetchall() == [(3,)]


# == bug hunt on the user-facing surfaces: compare_scores, sampling arguments, dbd.cursor, CLI ==

import json
import subprocess
import sys
import threading
from pathlib import Path

DUCKDB_CLI = Path(sys.executable).parent / "duckdb"


def _query(con, qid, dataset, models, n_records, n_symbols, record_count, seed=0):
    params = json.dumps({"models": models, "record_count": record_count, "records_used": n_records, "seed": seed})
    con.execute("INSERT INTO queries (query_id, model, dataset, params, n_records, n_symbols) VALUES (?, ?, ?, ?, ?, ?)",
                [qid, models[0], dataset, params, n_records, n_symbols])


def _score(con, qid, model, unit, score, layer="l0", hypothesis="h"):
    con.execute("INSERT INTO scores (query_id, model, layer, unit, hypothesis, measure, score) "
                "VALUES (?, ?, ?, ?, ?, 'corr', ?)", [qid, model, layer, unit, hypothesis, score])


def _fill_record_sets(con):
    """Units 0-2 of models a and b: scored together over all 8 records of 'd' (query 1), then
    a alone over 3 records (max_records), b alone over the first 3 records of a seeded order
    (an early stop: 3 of 8 selected), and finally both together over those 3 records for unit 2."""
    _query(con, 1, "d", ["a", "a~untrained"], 8, 100, 8)
    for u in range(3):
        _score(con, 1, "a", u, 0.1 * u)
        _score(con, 1, "b", u, 0.5 + 0.1 * u)
    _query(con, 2, "d", ["a"], 3, 40, 3)               # max_records := 3
    _query(con, 3, "d", ["b"], 3, 40, 8, seed=1)       # stopped early after 3 of 8 (seed 1)
    for u in range(3):
        _score(con, 2, "a", u, -0.9)
        _score(con, 3, "b", u, 0.9)
    _query(con, 4, "d", ["a", "b"], 3, 40, 3)          # both over the max_records := 3 records
    _score(con, 4, "a", 2, 0.25)
    _score(con, 4, "b", 2, 0.75)


COMPARE_WANT = {0: (0.0, 0.5), 1: (0.1, 0.6), 2: (0.25, 0.75)}


def test_compare_scores_pairs_only_scores_over_the_same_records(con):
    """A later max_records or early-stopped query of one model is not paired with the other
    model's full scan (they were: each model's latest score per dataset, whatever its records)."""
    _fill_record_sets(con)
    rows = con.sql("SELECT unit, score_a, score_b, delta, dataset FROM compare_scores('a', 'b')").fetchall()
    got = {u: (pytest.approx(sa), pytest.approx(sb)) for u, sa, sb, _, _ in rows}
    assert len(rows) == 3 and got == COMPARE_WANT
    assert all(d == pytest.approx(sb - sa) and ds == "d" for _, sa, sb, d, ds in rows)
    # the early-stopped 3 records of b (seed 1) are not a's max_records 3 records, nor a later
    # early stop with another seed
    _query(con, 5, "d", ["a"], 3, 40, 8, seed=2)
    _score(con, 5, "a", 0, 0.33)
    assert {r[0]: r[1] for r in con.sql("SELECT unit, score_a FROM compare_scores('a', 'b')").fetchall()}[0] == 0.0
    _query(con, 6, "d", ["a"], 3, 40, 8, seed=1)      # the same seeded order as b's query 3: paired
    _score(con, 6, "a", 0, 0.33)
    assert con.sql("SELECT score_a, score_b FROM compare_scores('a', 'b') WHERE unit = 0").fetchall() == \
        [(pytest.approx(0.33), pytest.approx(0.9))]
    # a model never scored over the records of the other: no row, not a mixed pair
    _query(con, 7, "d", ["c"], 5, 60, 5)
    _score(con, 7, "c", 0, 0.1)
    assert con.sql("SELECT count(*) FROM compare_scores('a', 'c')").fetchall() == [(0,)]


def test_compare_scores_pairs_a_baseline_with_its_model_after_a_later_subset_query(planted):
    """The reported case: baseline := true over every record, then the model alone with
    max_records := 3: the deltas stay those of the baseline query."""
    full = dbd.inspect(planted, "planted", ["planted", "mix"], ["digit"], "snippets", baseline=True).to_pylist()
    want = {}
    for r in full:
        if r["unit"] is not None:
            want.setdefault((r["layer"], r["unit"]), {})[r["model"]] = r["score"]
    dbd.inspect(planted, "planted", ["planted", "mix"], ["digit"], "snippets", limit=3)
    rows = planted.sql("SELECT layer, unit, score_a, score_b FROM compare_scores('planted', 'planted~untrained')"
                       ).fetchall()
    assert {(layer, unit): (a, b) for layer, unit, a, b in rows} == \
        {k: (v["planted"], v["planted~untrained"]) for k, v in want.items()}


def store_for_the_cli(path, fill) -> str:
    """A store at ``path`` filled by ``fill(con)`` and closed, for the DuckDB CLI (skips the test
    when the CLI is not installed)."""
    if not DUCKDB_CLI.exists():
        pytest.skip("duckdb-cli is not installed")
    con = dbd.connect(str(path), progress=False)
    try:
        fill(con)
    finally:
        dbd.close(con)
    return str(path)


def test_compare_scores_record_sets_in_the_duckdb_cli(tmp_path):
    db = store_for_the_cli(tmp_path / "c.duckdb", _fill_record_sets)
    out = subprocess.run([str(DUCKDB_CLI), "-readonly", "-csv", "-noheader", db, "-c",
                          "SELECT unit, score_a, score_b FROM compare_scores('a', 'b') ORDER BY unit"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = [tuple(float(x) for x in line.split(",")) for line in out.stdout.split()]
    assert got == [(u, pytest.approx(a), pytest.approx(b)) for u, (a, b) in sorted(COMPARE_WANT.items())]


# -- sampling macros: counts beyond BIGINT, seeds, fractions of an unknown dataset -----------

@pytest.fixture
def labelled(planted):
    dbd.annotate(planted, ["digit"], "snippets")
    dbd.extract(planted, "planted", ["planted"], "snippets")     # stores the symbols
    return planted


SAMPLING_ERRORS = [
    ("SELECT * FROM stratified_records('snippets', 'chars-test', 'digit', 1e19)",
     "stratified_records: n_per_class must be a non-negative integer or NULL, got 1e+19 (larger than "
     "9223372036854775807"),
    ("SELECT * FROM stratified_records('snippets', 'chars-test', 'digit', 9.3e18)",
     "stratified_records: n_per_class must be a non-negative integer or NULL, got 9.3e+18"),
    ("SELECT * FROM sample_records('snippets', 1e19)",
     "sample_records: n must be a non-negative integer or NULL, got 1e+19 (larger than 9223372036854775807"),
    ("SELECT * FROM sample_records('snippets', 10000000000000000000)",
     "sample_records: n must be a non-negative integer or NULL, got 10000000000000000000"),
    ("SELECT * FROM sample_records('snippets', 3, seed := 1.5)",
     "sample_records: seed must be a non-negative integer or NULL, got 1.5"),
    ("SELECT * FROM sample_records('snippets', 3, seed := -1)",
     "sample_records: seed must be a non-negative integer or NULL, got -1"),
    ("SELECT * FROM seeded_order('snippets', seed := 2.5)",
     "seeded_order: seed must be a non-negative integer or NULL, got 2.5"),
    ("SELECT * FROM seeded_order('nope', seed := -2)", "seeded_order: seed must be a non-negative integer"),
    ("SELECT * FROM sample_fraction('snippets', 0.5, seed := -3)",
     "sample_fraction: seed must be a non-negative integer or NULL, got -3"),
    ("SELECT * FROM train_test_split('snippets', 0.5, seed := 0.5)",
     "train_test_split: seed must be a non-negative integer or NULL, got 0.5"),
    ("SELECT * FROM stratified_records('snippets', 'chars-test', 'digit', 2, seed := -1)",
     "stratified_records: seed must be a non-negative integer or NULL, got -1"),
    # the range checks do not depend on the data: an unknown dataset gives the error too
    ("SELECT * FROM sample_fraction('nope', 3)", "sample_fraction: fraction must be between 0 and 1, got 3"),
    ("SELECT * FROM train_test_split('nope', 3)", "train_test_split: test_fraction must be between 0 and 1, got 3"),
    ("SELECT * FROM sample_fraction('nope', 0.5, seed := 1.5)", "sample_fraction: seed must be a non-negative"),
]


@pytest.mark.parametrize("sql,message", SAMPLING_ERRORS)
def test_sampling_macros_name_a_bad_argument(labelled, sql, message):
    assert message in sql_error(labelled, sql)


def test_sampling_macros_keep_good_arguments(labelled):
    """Whole-number seeds and counts of any type still give the rows they gave; the largest
    BIGINT count is every record; a good seed of a registered empty dataset gives no rows."""
    q = labelled.sql
    every = sorted(q("SELECT record_id FROM records WHERE dataset = 'snippets'").fetchall())
    assert sorted(q("SELECT * FROM sample_records('snippets', 9223372036854775807)").fetchall()) == every
    two = [r for (r,) in q("SELECT * FROM sample_records('snippets', 3, seed := 2)").fetchall()]
    assert two == [r for r, _ in q("SELECT * FROM seeded_order('snippets', seed := 2) WHERE rank <= 3").fetchall()]
    for n, seed in [("3.0", "2.0"), ("'3'", "'2'"), ("3", "CAST(2 AS HUGEINT)")]:
        assert [r for (r,) in q(f"SELECT * FROM sample_records('snippets', {n}, seed := {seed})").fetchall()] == two
    big = q("SELECT * FROM stratified_records('snippets', 'chars-test', 'digit', 9223372036854775807)").fetchall()
    assert sorted(r for r, _ in big) == sorted(r for r, _ in q(
        "SELECT * FROM stratified_records('snippets', 'chars-test', 'digit', 1000)").fetchall())
    assert len({c for _, c in big}) == 2
    # an unknown dataset is an error naming ds (it gave no rows); a registered empty one gives none
    labelled.execute("INSERT INTO datasets (name) VALUES ('empty')")
    for macro in ["sample_fraction('{}', 0.5)", "train_test_split('{}', 0.5)", "seeded_order('{}', seed := 3)"]:
        assert "ds 'nope' is not a dataset of this store" in sql_error(labelled, "SELECT * FROM " + macro.format("nope"))
        assert q("SELECT * FROM " + macro.format("empty")).fetchall() == []
    # a seed column in a LATERAL join is checked per row too
    assert q("SELECT count(*) FROM range(3) AS s(seed), "
             "LATERAL (SELECT * FROM sample_records('snippets', 2, seed := s.seed))").fetchall() == [(6,)]
    assert "sample_fraction: seed must be a non-negative integer or NULL, got -1" in sql_error(
        labelled, "SELECT count(*) FROM (VALUES (1), (-1)) AS s(seed), "
                  "LATERAL (SELECT * FROM sample_fraction('snippets', 0.5, seed := s.seed))")


def test_sampling_errors_in_the_duckdb_cli(tmp_path):
    db = store_for_the_cli(tmp_path / "s.duckdb", lambda con: dbd.add_dataset(con, "snippets", TEXTS))
    for sql, message in [SAMPLING_ERRORS[2], SAMPLING_ERRORS[4], SAMPLING_ERRORS[-3]]:
        out = subprocess.run([str(DUCKDB_CLI), "-readonly", db, "-c", sql], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode != 0 and message in out.stderr + out.stdout


# -- dbd.cursor: the SQL surface and the Python API in another thread ------------------------

def test_cursor_has_the_sql_surface_and_the_python_api_in_a_thread(planted):
    results, errors = {}, []

    def work():
        cur = dbd.cursor(planted)
        try:
            results["sql"] = cur.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets')"
                                     ).fetchall()
            results["python"] = dbd.inspect(cur, "planted", ["mix"], ["digit"], "snippets").num_rows
            results["hyps"] = cur.sql("SELECT count(*) > 0 FROM available_hypotheses()").fetchall()
        except Exception as exc:                      # pragma: no cover - the failure is reported below
            errors.append(exc)
        finally:
            dbd.close(cur)                            # the cursor only

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    assert results == {"sql": [(5,)], "python": 4, "hyps": [(True,)]}
    assert planted.sql("SELECT count(*) FROM queries").fetchall() == [(2,)]   # the connection stays open
    # a plain cursor has the pure-SQL macros but not the Python surface; the Python API names dbd.cursor
    plain = planted.cursor()
    assert plain.sql("SELECT count(*) FROM top_units(1)").fetchall()[0][0] > 0
    with pytest.raises(DeepBaseError, match=re.escape("dbd.cursor(con)")):
        dbd.inspect(plain, "planted", ["mix"], ["digit"], "snippets")
    # a cursor of a dbd cursor has them too
    inner = dbd.cursor(dbd.cursor(planted))
    assert inner.sql("SELECT count(*) FROM available_hypotheses()").fetchall()[0][0] > 0


def test_close_of_the_connection_closes_its_dbd_cursors(tmp_path):
    db = str(tmp_path / "c.duckdb")
    con = dbd.connect(db, progress=False)
    cur = dbd.cursor(con)
    dbd.close(con)
    with pytest.raises(duckdb.Error):
        cur.sql("SELECT 1").fetchall()
    dbd.close(dbd.connect(db, progress=False))        # the store can be opened again


# -- command line --------------------------------------------------------------------------

def _cli(capsys, *argv):
    from deepbase_duck.cli import main
    capsys.readouterr()
    rc = main(["--quiet", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "nope"], "--checkpoint: unknown char-LSTM checkpoint 'nope'; valid names: step0, early, mid, final"),
    (["--chars", "0"], "--chars must be an integer >= 1"),
    (["--top", "0"], "--top must be an integer >= 1"),
])
def test_cli_demo_bad_input_is_one_line_exit_2_and_no_store(tmp_path, capsys, argv, message):
    store = tmp_path / "d1" / "demo.duckdb"
    rc, _, err = _cli(capsys, "demo", "--store", str(store), *argv)
    assert rc == 2 and message in err and err.strip().count("\n") == 0
    assert not store.exists() and not Path(f"{store}.acts").exists() and not Path(f"{store}.wal").exists()


@pytest.fixture
def cli_store(tmp_path, capsys):
    """A store made through the command line: models 'lstm,v2', 'p1' and 'p2' (the planted model,
    loader ray_models:planted) and the dataset 'snippets'."""
    db = str(tmp_path / "s.duckdb")
    texts = tmp_path / "t.txt"
    texts.write_text("".join(t.replace("\n", " ") + "\n" for t in TEXTS))
    for name in ["lstm,v2", "p1", "p2"]:
        assert _cli(capsys, "register-model", db, name, "ray_models:planted")[0] == 0
    assert _cli(capsys, "add-dataset", db, "snippets", str(texts))[0] == 0
    return db


def _last_models(db):
    con = dbd.connect(db, progress=False)
    try:
        return json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
                          )["models"]
    finally:
        dbd.close(con)


def test_cli_inspect_takes_a_model_named_with_a_comma(cli_store, capsys):
    args = ["snippets", "--layers", "planted", "--hypotheses", "digit", "--device", "cpu"]
    rc, out, err = _cli(capsys, "inspect", cli_store, "lstm,v2", *args)
    assert rc == 0, err
    assert _last_models(cli_store) == ["lstm,v2"] and "digit" in out
    # a name that is not registered lists checkpoints
    rc, out, err = _cli(capsys, "inspect", cli_store, "p1, p2", *args)
    assert rc == 0, err
    assert _last_models(cli_store) == ["p1", "p2"]


def test_cli_inspect_refuses_top_0_and_negative(cli_store, capsys):
    for top in ["0", "-1"]:
        rc, out, err = _cli(capsys, "inspect", cli_store, "p1", "snippets", "--layers", "planted",
                            "--hypotheses", "digit", "--top", top)
        assert rc == 2 and f"--top must be an integer >= 1 (the units shown per hypothesis), got {top}" in err
        assert out == "" and err.strip().count("\n") == 0


def test_cli_shell_refuses_a_missing_store_unless_create(tmp_path, capsys):
    typo = tmp_path / "typo.duckdb"
    rc, out, err = _cli(capsys, "shell", str(typo), "-c", "SELECT 1")
    assert rc == 2 and f"no store at {str(typo)!r}" in err and "--create" in err
    assert not typo.exists() and not Path(f"{typo}.acts").exists()
    rc, out, err = _cli(capsys, "shell", "--create", str(typo), "-c", "SELECT count(*) AS n FROM models;")
    assert rc == 0 and typo.is_file(), err
    rc, out, err = _cli(capsys, "shell", str(typo), "-c", "SELECT 41 + 1 AS answer;")
    assert rc == 0 and "42" in out
    rc, out, err = _cli(capsys, "shell", "-c", "SELECT 7 AS seven;")      # no path: in memory
    assert rc == 0 and "7" in out
