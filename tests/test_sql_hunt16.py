"""SQL surface hunt 16: the sampling macros of sql/20_sampling.sql in LATERAL joins in the DuckDB
1.5 CLI, their arguments of the wrong type, and their rows against an independent computation
(hashlib's md5, the documented key) in Python and in the CLI alike."""
from __future__ import annotations

import csv
import hashlib
import io

import duckdb
import pytest

import deepbase_duck as dbd
from deepbase_duck.engine.extract import ensure_symbols
from deepbase_duck.hypotheses.core import Hypothesis, register

from conftest import planted_adapter
from test_sql_edge_cases import cli

TOK = "chars-test"
# 40 records; a digit in every third one (14 records hold a digit, 26 do not)
TEXTS = [f"rec {i}\n" if i % 3 == 0 else f"rec {'abcdefghij'[i % 10]}\n" for i in range(40)]


def h16_digit(text):
    return [c.isdigit() for c in text]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A closed store file: dataset 'd' (labelled, with symbols) and 'e' (4 records)."""
    path = str(tmp_path_factory.mktemp("hunt16") / "s.duckdb")
    con = dbd.connect(path, progress=False)
    try:
        dbd.add_dataset(con, "d", TEXTS)
        dbd.add_dataset(con, "e", ["a\n", "b 1\n", "c\n", "d\n"])
        register(Hypothesis("h16_digit", h16_digit, "binary"))
        dbd.annotate(con, ["h16_digit"], "d")
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




def cli_rows(db: str, sql: str) -> list[tuple]:
    out = cli(db, sql)
    assert out.returncode == 0, out.stderr
    return [tuple(int(v) if v.lstrip("-").isdigit() else v for v in r) for r in csv.reader(io.StringIO(out.stdout))]


def key(ds: str, record_id: int, seed: int = 0, stream: str = "order") -> int:
    """The documented key, computed by hashlib: the first 13 hex digits of md5."""
    return int(hashlib.md5(f"{stream}:{seed}:{record_id}:{ds}".encode()).hexdigest()[:13], 16)


def order(ds: str, ids, seed: int) -> list[int]:
    return sorted(ids, key=lambda r: (key(ds, r, seed), r))


IDS = {"d": list(range(40)), "e": list(range(4))}


# -- LATERAL joins on a seed column: refused by the DuckDB 1.5 CLI ------------------------

LATERAL_ORDER = [
    "SELECT s.seed, o.record_id, o.rank FROM range(3) AS s(seed), "
    "LATERAL seeded_order('d', seed := s.seed) AS o ORDER BY ALL",
    "SELECT s.seed, o.record_id, o.rank FROM range(3) AS s(seed), "
    "LATERAL (SELECT * FROM seeded_order('d', seed := s.seed)) AS o ORDER BY ALL",
]


@pytest.mark.parametrize("sql", LATERAL_ORDER)
def test_lateral_seeded_order_on_a_seed_column_in_the_cli(db, ro, sql):
    """seeded_order ranked with row_number() OVER (ORDER BY key(seed)): DuckDB 1.5 refuses a window
    ordered by an outer column ("Binder Error: window expression is not supported here"), so the
    CLI failed where Python's DuckDB gave the rows. Both now give the hashlib reference's ranks."""
    want = sorted((s, r, i + 1) for s in range(3) for i, r in enumerate(order("d", IDS["d"], s)))
    assert ro.sql(sql).fetchall() == want
    assert cli_rows(db, sql) == want


def test_lateral_seeded_order_over_a_dataset_column_and_prefixes(db, ro):
    """ds from a column too; rank <= n is sample_records(ds, n, seed) for each row of the outer table."""
    sql = ("SELECT v.ds, v.seed, o.record_id, o.rank FROM (VALUES ('d', 4), ('e', 1), ('d', 7)) AS v(ds, seed), "
           "LATERAL seeded_order(v.ds, seed := v.seed) AS o WHERE o.rank <= 3 ORDER BY ALL")
    want = sorted((ds, s, r, i + 1) for ds, s in [("d", 4), ("e", 1), ("d", 7)]
                  for i, r in enumerate(order(ds, IDS[ds], s)[:3]))
    assert ro.sql(sql).fetchall() == want
    assert cli_rows(db, sql) == want
    for ds, s in [("d", 4), ("e", 1)]:
        assert [r for (r,) in ro.sql(f"SELECT * FROM sample_records('{ds}', 3, seed := {s})").fetchall()] == \
            order(ds, IDS[ds], s)[:3]


def stratified_reference(n_per_class, seed):
    """The documented rule, without SQL: a record holding a digit is of class 1 (the rarer class),
    the others of class 0; each class's first n records in the seeded order."""
    cls = {r: int(any(c.isdigit() for c in t)) for r, t in enumerate(TEXTS)}
    out = []
    for c in (0, 1):
        out += [(r, c) for r in order("d", [r for r in IDS["d"] if cls[r] == c], seed)[:n_per_class]]
    return out


def test_lateral_stratified_records_on_a_seed_column_in_the_cli(db, ro):
    """stratified_records took each class's first records with a window too: refused by the CLI in a
    LATERAL join on seed. Now the rows of the reference, per seed, in Python and in the CLI."""
    sql = ("SELECT s.seed, r.record_id, r.class FROM range(3) AS s(seed), "
           f"LATERAL stratified_records('d', '{TOK}', 'h16_digit', 5, seed := s.seed) AS r ORDER BY ALL")
    want = sorted((s, r, c) for s in range(3) for r, c in stratified_reference(5, s))
    assert ro.sql(sql).fetchall() == want
    assert cli_rows(db, sql) == want
    # a plain call keeps its order (class, then seeded order) and NULL n_per_class is the rarest count (14)
    for s in (0, 2):
        q = f"SELECT * FROM stratified_records('d', '{TOK}', 'h16_digit', NULL, seed := {s})"
        assert ro.sql(q).fetchall() == stratified_reference(14, s) == [tuple(r) for r in cli_rows(db, q)]


def test_lateral_bad_seed_is_still_the_named_error(db, ro):
    sql = "SELECT * FROM (VALUES (1), (-2)) AS s(seed), LATERAL seeded_order('d', seed := s.seed)"
    with pytest.raises(duckdb.Error, match="seeded_order: seed must be a non-negative integer or NULL, got -2"):
        ro.sql(sql).fetchall()
    out = cli(db, sql)
    assert out.returncode != 0 and "seeded_order: seed must be a non-negative integer or NULL, got -2" in out.stderr


# -- the other macros against hashlib, Python and CLI alike ----------------------------------

def test_sampling_rows_equal_the_hashlib_reference(db, ro):
    queries = {
        "SELECT * FROM sample_records('d', 9, seed := 3)": [(r,) for r in order("d", IDS["d"], 3)[:9]],
        "SELECT * FROM sample_fraction('d', 0.4, seed := 2)":
            [(r,) for r in order("d", IDS["d"], 2) if key("d", r, 2) < 0.4 * 2 ** 52],
        "SELECT * FROM train_test_split('d', 0.3, seed := 5)":
            [(r, "test" if key("d", r, 5, "split") < 0.3 * 2 ** 52 else "train") for r in IDS["d"]],
    }
    for sql, want in queries.items():
        assert ro.sql(sql).fetchall() == want, sql
        assert cli_rows(db, sql) == want, sql
    assert 0 < len(queries["SELECT * FROM sample_fraction('d', 0.4, seed := 2)"]) < 40


# -- arguments of another type: errors naming the argument -----------------------------------

BAD_TYPES = [
    # text that is no number: DuckDB's own "Could not convert string 'half' to INT32"
    ("SELECT * FROM sample_fraction('d', 'half')", "sample_fraction: fraction must be between 0 and 1, got half"),
    ("SELECT count(*) FROM train_test_split('d', 'half')",
     "train_test_split: test_fraction must be between 0 and 1, got half"),
    # a BOOLEAN fraction was taken as 1 (every record) or 0
    ("SELECT * FROM sample_fraction('d', true)", "sample_fraction: fraction must be between 0 and 1, got true"),
    ("SELECT * FROM train_test_split('d', false)",
     "train_test_split: test_fraction must be between 0 and 1, got false"),
    # a list: a binder error naming no argument
    ("SELECT * FROM sample_fraction('d', [0.5])", r"sample_fraction: fraction must be between 0 and 1, got \[0.5\]"),
    # a dataset given as a number: "Could not convert string 'd' to INT32" (a stored name)
    ("SELECT * FROM sample_fraction(3, 0.5)", "sample_fraction: ds must name a dataset \\(text\\), got 3"),
    ("SELECT * FROM sample_records(3, 2)", "sample_records: ds must name a dataset \\(text\\), got 3"),
    ("SELECT count(*) FROM seeded_order(3)", "seeded_order: ds must name a dataset \\(text\\), got 3"),
    ("SELECT * FROM train_test_split(3)", "train_test_split: ds must name a dataset \\(text\\), got 3"),
    (f"SELECT * FROM stratified_records(3, '{TOK}', 'h16_digit', 2)",
     "stratified_records: ds must name a dataset \\(text\\), got 3"),
    # hyp given as a list or a number: "Cannot concatenate types VARCHAR and VARCHAR[]", a conversion
    (f"SELECT * FROM stratified_records('d', '{TOK}', ['h16_digit'], 2)",
     r"stratified_records: hyp must name a hypothesis \(text\), got \[h16_digit\] of type VARCHAR\[\]"),
    (f"SELECT * FROM stratified_records('d', '{TOK}', 3, 2)",
     r"stratified_records: hyp must name a hypothesis \(text\), got 3 of type INTEGER"),
    ("SELECT * FROM stratified_records('d', 7, 'h16_digit', 2)",
     r"stratified_records: tok must name a tokenisation \(text\), got 7"),
    # symbol_labels: hyps as one name ("UNNEST() can only be applied to lists"), ds or tok a number
    (f"SELECT * FROM symbol_labels('d', '{TOK}', 'h16_digit')",
     r"symbol_labels: hyps must be a list of hypothesis names \(\['name', \.\.\.\]\), got h16_digit"),
    (f"SELECT * FROM symbol_labels('d', '{TOK}', [3])",
     "symbol_labels: hyps holds names that are not hypotheses of this store: '3'"),
    (f"SELECT count(*) FROM symbol_labels(3, '{TOK}', ['h16_digit'])",
     r"symbol_labels: ds must name a dataset \(text\), got 3 of type INTEGER"),
    ("SELECT * FROM symbol_labels('d', 3, ['h16_digit'])",
     r"symbol_labels: tok must name a tokenisation \(text\), got 3 of type INTEGER"),
]


@pytest.mark.parametrize("sql,message", BAD_TYPES)
def test_arguments_of_another_type_are_named(db, ro, sql, message):
    import re
    with pytest.raises(duckdb.Error, match=message):
        ro.sql(sql).fetchall()
    out = cli(db, sql)
    assert out.returncode != 0 and re.search(message, out.stderr), out.stderr


def test_numeric_text_fraction_is_that_number(db, ro):
    """Text holding a number is read as it ('0.5' is 0.5), as seeds and counts are ('3')."""
    for a, b in [("sample_fraction('d', '0.5', seed := 1)", "sample_fraction('d', 0.5, seed := 1)"),
                 ("train_test_split('d', '0.25')", "train_test_split('d', 0.25)")]:
        assert ro.sql(f"SELECT * FROM {a}").fetchall() == ro.sql(f"SELECT * FROM {b}").fetchall() \
            == [tuple(r) for r in cli_rows(db, f"SELECT * FROM {a}")]


def test_symbol_labels_good_arguments_keep_their_rows(db, ro):
    """Labels of the digit hypothesis per record, as a parameterised query (the engine's form) and
    in the CLI: one symbol per character, 1 on digits."""
    want = sorted((r, sum(c.isdigit() for c in t)) for r, t in enumerate(TEXTS) if r < 6)
    sql = (f"SELECT record_id, sum(value)::INTEGER FROM symbol_labels('d', '{TOK}', ['h16_digit'], "
           "recs := [0, 1, 2, 3, 4, 5]) GROUP BY ALL ORDER BY ALL")
    assert ro.sql(sql).fetchall() == want == cli_rows(db, sql)
    got = ro.execute("SELECT record_id, sum(value)::INTEGER FROM symbol_labels(?, ?, [?], recs := ?) "
                     "GROUP BY ALL ORDER BY ALL", ["d", TOK, "h16_digit", list(range(6))]).fetchall()
    assert got == want
    assert ro.sql(f"SELECT count(*) FROM symbol_labels('d', '{TOK}', [])").fetchall() == [(0,)]
