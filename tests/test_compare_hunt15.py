"""Session 15 hunt over compare_layers (linear CKA, table `similarities`) and the result macros
of sql/30_results.sql (top_units, compare_scores):

- top_units and compare_scores given an argument of the wrong type (qid := 'x', qid := true,
  k := true, by_layer := NULL or 1, measure_name := 5, model_a := 1, ds := 5) raised a DuckDB
  conversion error about a column ("Could not convert string 'corr' to INT32") or silently read
  query 1 / by_layer false / k 1: each is now an error naming the macro and the argument, the
  same in Python's DuckDB and in the duckdb CLI;
- a NaN score sorted above every number, so top_units ranked it first;
- compare_layers(None, ...) (SQL NULL groups) crashed with "'NoneType' object is not iterable".

Plus a check of compare_layers on the bundled char-LSTM checkpoints against numpy's linear CKA.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

pytestmark = pytest.mark.usefixtures("one_thread")


# query 1: model a on d (ties, a negative score, a NULL and a NaN score, a whole-group row);
# query 2: model b on d (the same record set); query 3: model a on e
SCORES = [
    (1, "a", "l0", 0, "h", "corr", 0.5, 0.4, 0.6),
    (1, "a", "l0", 1, "h", "corr", -0.5, -0.6, -0.4),
    (1, "a", "l0", 2, "h", "corr", 0.5, 0.4, 0.6),
    (1, "a", "l0", 3, "h", "corr", None, None, None),
    (1, "a", "l0", 4, "h", "corr", -0.9, -1.0, -0.8),
    (1, "a", "l0", 5, "h", "corr", float("nan"), None, None),
    (1, "a", "l1", 0, "h", "corr", 0.1, 0.0, 0.2),
    (1, "a", "l0", None, "h", "corr", 0.99, None, None),
    (2, "b", "l0", 0, "h", "corr", 0.2, 0.1, 0.3),
    (2, "b", "l0", 1, "h", "corr", -0.7, -0.8, -0.6),
    (2, "b", "l0", 2, "h", "corr", 0.5, 0.4, 0.6),
    (2, "b", "l0", 3, "h", "corr", 0.3, 0.2, 0.4),
    (3, "a", "l0", 0, "h", "corr", 0.8, 0.7, 0.9),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("hunt15") / "m.duckdb")
    con = dbd.connect(path, progress=False)
    try:
        con.execute("INSERT INTO datasets (name) VALUES ('d'), ('e')")
        for q, m, d in [(1, "a", "d"), (2, "b", "d"), (3, "a", "e")]:
            con.execute("INSERT INTO queries (query_id, model, dataset, n_records, n_symbols, params) "
                        "VALUES (?, ?, ?, 10, 100, '{\"record_count\": 10}')", [q, m, d])
        con.executemany("INSERT INTO scores (query_id, model, layer, unit, hypothesis, measure, score, n, ci_low, "
                        "ci_high) VALUES (?, ?, ?, ?, ?, ?, ?, 100, ?, ?)", SCORES)
    finally:
        dbd.close(con)
    return path


@pytest.fixture(scope="module")
def ro(store):
    con = duckdb.connect(store, read_only=True)
    yield con
    con.close()


from test_sql_edge_cases import cli  # noqa: E402  (the duckdb CLI over a store, read-only)


WRONG_TYPES = [
    ("SELECT count(*) FROM top_units(2, qid := 'x')",
     "top_units: qid must be a query id (a whole number) or NULL (the latest query with scores), got x"),
    ("SELECT * FROM top_units(2, qid := true)", "top_units: qid must be a query id"),
    ("SELECT count(unit) FROM top_units(2, qid := [1])", "top_units: qid must be a query id"),
    ("SELECT * FROM top_units(true, qid := 1)", "top_units: k must be a whole number >= 1"),
    ("SELECT * FROM top_units(2, qid := 1, by_layer := NULL)", "top_units: by_layer must be true or false, got NULL"),
    ("SELECT count(*) FROM top_units(2, qid := 1, by_layer := 1)", "top_units: by_layer must be true or false, got 1"),
    ("SELECT * FROM top_units(2, qid := 1, by_layer := 'maybe')", "top_units: by_layer must be true or false"),
    ("SELECT * FROM top_units(2, qid := 1, measure_name := 5)",
     "top_units: measure_name '5' has no unit scores in query 1; its measures with unit scores: 'corr'"),
    ("SELECT count(*) FROM compare_scores(1, 'b')",
     "compare_scores: model_a '1' has no unit scores; models with unit scores: 'a', 'b'"),
    ("SELECT * FROM compare_scores('a', 'b', measure_name := 5)",
     "compare_scores: measure_name '5' has no unit scores of model_a 'a'"),
    ("SELECT * FROM compare_scores('a', 'b', ds := 5)",
     "compare_scores: ds '5' is not a dataset of this store; ds must be NULL (every dataset) or one of: 'd', 'e'"),
]


@pytest.mark.parametrize("sql,fragment", WRONG_TYPES, ids=[str(i) for i in range(len(WRONG_TYPES))])
def test_wrong_type_arguments_name_the_macro_and_argument(ro, store, sql, fragment):
    with pytest.raises(duckdb.Error) as info:
        ro.sql(sql).fetchall()
    assert fragment in str(info.value)
    out = cli(store, sql)
    assert out.returncode != 0 and fragment in out.stderr + out.stdout


def test_good_arguments_of_other_spellings_still_rank(ro, store):
    """qid '1' or 1.0, k '2', by_layer 'true' keep working (and the same in the CLI)."""
    want = ro.sql("SELECT layer, unit FROM top_units(2, qid := 1)").fetchall()
    assert ro.sql("SELECT layer, unit FROM top_units('2', qid := '1')").fetchall() == want
    assert ro.sql("SELECT layer, unit FROM top_units(2.0, qid := 1.0)").fetchall() == want
    assert (ro.sql("SELECT layer, unit FROM top_units(2, qid := 1, by_layer := 'true')").fetchall()
            == ro.sql("SELECT layer, unit FROM top_units(2, qid := 1, by_layer := true)").fetchall())
    out = cli(store, "SELECT layer, unit FROM top_units('2', qid := '1')")
    assert out.returncode == 0, out.stderr
    assert [tuple(l.split(",")) for l in out.stdout.split()] == [(l, str(u)) for l, u in want]


def test_top_units_ranks_by_abs_score_with_ties_and_never_ranks_nan(ro, store):
    """By |score| (negatives by their size), ties by layer then unit; NULL and NaN scores and the
    whole-group row are never ranked (NaN sorted above every number: it came first)."""
    rows = [r for r in SCORES if r[0] == 1 and r[3] is not None and r[6] is not None and not np.isnan(r[6])]
    ref = sorted(rows, key=lambda r: (-abs(r[6]), r[2], r[3]))
    got = ro.sql("SELECT rank, layer, unit, score FROM top_units(10, qid := 1)").fetchall()
    assert got == [(i + 1, r[2], r[3], r[6]) for i, r in enumerate(ref)]
    assert got[0][2] == 4 and got[0][3] == -0.9
    out = cli(store, "SELECT rank, unit FROM top_units(10, qid := 1)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{i + 1},{r[3]}" for i, r in enumerate(ref)]
    # the k-th place tied with the first outsider: not separated
    sep = ro.sql("SELECT unit, separated FROM top_units(2, qid := 1)").fetchall()
    assert sep == [(4, True), (0, False)]


def test_compare_scores_pairs_like_a_reference(ro, store):
    got = ro.sql("SELECT layer, unit, score_a, score_b, delta, dataset FROM compare_scores('a', 'b')").fetchall()
    a = {(r[2], r[3]): r[6] for r in SCORES if r[0] == 1 and r[3] is not None}
    b = {(r[2], r[3]): r[6] for r in SCORES if r[0] == 2 and r[3] is not None}
    ref = [(k[0], k[1], a[k], b[k], None if a[k] is None or b[k] is None else b[k] - a[k], "d")
           for k in sorted(set(a) & set(b))]
    ref.sort(key=lambda r: (r[4] is None, -abs(r[4]) if r[4] is not None else 0, r[0], r[1]))
    assert got == ref
    out = cli(store, "SELECT count(*) FROM compare_scores(model_a := 'a', model_b := 'b', ds := 'd')")
    assert out.returncode == 0 and out.stdout.split() == [str(len(ref))]


# -- compare_layers ------------------------------------------------------------------------------

def test_compare_layers_null_groups_is_a_clear_error():
    con = dbd.connect(None, progress=False)
    try:
        for groups in (None, 5):
            with pytest.raises(DeepBaseError, match=r"groups must be a list of unit groups \('model:layer'\), got"):
                dbd.compare_layers(con, groups, "d")
        with pytest.raises(duckdb.Error, match="groups must be a list of unit groups"):
            con.sql("SELECT * FROM compare_layers(NULL, 'd')").fetchall()
    finally:
        dbd.close(con)


def _numpy_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_compare_layers_on_two_charlstm_checkpoints_matches_numpy():
    """Layers of two checkpoints and a layer with itself over ~1,500 characters of the stdlib
    corpus, against numpy's linear CKA on activations taken with forward hooks; the stored
    rows, one per pair, and reading them back after extract give the same numbers."""
    from deepbase_duck.corpora.stdlib import stdlib_records
    from deepbase_duck.models.zoo import charlstm
    texts = [r["text"] for r in stdlib_records(max_chars=300, limit_chars=1500)]
    con = dbd.connect(None, progress=False)
    try:
        adapters = {"final": charlstm("final"), "mid": charlstm("mid")}
        for name, ad in adapters.items():
            dbd.register_model(con, name, ad)
        dbd.add_dataset(con, "code", texts)

        def acts(model, layer):
            ad = adapters[model]
            mod = dict(ad.module.named_modules())[layer]
            out = []
            for t in texts:
                got = {}
                h = mod.register_forward_hook(lambda m, i, o: got.update(o=o[0] if isinstance(o, tuple) else o))
                try:
                    with torch.no_grad():
                        ad.module(ad.encode([t]).inputs.to(next(ad.module.parameters()).device))
                finally:
                    h.remove()
                out.append(got["o"].reshape(-1, got["o"].shape[-1])[:len(t)].double().cpu().numpy())
            return np.concatenate(out)

        groups = ["final:lstm0", "final:lstm1", "mid:lstm1", "final:lstm0"]
        A = {g: acts(*g.split(":")) for g in set(groups)}
        n = sum(len(t) for t in texts)
        t = dbd.compare_layers(con, groups, "code", batch_size=3).to_pylist()
        assert len(t) == 6 and all(r["n"] == n for r in t)
        for r in t:
            ref = _numpy_cka(A[f"{r['model_a']}:{r['layer_a']}"], A[f"{r['model_b']}:{r['layer_b']}"])
            assert r["score"] == pytest.approx(ref, abs=1e-6)
        assert t[2]["score"] == pytest.approx(1.0, abs=1e-12)
        assert con.sql("SELECT count(*) FROM similarities").fetchall() == [(6,)]
        dbd.extract(con, "final", ["lstm0", "lstm1"], "code")
        dbd.extract(con, "mid", ["lstm1"], "code")
        again = dbd.compare_layers(con, groups, "code").to_pylist()
        assert con.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("stored",)]
        np.testing.assert_allclose([r["score"] for r in again], [r["score"] for r in t], rtol=0, atol=1e-9)
    finally:
        dbd.close(con)
