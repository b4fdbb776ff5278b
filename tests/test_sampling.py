"""The sampling macros of sql/20_sampling.sql: seeded record samples, fractions, train/test
splits, class-balanced (stratified) record sets and seeded scan orders.

One store file is built once for the module; every query of QUERIES runs through the
connection deepbase_duck.connect() returned, then, after it is closed, in the real DuckDB 1.5
CLI (pip package duckdb-cli), which must return exactly the same rows (the macros are pure SQL
stored in the file, and their hash-based keys agree between the two DuckDB versions).
"""
from __future__ import annotations

import csv
import io
import math
import random
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import deepbase_duck as dbd
from deepbase_duck.engine.extract import ensure_symbols
from deepbase_duck.hypotheses.core import Hypothesis, register

from conftest import planted_adapter

N = 400                      # records of dataset 'd'
TOK = "chars-test"           # planted_adapter()'s tokenisation: one symbol per character
BRACKETS = {"(": 0, ")": 0, "[": 1, "]": 1, "{": 2, "}": 2}   # category codes of smp_bracket
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "theta", "kappa", "lambda", "mu"]


def smp_digit(text):
    return [c.isdigit() for c in text]


def smp_bracket(text):
    return [(i, i + 1, ("round", "square", "curly")[BRACKETS[c]])
            for i, c in enumerate(text) if c in BRACKETS]


def smp_length(text):
    return [(0, len(text), float(len(text)))]


def make_texts() -> list[str]:
    """Records with planted class frequencies: digits in 100 of 400 records; round brackets in
    every even record (200), square in records i % 5 == 1 (80), curly in i % 29 == 0 (14)."""
    rng = random.Random(0)
    out = []
    for i in range(N):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        if i % 4 == 3:
            parts.insert(rng.randint(0, len(parts)), str(rng.randint(0, 999)))
        if i % 2 == 0:
            parts.append("(" + rng.choice(WORDS) + ")")
        if i % 5 == 1:
            parts.insert(0, "[x]")
        if i % 29 == 0:
            parts.append("{}")
        out.append(" ".join(parts) + "\n")
    return out


TEXTS = make_texts()

# Every query compared between Python and the CLI, by name; each has a total row order.
QUERIES = {
    "sample_37_s0": "SELECT * FROM sample_records('d', 37)",
    "sample_37_s0_again": "SELECT * FROM sample_records('d', 37, seed := 0)",
    "sample_37_s1": "SELECT * FROM sample_records('d', 37, seed := 1)",
    "sample_all": "SELECT * FROM sample_records('d', 10000, seed := 5)",
    "sample_e": "SELECT * FROM sample_records('e', 3)",
    "frac_0.3_s0": "SELECT * FROM sample_fraction('d', 0.3)",
    "frac_0.3_s0_again": "SELECT * FROM sample_fraction('d', 0.3, seed := 0)",
    "frac_0.3_s1": "SELECT * FROM sample_fraction('d', 0.3, seed := 1)",
    "split_s0": "SELECT * FROM train_test_split('d')",
    "split_s0_again": "SELECT * FROM train_test_split('d', test_fraction := 0.2, seed := 0)",
    "split_s1": "SELECT * FROM train_test_split('d', seed := 1)",
    "split_0.5_s0": "SELECT * FROM train_test_split('d', test_fraction := 0.5)",
    "order_s0": "SELECT * FROM seeded_order('d')",
    "order_s0_again": "SELECT * FROM seeded_order('d', seed := 0)",
    "order_s1": "SELECT * FROM seeded_order('d', seed := 1)",
    "order_s2": "SELECT * FROM seeded_order('d', seed := 2)",
    "order_s5": "SELECT * FROM seeded_order('d', seed := 5)",
    "strat_digit_60_s0": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', 60)",
    "strat_digit_60_s0_again": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', 60, seed := 0)",
    "strat_digit_60_s1": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', 60, seed := 1)",
    "strat_digit_150_s0": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', 150)",
    "strat_bracket_25_s0": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_bracket', 25)",
    "strat_bracket_25_s0_again": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_bracket', 25, seed := 0)",
    "strat_bracket_25_s2": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_bracket', 25, seed := 2)",
    "strat_unlabeled_e": f"SELECT * FROM stratified_records('e', '{TOK}', 'smp_digit', 5)",
    "keys_order_s7": "SELECT record_id, sample_key('d', record_id, 7) FROM records "
                     "WHERE dataset = 'd' ORDER BY record_id",
    "keys_split_s7": "SELECT record_id, sample_key('d', record_id, 7, 'split') FROM records "
                     "WHERE dataset = 'd' ORDER BY record_id",
}
FRACTIONS = [0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
for _f in FRACTIONS:
    QUERIES[f"frac_{_f}_s3"] = f"SELECT * FROM sample_fraction('d', {_f}, seed := 3)"
# seed := NULL is the default seed 0 in every macro: each pair (name, name with _snull) must agree
NULL_SEED = {
    "sample_37_s0": "SELECT * FROM sample_records('d', 37, seed := NULL)",
    "frac_0.3_s0": "SELECT * FROM sample_fraction('d', 0.3, seed := NULL)",
    "frac_1.0_s0": "SELECT * FROM sample_fraction('d', 1.0, seed := NULL)",
    "split_0.5_s0": "SELECT * FROM train_test_split('d', test_fraction := 0.5, seed := NULL)",
    "order_s0": "SELECT * FROM seeded_order('d', seed := NULL)",
    "strat_digit_60_s0": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', 60, seed := NULL)",
    "strat_bracket_25_s0": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_bracket', 25, seed := NULL)",
    "keys_order_s0": "SELECT record_id, sample_key('d', record_id, NULL) FROM records "
                     "WHERE dataset = 'd' ORDER BY record_id",
    "keys_split_s0": "SELECT record_id, sample_key('d', record_id, NULL, 'split') FROM records "
                     "WHERE dataset = 'd' ORDER BY record_id",
}
QUERIES.update({
    "frac_1.0_s0": "SELECT * FROM sample_fraction('d', 1.0)",
    "keys_order_s0": "SELECT record_id, sample_key('d', record_id) FROM records WHERE dataset = 'd' ORDER BY record_id",
    "keys_split_s0": "SELECT record_id, sample_key('d', record_id, 0, 'split') FROM records "
                     "WHERE dataset = 'd' ORDER BY record_id",
    **{f"{name}_snull": sql for name, sql in NULL_SEED.items()},
    # counts: n NULL is every record, an integral DOUBLE is accepted, 0 gives none
    "sample_null_n_s2": "SELECT * FROM sample_records('d', NULL, seed := 2)",
    "sample_3.0_s2": "SELECT * FROM sample_records('d', 3.0, seed := 2)",
    "sample_0_s2": "SELECT * FROM sample_records('d', 0, seed := 2)",
    # n_per_class NULL: the rarest class's count (digits: 100; brackets: curly, 14)
    "strat_digit_null_s1": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', NULL, seed := 1)",
    "strat_digit_100_s1": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', 100, seed := 1)",
    "strat_bracket_null_s0": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_bracket', NULL)",
    "strat_bracket_14_s0": f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_bracket', 14)",
    "strat_unlabeled_null_e": f"SELECT * FROM stratified_records('e', '{TOK}', 'smp_digit', NULL)",
})
# bad counts: (query, the error's text), in Python and in the CLI alike
BAD_COUNTS = [
    ("SELECT * FROM sample_records('d', 2.7)", "sample_records: n must be a non-negative integer or NULL, got 2.7"),
    ("SELECT * FROM sample_records('d', -1)", "sample_records: n must be a non-negative integer or NULL, got -1"),
    ("SELECT * FROM sample_records('d', -1, seed := 4)", "sample_records: n must be a non-negative integer"),
    ("SELECT * FROM sample_records('nope', 0.5)", "sample_records: n must be a non-negative integer"),
    (f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_digit', 2.5)",
     "stratified_records: n_per_class must be a non-negative integer or NULL, got 2.5"),
    (f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_bracket', -1, seed := 3)",
     "stratified_records: n_per_class must be a non-negative integer or NULL, got -1"),
    # a boolean seed, which Python's inspect refuses, was taken as 1
    ("SELECT * FROM sample_records('d', 2, seed := true)",
     "sample_records: seed must be a non-negative integer or NULL, got true"),
    # the check does not depend on the data: no labelled record in 'e', still an error
    (f"SELECT * FROM stratified_records('e', '{TOK}', 'smp_digit', -2)",
     "stratified_records: n_per_class must be a non-negative integer"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(store path, {query name: rows from deepbase_duck's connection}); the connection is
    closed before the tests run, so the CLI can open the file."""
    path = str(tmp_path_factory.mktemp("sampling") / "s.duckdb")
    con = dbd.connect(path, progress=False)
    try:
        dbd.add_dataset(con, "d", TEXTS)
        dbd.add_dataset(con, "e", ["x = 1\n", "(y)\n", "z 22\n", "w\n"])
        register(Hypothesis("smp_digit", smp_digit, "binary"))
        register(Hypothesis("smp_bracket", smp_bracket, "categorical",
                            categories=("round", "square", "curly")))
        register(Hypothesis("smp_length", smp_length, "continuous"))
        dbd.annotate(con, ["smp_digit", "smp_bracket", "smp_length"], "d")   # not 'e'
        adapter = planted_adapter()
        dbd.register_model(con, "planted", adapter)
        session = dbd.session_of(con)
        for ds in ("d", "e"):
            ensure_symbols(session, adapter, ds, session.record_ids(ds))
        assert adapter.tokenization == TOK
        results = {name: con.sql(sql).fetchall() for name, sql in QUERIES.items()}
    finally:
        dbd.close(con)
    return path, results


@pytest.fixture(scope="module")
def ro(built):
    """A plain read-only DuckDB connection to the built store (the macros live in the file)."""
    con = duckdb.connect(built[0], read_only=True)
    yield con
    con.close()


@pytest.fixture(scope="module")
def ids(ro):
    return [r for (r,) in ro.sql("SELECT record_id FROM records WHERE dataset = 'd' "
                                 "ORDER BY record_id").fetchall()]


def col(rows, i=0):
    return [r[i] for r in rows]


def within_binomial(k, n, p, z=4.5):
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# -- determinism --------------------------------------------------------------------------

@pytest.mark.parametrize("stem", ["sample_37", "frac_0.3", "split", "order"])
def test_same_seed_same_rows_other_seed_other_rows(built, stem):
    res = built[1]
    assert res[f"{stem}_s0"] == res[f"{stem}_s0_again"]
    assert res[f"{stem}_s0"] != res[f"{stem}_s1"]


def test_stratified_is_deterministic_per_seed(built):
    res = built[1]
    for stem, other in [("strat_digit_60", "s1"), ("strat_bracket_25", "s2")]:
        assert res[f"{stem}_s0"] == res[f"{stem}_s0_again"]
        assert set(res[f"{stem}_s0"]) != set(res[f"{stem}_{other}"])


# -- sample_records, seeded_order ---------------------------------------------------------

def test_sample_records_exact_n_distinct_and_prefix_of_order(built, ro, ids):
    res = built[1]
    for name in ("sample_37_s0", "sample_37_s1"):
        got = col(res[name])
        assert len(got) == 37 and len(set(got)) == 37 and set(got) <= set(ids)
    assert sorted(col(res["sample_all"])) == ids          # n above the dataset size: all
    assert col(res["sample_all"]) == col(res["order_s5"])  # in the seeded order
    assert col(res["sample_37_s0"]) == col(res["order_s0"])[:37]
    assert len(set(col(res["sample_37_s0"])) & set(col(res["sample_37_s1"]))) < 37
    assert len(col(res["sample_e"])) == 3 and not set(col(res["sample_e"])) - set(
        r for (r,) in ro.sql("SELECT record_id FROM records WHERE dataset = 'e'").fetchall())


def test_seeded_order_is_a_permutation(built, ids):
    for name in ("order_s0", "order_s1", "order_s2", "order_s5"):
        rows = built[1][name]
        assert sorted(col(rows)) == ids
        assert col(rows, 1) == list(range(1, len(ids) + 1))


def test_sample_is_roughly_uniform(ro, ids):
    """Over 40 seeds, each record lands in a 50-record sample ~ 40 * 50/400 = 5 times."""
    hits = dict(ro.sql("SELECT record_id, count(*) FROM range(40) AS s(seed), "
                       "LATERAL (SELECT * FROM sample_records('d', 50, seed := s.seed)) "
                       "GROUP BY record_id").fetchall())
    assert sum(hits.values()) == 40 * 50
    low_half = sum(v for r, v in hits.items() if r < N // 2)
    assert within_binomial(low_half, 2000, 0.5)


# -- sample_fraction ----------------------------------------------------------------------

def test_fraction_size_within_binomial_tolerance(built):
    for name in ("frac_0.3_s0", "frac_0.3_s1"):
        assert within_binomial(len(built[1][name]), N, 0.3)
    for f in FRACTIONS:
        k = len(built[1][f"frac_{f}_s3"])
        assert within_binomial(k, N, f), (f, k)


def test_fractions_are_nested(built, ids):
    sets = [set(col(built[1][f"frac_{f}_s3"])) for f in FRACTIONS]
    assert sets[0] == set() and sorted(sets[-1]) == ids
    for small, big in zip(sets, sets[1:]):
        assert small <= big
    order = col(built[1]["order_s0"])
    frac = col(built[1]["frac_0.3_s0"])
    assert frac == order[:len(frac)]                     # a prefix of the seeded order


def test_seeds_give_independent_samples(ro):
    """Half samples of two seeds share ~1/4 of the records (not all or none: the key mixes the
    seed into every bit, unlike hash(ds, record_id, seed), which XORs the seed's hash in)."""
    rows = ro.sql("SELECT a.seed, b.seed, count(*) FROM range(6) AS a(seed), range(6) AS b(seed), "
                  "LATERAL (SELECT record_id FROM sample_fraction('d', 0.5, seed := a.seed) "
                  "         INTERSECT SELECT record_id FROM sample_fraction('d', 0.5, seed := b.seed)) "
                  "WHERE a.seed < b.seed GROUP BY ALL").fetchall()
    assert len(rows) == 15
    for sa, sb, k in rows:
        assert within_binomial(k, N, 0.25), (sa, sb, k)


@pytest.mark.parametrize("name", list(NULL_SEED))
def test_null_seed_is_seed_zero(built, name):
    """seed := NULL gives exactly the rows of seed 0 (md5 of a NULL seed was NULL: no rows, or
    record_id order)."""
    res = built[1]
    assert res[f"{name}_snull"] == res[name]
    assert len(res[name]) > 0 and all(v is not None for row in res[name] for v in row)


def test_null_seed_fraction_one_keeps_every_record_and_split_has_test_rows(built, ids):
    assert sorted(col(built[1]["frac_1.0_s0_snull"])) == ids
    assert 0 < col(built[1]["split_0.5_s0_snull"], 1).count("test") < N
    # a seeded order, not the record_id order
    assert col(built[1]["sample_37_s0_snull"]) != sorted(col(built[1]["sample_37_s0_snull"]))


def test_sample_records_counts(built, ids):
    res = built[1]
    assert col(res["sample_null_n_s2"]) == col(res["order_s2"]) and sorted(col(res["order_s2"])) == ids
    assert col(res["sample_3.0_s2"]) == col(res["order_s2"])[:3]
    assert res["sample_0_s2"] == []


@pytest.mark.parametrize("sql,message", BAD_COUNTS)
def test_bad_counts_are_errors_naming_the_macro_and_argument(ro, sql, message):
    with pytest.raises(duckdb.Error, match=message.replace(".", r"\.")):
        ro.sql(sql).fetchall()


def test_stratified_null_n_per_class_is_the_rarest_class_count(built):
    res = built[1]
    digits = col(res["strat_digit_null_s1"], 1)
    assert [digits.count(c) for c in (0, 1)] == [100, 100]       # 100 records hold a digit
    assert res["strat_digit_null_s1"] == res["strat_digit_100_s1"]
    brackets = col(res["strat_bracket_null_s0"], 1)
    assert [brackets.count(c) for c in (0, 1, 2)] == [14, 14, 14]   # curly: 14 records
    assert res["strat_bracket_null_s0"] == res["strat_bracket_14_s0"]
    assert res["strat_unlabeled_null_e"] == []


def test_fraction_out_of_range_is_an_error(ro):
    for bad in ("1.5", "-0.1", "NULL"):
        with pytest.raises(duckdb.Error, match="fraction must be between 0 and 1"):
            ro.sql(f"SELECT * FROM sample_fraction('d', {bad})").fetchall()


# -- train_test_split ---------------------------------------------------------------------

def test_split_partitions_records_with_the_test_share(built, ids):
    for name, p in [("split_s0", 0.2), ("split_s1", 0.2), ("split_0.5_s0", 0.5)]:
        rows = built[1][name]
        assert col(rows) == ids                          # every record exactly once
        assert set(col(rows, 1)) == {"train", "test"}
        assert within_binomial(col(rows, 1).count("test"), N, p)
    small = {r for r, s in built[1]["split_s0"] if s == "test"}
    big = {r for r, s in built[1]["split_0.5_s0"] if s == "test"}
    assert small <= big                                  # test sets nested in the fraction


def test_split_is_independent_of_samples_with_the_same_seed(ro):
    """The split uses its own key stream: half the records sampled with seed 0 are not all test."""
    k, n = ro.sql("SELECT count(*) FILTER (split = 'test'), count(*) FROM train_test_split('d', 0.5) "
                  "SEMI JOIN sample_fraction('d', 0.5) USING (record_id)").fetchall()[0]
    assert 0 < k < n and within_binomial(k, n, 0.5)


# -- stratified_records -------------------------------------------------------------------

def held_classes(hyp: str) -> dict[int, set[int]]:
    """Independently of SQL: the classes held by the symbols of each record (one symbol per
    character here, so a symbol's label is its character's label)."""
    out = {}
    for rid, text in enumerate(TEXTS):
        if hyp == "smp_digit":
            out[rid] = {int(c.isdigit()) for c in text}
        else:
            cls = {BRACKETS[c] for c in text if c in BRACKETS}
            if cls:
                out[rid] = cls
    return out


def expected_assignment(hyp: str) -> dict[int, int]:
    """The documented rule: a record's class is its class of lowest record support (tie: lower code)."""
    held = held_classes(hyp)
    support = {}
    for cls in held.values():
        for c in cls:
            support[c] = support.get(c, 0) + 1
    return {rid: min(cls, key=lambda c: (support[c], c)) for rid, cls in held.items()}


@pytest.mark.parametrize("name,hyp,n_per_class", [
    ("strat_digit_60_s0", "smp_digit", 60), ("strat_digit_60_s1", "smp_digit", 60),
    ("strat_digit_150_s0", "smp_digit", 150),
    ("strat_bracket_25_s0", "smp_bracket", 25), ("strat_bracket_25_s2", "smp_bracket", 25),
])
def test_stratified_records_are_balanced(built, name, hyp, n_per_class):
    rows = built[1][name]
    assigned = expected_assignment(hyp)
    available = {}
    for c in assigned.values():
        available[c] = available.get(c, 0) + 1
    counts = {}
    for rid, c in rows:
        counts[c] = counts.get(c, 0) + 1
    assert counts == {c: min(n_per_class, a) for c, a in available.items()}
    got = col(rows)
    assert len(got) == len(set(got))                     # never a record twice
    for rid, c in rows:
        assert assigned[rid] == c and c in held_classes(hyp)[rid]
    # within a class: the first records of that class in the seeded order
    order = col(built[1]["order_s" + name.rsplit("_s", 1)[1]])
    for c in available:
        of_c = [r for r in order if assigned.get(r) == c]
        assert [r for r, k in rows if k == c] == of_c[:n_per_class]


def test_stratified_data_has_full_and_short_classes(built):
    """The planted data exercises both cases: a full class and a class with too few records."""
    digits = [col(built[1]["strat_digit_150_s0"], 1).count(c) for c in (0, 1)]
    assert digits == [150, 100]                          # 300 digit-free, 100 with digits
    brackets = [col(built[1]["strat_bracket_25_s0"], 1).count(c) for c in (0, 1, 2)]
    assert brackets == [25, 25, 14]                      # curly: only 14 records hold it


def test_stratified_skips_unannotated_records_and_rejects_bad_hypotheses(built, ro):
    assert built[1]["strat_unlabeled_e"] == []           # 'e' has symbols but no labels
    with pytest.raises(duckdb.Error, match="only binary and categorical"):
        ro.sql(f"SELECT * FROM stratified_records('d', '{TOK}', 'smp_length', 5)").fetchall()
    with pytest.raises(duckdb.Error, match="unknown hypothesis nope"):
        ro.sql(f"SELECT * FROM stratified_records('d', '{TOK}', 'nope', 5)").fetchall()


# -- the same rows in the DuckDB 1.5 CLI --------------------------------------------------

def cli_path() -> Path:
    return Path(sys.executable).parent / "duckdb"


@pytest.mark.parametrize("name", list(QUERIES))
def test_cli_returns_the_same_rows(built, name):
    exe = cli_path()
    if not exe.exists():
        pytest.skip(f"the DuckDB CLI is not installed at {exe} (pip install duckdb-cli==1.5.6)")
    path, results = built
    proc = subprocess.run([str(exe), "-readonly", "-csv", path, "-c", QUERIES[name]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Error" not in proc.stderr + proc.stdout, proc.stderr + proc.stdout
    lines = list(csv.reader(io.StringIO(proc.stdout)))
    header, body = (lines[0], lines[1:]) if lines else ([], [])
    expected = [[str(v) for v in row] for row in results[name]]
    assert body == expected
    assert header or not expected


@pytest.mark.parametrize("sql,message", BAD_COUNTS)
def test_cli_rejects_bad_counts_the_same_way(built, sql, message):
    exe = cli_path()
    if not exe.exists():
        pytest.skip(f"the DuckDB CLI is not installed at {exe} (pip install duckdb-cli==1.5.6)")
    proc = subprocess.run([str(exe), "-readonly", "-csv", built[0], "-c", sql],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr + proc.stdout
