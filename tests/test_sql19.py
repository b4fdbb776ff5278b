"""The SQL surface, round 19: whole-number arguments read exactly (no float rounding beyond 2^52)
by the sampling macros of sql/20_sampling.sql and by the UDFs behind inspect (surface/udfs.py),
and empty-string arguments of the UDFs passed on to the library's checks, not read as defaults."""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.surface.udfs import _number

from conftest import TEXTS, planted_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

CLI = Path(sys.executable).parent / "duckdb"
TOK = "chars-test"
HALF = "4503599627370496.5"      # 2^52 + 0.5: its DOUBLE is 2^52, a whole number; CAST rounds it to 2^52 + 1
ODD = "9007199254740993"         # 2^53 + 1: no DOUBLE holds it (it reads as 2^53)

# (query with {v} for the argument, the argument as the error names it)
FRACTION_REFUSED = [
    ("SELECT * FROM sample_records('snippets', 3, seed := {v})", "sample_records: seed"),
    ("SELECT * FROM sample_records('snippets', {v})", "sample_records: n"),
    ("SELECT * FROM sample_fraction('snippets', 0.5, seed := {v})", "sample_fraction: seed"),
    ("SELECT * FROM train_test_split('snippets', 0.5, seed := {v})", "train_test_split: seed"),
    ("SELECT * FROM seeded_order('snippets', seed := {v})", "seeded_order: seed"),
    ("SELECT count(*) FROM seeded_order('snippets', seed := {v})", "seeded_order: seed"),
    (f"SELECT * FROM stratified_records('snippets', '{TOK}', 'digit', 2, seed := {{v}})", "stratified_records: seed"),
    (f"SELECT * FROM stratified_records('snippets', '{TOK}', 'digit', {{v}})", "stratified_records: n_per_class"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store file (written with storage_compatibility_version v1.5.0, as dbd.connect writes
    every file) with symbols and labels of 'digit', so that every sampling macro has rows."""
    db = str(tmp_path_factory.mktemp("sql19") / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    yield db, con
    dbd.close(con)


def cli(db: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "-readonly", "-csv", "-noheader", db, "-c", sql], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("literal", [HALF, f"'{HALF}'"], ids=["decimal", "text"])
@pytest.mark.parametrize("sql,what", FRACTION_REFUSED, ids=[f"{w}-{i}" for i, (_, w) in enumerate(FRACTION_REFUSED)])
def test_sampling_refuses_a_fraction_its_double_loses(store, sql, what, literal):
    """seed := 4503599627370496.5 passed the whole-number test (its DOUBLE is 2^52) and ran as
    seed 4503599627370497, where seed := 1.5 is refused ("nothing is rounded"); n and
    n_per_class alike. Now an error naming the argument and the value as given, and not saying it
    is larger than a BIGINT (it is not)."""
    _, con = store
    with pytest.raises(duckdb.Error) as exc:
        con.sql(sql.format(v=literal)).fetchall()
    msg = str(exc.value)
    assert f"{what} must be a non-negative integer or NULL, got {HALF}" in msg
    assert "larger than" not in msg


def test_sample_key_of_a_lost_fraction_is_null(store):
    """sample_key gives NULL for a seed that is not a whole number, never a rounded seed's key."""
    _, con = store
    got = con.sql(f"SELECT sample_key('snippets', 0, {HALF}), sample_key('snippets', 0, '{HALF}'), "
                  f"sample_key('snippets', 0, {ODD}.0) = sample_key('snippets', 0, {ODD})").fetchall()
    assert got == [(None, None, True)]


def test_sampling_whole_numbers_beyond_a_double_keep_their_value(store):
    """What the exact check must not refuse: a DECIMAL or text 2^53 + 1 (with '.0' too) is that
    seed, not 2^53 (the rows of the BIGINT seed), and a seed too large for a BIGINT still says so."""
    _, con = store
    want = con.sql(f"SELECT * FROM sample_records('snippets', 5, seed := {ODD})").fetchall()
    assert want != con.sql("SELECT * FROM sample_records('snippets', 5, seed := 9007199254740992)").fetchall()
    for v in (f"{ODD}.0", f"'{ODD}'", f"'{ODD}.0'", f"'{ODD}.000'"):
        assert con.sql(f"SELECT * FROM sample_records('snippets', 5, seed := {v})").fetchall() == want, v
    with pytest.raises(duckdb.Error, match=r"seed must be a non-negative integer or NULL, got 9223372036854775808.0 "
                                           r"\(larger than 9223372036854775807"):
        con.sql("SELECT * FROM sample_records('snippets', 5, seed := 9223372036854775808.0)").fetchall()


@pytest.fixture(scope="module")
def closed_store(tmp_path_factory):
    """A store file as `store` builds it, closed (the CLI cannot open a file Python holds), with
    the seeded order Python gives for seed 2^53 + 1."""
    if not CLI.exists():
        pytest.skip("duckdb-cli is not installed (pip install duckdb-cli==1.5.6, part of the test extra)")
    db = str(tmp_path_factory.mktemp("sql19cli") / "s.duckdb")
    con = dbd.connect(db, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    want = con.sql(f"SELECT * FROM seeded_order('snippets', seed := {ODD})").fetchall()
    dbd.close(con)
    return db, want


@pytest.mark.parametrize("sql,what", FRACTION_REFUSED, ids=[f"{w}-{i}" for i, (_, w) in enumerate(FRACTION_REFUSED)])
def test_cli_refuses_the_lost_fraction_too(closed_store, sql, what):
    """The macros are stored in the file: the DuckDB 1.5.6 CLI reads them over the v1.5.0 store
    and refuses the same argument, and takes 2^53 + 1 as that seed (the rows Python gives)."""
    db, want = closed_store
    out = cli(db, sql.format(v=HALF))
    assert out.returncode != 0
    assert f"{what} must be a non-negative integer or NULL, got {HALF}" in out.stderr
    assert "larger than" not in out.stderr
    out = cli(db, f"SELECT * FROM seeded_order('snippets', seed := {ODD}.0)")
    assert out.returncode == 0, out.stderr
    assert [tuple(map(int, r)) for r in csv.reader(io.StringIO(out.stdout))] == want


def test_number_reads_the_text_exactly():
    """surface/udfs.py _number, which reads inspect's whole-number arguments (passed as text):
    through a float, '9007199254740993.0' was 9007199254740992 and '4503599627370496.5' a whole
    4503599627370496 that inspect took as its seed."""
    assert _number("inspect: seed", f"{ODD}.0") == int(ODD)
    assert _number("inspect: seed", "1e+19") == 10**19
    assert _number("inspect: seed", "2.0") == 2 and _number("inspect: seed", "2.5") == 2.5
    with pytest.raises(DeepBaseError, match=rf"^inspect: seed must be a whole number, got {HALF}$"):
        _number("inspect: seed", HALF)
    with pytest.raises(DeepBaseError, match=r"^inspect: seed must be a number, got 'sNaN'$"):
        _number("inspect: seed", "sNaN")


def test_inspect_seed_beyond_a_double_is_the_seed_given(store):
    """A progressive inspect with seed := 2^53 + 1 (a DECIMAL) reads the records in the order of
    seeded_order(seed := 2^53 + 1), and records that seed; a lost fraction is refused by name."""
    _, con = store
    con.sql(f"SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets', max_error := 0.5, "
            f"seed := {ODD}.0, reuse := false)").fetchall()
    assert con.sql("SELECT params->>'seed' FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [(ODD,)]
    with pytest.raises(duckdb.Error, match=rf"inspect: seed must be a whole number, got {HALF}"):
        con.sql(f"SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets', max_error := 0.5, "
                f"seed := {HALF}, reuse := false)").fetchall()


@pytest.mark.parametrize("sql,error", [
    ("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', engine := '', reuse := false)",
     "unknown engine ''; engines: local, ray"),
    ("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', dtype := '', reuse := false)",
     "dtype must be one of float32, float16"),
    ("SELECT * FROM extract_activations('planted', ['planted'], 'snippets', dtype := '')",
     "float32"),
])
def test_empty_text_arguments_are_refused_as_in_python(store, sql, error):
    """engine := '' and dtype := '' ran as 'local' and 'float32' (the UDF read `v or default`),
    where Python's inspect and extract refuse them by name; NULL is still the default."""
    _, con = store
    with pytest.raises(duckdb.Error, match=error) as exc:
        con.sql(sql).fetchall()
    assert "''" in str(exc.value)
    assert con.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets', engine := NULL, "
                   "dtype := NULL)").fetchall()[0][0] > 0


@pytest.mark.parametrize("sql,want", [
    ("SELECT * FROM annotate(['digit', NULL], 'snippets')", r"annotate: hypotheses\[2\] is NULL"),
    ("SELECT * FROM inspect('planted', ['planted', NULL], ['digit'], 'snippets')", r"inspect: layers\[2\] is NULL"),
    ("SELECT * FROM inspect('planted', ['planted'], [NULL, 'digit'], 'snippets')",
     r"inspect: hypotheses\[1\] is NULL"),
    ("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', measures := ['corr', ''])",
     r"inspect: measures\[2\] is ''"),
    ("SELECT * FROM extract_activations('planted', ['planted', NULL], 'snippets')",
     r"extract_activations: layers\[2\] is NULL"),
])
def test_a_null_in_a_sql_list_is_named_with_its_place(planted, sql, want):
    """A NULL in a SQL list reached the engine as None and was answered "unknown hypothesis None",
    as if the store lacked a hypothesis of that name; it is now named with its place, counted from
    1 as SQL lists are, and nothing is stored."""
    con = planted
    before = con.sql("SELECT (SELECT count(*) FROM queries), (SELECT count(*) FROM labeled_records)").fetchall()
    with pytest.raises(duckdb.Error, match=want):
        con.sql(sql).fetchall()
    assert con.sql("SELECT (SELECT count(*) FROM queries), (SELECT count(*) FROM labeled_records)").fetchall() == before
