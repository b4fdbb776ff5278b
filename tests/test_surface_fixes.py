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

AWKWARD = ["ck(1)", "ck(2)", "a=b: c", " padded ", "it's, odd"]


def sql_error(con, query: str) -> str:
    with pytest.raises(duckdb.Error) as exc:
        con.sql(query).fetchall()
    return str(exc.value)


def test_sql_inspect_takes_a_list_of_models_with_any_names(con):
    """Names with ( ) : = ' , and outer spaces round-trip through the macro, as in Python."""
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
    assert "max_chars must be an integer >= 1, got 0" in err and err.strip().count("\n") == 0
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
