"""Arguments of the wrong type to the SQL macros: symbol_labels' recs (sql/10_alignment.sql) and
the Python surface's list, number, flag and name arguments (sql/90_surface.sql).

A recs that is not a list of record ids gave DuckDB's own error naming no argument ('x': "can't
be cast to the destination type INTEGER[]"; ['1'] or [[1]]: "Cannot deduce template type 'T'"),
or a silently other result: [1.5] matched nothing, [true] read record 1, '[1, 2]' was parsed.
Each is now an error naming recs, in Python's DuckDB and in the DuckDB 1.5 CLI alike, while a
list of record ids of any integer type (or of whole numbers of another type) keeps its rows,
checked against the labels computed here from the texts. The surface macros handed their
arguments to the UDFs as they were: max_error := 'x' was "Could not convert string 'x' to
DOUBLE", layers := 'lstm1' "No function matches ... dbd_inspect(...)", baseline := 2 was true
and define_hypothesis(['h'], ...) defined a hypothesis named '[h]'.
"""
from __future__ import annotations

import csv
import io
import re

import duckdb
import pytest

import deepbase_duck as dbd
from deepbase_duck.engine.extract import ensure_symbols
from deepbase_duck.hypotheses.core import Hypothesis, register

from conftest import TEXTS as SNIPPETS, planted_adapter
from test_sql_edge_cases import cli

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = "chars-test"
# 30 records; record i holds the digits of i (and a 7 in every fifth one)
TEXTS = [f"row {i}: ab{'7' if i % 5 == 0 else 'c'}\n" for i in range(30)]


def a17_digit(text):
    return [c.isdigit() for c in text]


def digits(record_ids) -> list[tuple[int, int]]:
    """The reference: (record_id, number of digit characters), computed from the texts."""
    return sorted((r, sum(c.isdigit() for c in TEXTS[r])) for r in set(record_ids))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A closed store file: dataset 'd' with the labels of a17_digit and the symbols of TOK."""
    path = str(tmp_path_factory.mktemp("args17") / "s.duckdb")
    con = dbd.connect(path, progress=False)
    try:
        dbd.add_dataset(con, "d", TEXTS)
        register(Hypothesis("a17_digit", a17_digit, "binary"))
        dbd.annotate(con, ["a17_digit"], "d")
        adapter = planted_adapter()
        dbd.register_model(con, "planted", adapter)
        session = dbd.session_of(con)
        ensure_symbols(session, adapter, "d", session.record_ids("d"))
    finally:
        dbd.close(con)
    return path


@pytest.fixture(scope="module")
def ro(db):
    con = duckdb.connect(db, read_only=True)
    yield con
    con.close()


def labels_sql(recs: str) -> str:
    return (f"SELECT record_id, sum(value)::INTEGER FROM symbol_labels('d', '{TOK}', ['a17_digit'], recs := {recs}) "
            "GROUP BY ALL ORDER BY ALL")


def cli_rows(db: str, sql: str) -> list[tuple]:
    out = cli(db, sql)
    assert out.returncode == 0, out.stderr
    return [tuple(int(v) for v in r) for r in csv.reader(io.StringIO(out.stdout))]


# -- symbol_labels: recs ---------------------------------------------------------------

NOT_IDS = r"symbol_labels: recs must be a list of record ids \(whole numbers: \[0, 1, \.\.\.\]\) or NULL \(every record\), got "
BAD_RECS = [
    ("'x'", NOT_IDS + "x of type VARCHAR"),                             # was: can't be cast to INTEGER[]
    ("'[1, 2]'", NOT_IDS + r"\[1, 2\] of type VARCHAR"),                # was: parsed as [1, 2]
    ("3", NOT_IDS + "3 of type INTEGER"),                               # was: no list_contains(INTEGER_LITERAL, ...)
    ("['1']", NOT_IDS + r"\[1\] of type VARCHAR\[\]"),                  # was: Cannot deduce template type 'T'
    ("['x', 'y']", NOT_IDS + r"\[x, y\] of type VARCHAR\[\]"),
    ("[[1], [2]]", NOT_IDS + r"\[\[1\], \[2\]\] of type INTEGER\[\]\[\]"),
    ("[true]", NOT_IDS + r"\[true\] of type BOOLEAN\[\]"),              # was: record 1
    ("{'a': 1}", NOT_IDS + r"\{'a': 1\} of type STRUCT\(a INTEGER\)"),
    ("[1.5]", NOT_IDS + r"\[1\.5\] of type DECIMAL\(2,1\)\[\]"),        # was: no rows
    ("[1, 2.5::DOUBLE]", NOT_IDS + r"\[1\.0, 2\.5\] of type DOUBLE\[\]"),
    ("[1, 'nan'::DOUBLE]", NOT_IDS + r"\[1\.0, nan\] of type DOUBLE\[\]"),
    ("[1e20]", NOT_IDS + r"\[1e\+20\] of type DOUBLE\[\]"),
    ("[1, NULL]", r"symbol_labels: recs holds NULL at position 2, which is no record id \(recs must be a list of "
                  r"record ids, or NULL itself for every record\)"),                    # was: record 1 only
    ("[NULL]", "symbol_labels: recs holds NULL at position 1, which is no record id"),
]


@pytest.mark.parametrize("recs,message", BAD_RECS)
def test_recs_that_are_no_record_ids_are_named(db, ro, recs, message):
    """The error names recs, its value and its type, and says what recs takes, in Python and in
    the CLI, also when the query reads no column of the guard (count(*)) or stops at its first row."""
    for sql in (labels_sql(recs),
                f"SELECT count(*) FROM symbol_labels('d', '{TOK}', ['a17_digit'], recs := {recs})",
                f"SELECT * FROM symbol_labels('d', '{TOK}', ['a17_digit'], recs := {recs}) LIMIT 1"):
        with pytest.raises(duckdb.Error, match=message):
            ro.sql(sql).fetchall()
    out = cli(db, labels_sql(recs))
    assert out.returncode != 0 and re.search(message, out.stderr), out.stderr


def test_a_long_recs_is_cut_in_the_error(ro):
    """An engine's block holds thousands of ids: the error shows the first 100 characters."""
    ids = ", ".join(str(i) for i in range(1000))
    with pytest.raises(duckdb.Error) as info:
        ro.sql(labels_sql(f"[{ids}, 0.5]")).fetchall()
    msg = str(info.value)
    assert "recs must be a list of record ids" in msg and re.search(r"\.\.\. of type DECIMAL\(\d+,1\)\[\]$", msg)
    assert len(msg) < 400


GOOD_RECS = [
    ("[3, 0, 14]::TINYINT[]", [3, 0, 14]), ("[3, 0, 14]::SMALLINT[]", [3, 0, 14]), ("[3, 0, 14]", [3, 0, 14]),
    ("[3, 0, 14]::BIGINT[]", [3, 0, 14]), ("[3, 0, 14]::HUGEINT[]", [3, 0, 14]),
    ("[3, 0, 14]::UTINYINT[]", [3, 0, 14]), ("[3, 0, 14]::UBIGINT[]", [3, 0, 14]),
    ("[3, 0, 14]::UHUGEINT[]", [3, 0, 14]), ("[3, 0, 14]::INTEGER[3]", [3, 0, 14]),
    ("[3.0, 0.0, 14.0]", [3, 0, 14]), ("[3, 0, 14]::DOUBLE[]", [3, 0, 14]), ("[3, 0, 14]::FLOAT[]", [3, 0, 14]),
    ("[3, 3, 14]", [3, 14]),                                              # a repeated id: its rows once
    ("range(5, 9)", [5, 6, 7, 8]),                                        # BIGINT[]
    ("[7, -1, 3000000000, 1180591620717411303424::HUGEINT, 18446744073709551615::UBIGINT]", [7]),  # ids no record has
    ("(SELECT list(record_id) FROM records WHERE dataset = 'd' AND record_id % 10 = 2)", [2, 12, 22]),
    ("NULL", list(range(30))),
]


@pytest.mark.parametrize("recs,ids", GOOD_RECS)
def test_lists_of_record_ids_keep_their_rows(db, ro, recs, ids):
    """Each record's digit count, as computed from its text, in Python and in the CLI."""
    want = digits(ids)
    assert ro.sql(labels_sql(recs)).fetchall() == want == cli_rows(db, labels_sql(recs))


def test_empty_recs_and_the_engines_parameters(ro):
    """[] keeps its meaning (no rows); the engine's form passes a Python list as a parameter."""
    assert ro.sql(f"SELECT count(*) FROM symbol_labels('d', '{TOK}', ['a17_digit'], recs := [])").fetchall() == [(0,)]
    sql = ("SELECT record_id, sum(value)::INTEGER FROM symbol_labels(?, ?, [?], recs := ?) "
           "GROUP BY ALL ORDER BY ALL")
    for recs, ids in [([4, 9, 25], [4, 9, 25]), ([4.0, 9.0], [4, 9]), ([], []), (None, range(30))]:
        assert ro.execute(sql, ["d", TOK, "a17_digit", recs]).fetchall() == digits(ids)
    for recs, message in [([1.5], NOT_IDS + r"\[1\.5\] of type DOUBLE\[\]"), (["1"], NOT_IDS + r"\[1\] of type"),
                          ([1, None], "recs holds NULL at position 2"), ("3", NOT_IDS + "3 of type VARCHAR")]:
        with pytest.raises(duckdb.Error, match=message):
            ro.execute(sql, ["d", TOK, "a17_digit", recs]).fetchall()


def test_other_arguments_are_checked_before_recs(ro):
    """One error at a time: a bad hyps or tok is named first, as before recs was checked."""
    with pytest.raises(duckdb.Error, match="symbol_labels: tok 'nope' has no symbols stored"):
        ro.sql("SELECT * FROM symbol_labels('d', 'nope', ['a17_digit'], recs := 'x')").fetchall()
    with pytest.raises(duckdb.Error, match="symbol_labels: hyps must be a list of hypothesis names"):
        ro.sql(f"SELECT * FROM symbol_labels('d', '{TOK}', 'a17_digit', recs := 'x')").fetchall()


# -- the Python surface (sql/90_surface.sql) ---------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A connection with the surface's TEMP macros: model 'planted', dataset 'snippets'."""
    con = dbd.connect(str(tmp_path_factory.mktemp("surface17") / "s.duckdb"), progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", SNIPPETS)
    yield con
    dbd.close(con)


INSPECT = "SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets'{})"
BAD_SURFACE = [
    # a number that is not one: "Could not convert string 'x' to DOUBLE", "Unimplemented type for cast"
    (INSPECT.format(", max_error := 'x'"), "inspect: max_error must be a number or NULL, got x of type VARCHAR"),
    (INSPECT.format(", max_error := [0.1]"), r"inspect: max_error must be a number or NULL, got \[0\.1\]"),
    (INSPECT.format(", max_error := true"), "inspect: max_error must be a number or NULL, got true of type BOOLEAN"),
    (INSPECT.format(", plateau_tol := 'x'"), "inspect: plateau_tol must be a number or NULL, got x"),
    # a flag that is not one: "Could not convert string 'x' to BOOL", or 2 silently true
    (INSPECT.format(", keep_activations := 'x'"), "inspect: keep_activations must be true or false, got x of type VARCHAR"),
    (INSPECT.format(", baseline := 2"), "inspect: baseline must be true or false, got 2 of type INTEGER"),
    (INSPECT.format(", control := [true]"), r"inspect: control must be true or false, got \[true\]"),
    (INSPECT.format(", reuse := 0"), "inspect: reuse must be true or false, got 0 of type INTEGER"),
    # a list given as one name, a name given as a number: "No function matches ... dbd_inspect(...)"
    ("SELECT * FROM inspect('planted', 'planted', ['digit'], 'snippets')",
     r"inspect: layers must be a list of names \(\['planted'\] for one\), got planted of type VARCHAR"),
    ("SELECT * FROM inspect('planted', ['planted'], 'digit', 'snippets')",
     r"inspect: hypotheses must be a list of names \(\['digit'\] for one\)"),
    (INSPECT.format(", measures := 'corr'"), r"inspect: measures must be a list of names \(\['corr'\] for one\)"),
    ("SELECT * FROM inspect('planted', ['planted'], ['digit'], 3)", "inspect: dataset must be text, got 3 of type INTEGER"),
    ("SELECT * FROM compare_layers('planted:planted', 'snippets')",
     r"compare_layers: groups must be a list of names \(\['planted:planted'\] for one\)"),
    ("SELECT * FROM compare_layers(['planted:planted', 'planted:mix'], 3)", "compare_layers: dataset must be text"),
    ("SELECT * FROM extract_activations('planted', 'planted', 'snippets')",
     r"extract_activations: layers must be a list of names \(\['planted'\] for one\)"),
    ("SELECT * FROM extract_activations(3, ['planted'], 'snippets')", "extract_activations: model must be text, got 3"),
    ("SELECT * FROM extract_activations('planted', ['planted'], 7)", "extract_activations: dataset must be text, got 7"),
    ("SELECT * FROM annotate('digit', 'snippets')", r"annotate: hypotheses must be a list of names \(\['digit'\] for one\)"),
    ("SELECT * FROM annotate(['digit'], 3)", "annotate: dataset must be text, got 3 of type INTEGER"),
    ("SELECT register_model(3, 'deepbase_duck.models.zoo:charlstm')", "register_model: name must be text, got 3"),
    ("SELECT register_model('m', 'deepbase_duck.models.zoo:charlstm', params := 3)",
     "register_model: params must be text, got 3"),
    ("SELECT add_stdlib_dataset(3, limit_chars := 100)", "add_stdlib_dataset: name must be text, got 3"),
    ("SELECT add_stdlib_dataset('s', split := 1, limit_chars := 100)", "add_stdlib_dataset: split must be text, got 1"),
    ("SELECT add_ptb_dataset(3, n := 3)", "add_ptb_dataset: name must be text, got 3"),
    # define_hypothesis(['h'], ...) defined '[h]'; replace := 3 was true, 'x' a conversion error
    ("SELECT define_hypothesis(['a17_rx'], '[0-9]')",
     r"define_hypothesis: name must be text, got \[a17_rx\] of type VARCHAR\[\]"),
    ("SELECT define_hypothesis('a17_rx', 5)", "define_hypothesis: pattern must be text, got 5 of type INTEGER"),
    ("SELECT define_hypothesis('a17_rx', '[0-9]', replace := 3)", "define_hypothesis: replace must be true or false, got 3"),
    ("SELECT define_hypothesis('a17_rx', '[0-9]', replace := 'x')", "define_hypothesis: replace must be true or false, got x"),
]


@pytest.mark.parametrize("sql,message", BAD_SURFACE)
def test_surface_arguments_of_another_type_are_named(live, sql, message):
    """Refused before the UDF runs: nothing is defined, stored or scored."""
    before = live.sql("SELECT (SELECT count(*) FROM hypothesis_definitions), (SELECT count(*) FROM queries), "
                      "(SELECT count(*) FROM datasets), (SELECT count(*) FROM models)").fetchall()
    with pytest.raises(duckdb.Error, match=message):
        live.sql(sql).fetchall()
    assert live.sql("SELECT (SELECT count(*) FROM hypothesis_definitions), (SELECT count(*) FROM queries), "
                    "(SELECT count(*) FROM datasets), (SELECT count(*) FROM models)").fetchall() == before


def test_surface_arguments_of_the_right_type_still_work(live):
    """Flags as text ('false'), numbers as text ('0.5'), NULL flags (the defaults) and a JSON
    params: the rows of the same query from Python."""
    got = live.sql("SELECT layer, unit, hypothesis, score FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                   "keep_activations := 'false', baseline := NULL, reuse := 'true', plateau_tol := NULL, "
                   "max_error := NULL) ORDER BY unit").fetchall()
    want = dbd.inspect(live, "planted", ["planted"], ["digit"], "snippets").to_pylist()
    assert [(r["layer"], r["unit"], r["hypothesis"]) for r in want] == [g[:3] for g in got]
    assert [g[3] for g in got] == pytest.approx([r["score"] for r in want], nan_ok=True)
    assert got[0][3] == pytest.approx(1.0)               # unit 0 copies the digit hypothesis
    row = live.sql("SELECT define_hypothesis('a17_rx', '[0-9]+', replace := 'true')").fetchall()[0][0]
    assert row["name"] == "a17_rx" and row["kind"] == "binary"
    assert live.sql("SELECT register_model('planted2', 'conftest:planted_adapter', params := '{}'::JSON)").fetchall()
