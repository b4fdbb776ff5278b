"""The result macros of sql/30_results.sql: top_units (its ranking and its `separated` flag,
against a plain-Python reference on scores with known intervals, and on a planted model whose
digit unit must come out first and separated) and compare_scores (pairs of scores of one dataset,
against a plain-Python reference over the scores and queries tables); and the SQL inspect macro's
pass-through of stable_windows, baseline_seed and dtype."""
from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest

import conftest
import deepbase_duck as dbd


def _abs_interval(lo, hi):
    """(lowest, highest) |score| a score's interval [lo, hi] allows; None without one."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return None
    low = lo if lo > 0 else (-hi if hi < 0 else 0.0)
    return low, max(abs(lo), abs(hi))


def reference_top_units(rows, k, measure, by_layer):
    """{(model, measure, hypothesis, layer or None, rank): (layer, unit, separated)} in plain Python."""
    sets = {}
    for r in rows:
        if r["unit"] is None or r["score"] is None or (measure is not None and r["measure"] != measure):
            continue
        key = (r["model"], r["measure"], r["hypothesis"], r["layer"] if by_layer else None)
        sets.setdefault(key, []).append(r)
    out = {}
    for key, members in sets.items():
        members.sort(key=lambda r: (-abs(r["score"]), r["layer"], r["unit"]))
        top, rest = members[:k], members[k:]
        rest_iv = [_abs_interval(r["ci_low"], r["ci_high"]) for r in rest]
        for rank, r in enumerate(top, 1):
            iv = _abs_interval(r["ci_low"], r["ci_high"])
            if iv is None or any(v is None for v in rest_iv):
                sep = None
            else:
                sep = all(iv[0] > v[1] for v in rest_iv)
            out[key + (rank,)] = (r["layer"], r["unit"], sep)
    return out


def _insert_scores(con, rows, query_id=1):
    con.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[query_id, r["model"], r["layer"], r["unit"], r["hypothesis"], r["measure"], r["score"], 100,
                      r["ci_low"], r["ci_high"], None, None, None] for r in rows])


def _random_rows(seed):
    rng = random.Random(seed)
    rows = []
    for model, layer, hyp, measure in itertools.product(["m1", "m2"], ["l0", "l1"], ["h1", "h2"], ["corr", "iou"]):
        for unit in range(12):
            score = rng.uniform(-1, 1) if measure == "corr" else rng.uniform(0, 1)
            half = rng.choice([0.002, 0.01, 0.05, 0.2])
            lo, hi = score - half, score + half
            if model == "m2" and rng.random() < 0.04:
                lo = hi = None                        # a score without an interval
            if rng.random() < 0.04:
                score = lo = hi = None                # a NULL score (a constant unit): never ranked
            rows.append(dict(model=model, layer=layer, hypothesis=hyp, measure=measure, unit=unit,
                             score=score, ci_low=lo, ci_high=hi))
        rows.append(dict(model=model, layer=layer, hypothesis=hyp, measure=measure, unit=None,
                         score=0.99, ci_low=0.98, ci_high=1.0))     # a score of the whole group: not ranked
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_units_ranks_and_separates_like_the_reference(con, seed):
    rows = _random_rows(seed)
    _insert_scores(con, rows)
    seen = set()
    for k, measure, by_layer in itertools.product([1, 3, 5, 30], ["corr", "iou", None], [False, True]):
        got = con.execute(
            f"SELECT model, measure, hypothesis, CASE WHEN {by_layer} THEN layer END, rank, layer, unit, separated "
            f"FROM top_units(k := {k}, measure_name := {'NULL' if measure is None else repr(measure)}, "
            f"by_layer := {by_layer})").fetchall()
        got = {tuple(r[:5]): tuple(r[5:]) for r in got}
        want = reference_top_units(rows, k, measure, by_layer)
        assert got == want, (k, measure, by_layer)
        seen |= {v[2] for v in want.values()}
    assert seen == {True, False, None}            # the random data holds every kind of answer


def test_top_units_separated_cases_by_hand(con):
    """Four units of one set: |score| intervals [0.85, 0.95], [0.55, 0.65], [0.5, 0.6], [0, 0.1]."""
    rows = [dict(model="m", layer="l", hypothesis="h", measure="corr", unit=u, score=s, ci_low=s - 0.05,
                 ci_high=s + 0.05) for u, s in enumerate([0.9, -0.6, 0.55, 0.05])]
    _insert_scores(con, rows)

    def flags(k):
        return con.execute(f"SELECT unit, separated FROM top_units(k := {k}) ORDER BY rank").fetchall()

    assert flags(1) == [(0, True)]                              # 0.85 > 0.65
    assert flags(2) == [(0, True), (1, False)]                  # unit 2 reaches 0.6 > 0.55
    assert flags(3) == [(0, True), (1, True), (2, True)]        # 0.55 and 0.5 > 0.1
    assert flags(4) == [(0, True), (1, True), (2, True), (3, True)]   # nobody outside
    con.execute("UPDATE scores SET ci_low = NULL, ci_high = NULL WHERE unit = 3")
    assert flags(3) == [(0, None), (1, None), (2, None)]        # an outsider without an interval
    assert flags(4)[3] == (3, None)


def test_planted_digit_unit_is_first_and_separated(planted):
    """The planted model's unit 0 is the digit detector: a top_k query puts it first for 'digit'
    with its place settled; the same flags come from the stored scores through the reference."""
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", max_error=0.5, top_k=2, seed=3,
                batch_size=2)
    rows = planted.execute("SELECT model, layer, hypothesis, measure, unit, score, ci_low, ci_high "
                           "FROM scores WHERE query_id = (SELECT max(query_id) FROM scores)").fetchall()
    keys = ("model", "layer", "hypothesis", "measure", "unit", "score", "ci_low", "ci_high")
    rows = [dict(zip(keys, r)) for r in rows]
    assert all(r["ci_low"] is not None for r in rows if r["score"] is not None)
    got = planted.execute("SELECT hypothesis, rank, layer, unit, separated FROM top_units(k := 2, by_layer := true)"
                          ).fetchall()
    want = reference_top_units(rows, 2, "corr", True)
    assert {(h, rank): (layer, unit, sep) for h, rank, layer, unit, sep in got} == \
        {(key[2], key[4]): v for key, v in want.items()}
    first = [r for r in got if r[1] == 1 and r[0] == "digit"]
    assert first == [("digit", 1, "planted", 0, True)]
    assert np.isfinite([r["score"] for r in rows if r["unit"] == 0 and r["hypothesis"] == "digit"]).all()


# -- compare_scores -----------------------------------------------------------------------

COMPARE_COLUMNS = ["layer", "unit", "hypothesis", "score_a", "score_b", "delta", "dataset", "measure"]


def reference_compare_scores(scores, queries, model_a, model_b, measure="corr", ds=None):
    """{(dataset, layer, unit, hypothesis): (score_a, score_b)} in plain Python from the rows of the
    scores table (query_id, model, layer, unit, hypothesis, measure, score) and of queries
    (query_id, dataset): each model's latest non-NULL score (highest query_id) per dataset, NULL
    when it has only NULL scores; pairs only within one dataset."""
    dataset_of = dict(queries)
    latest = {}
    for qid, model, layer, unit, hyp, m, score in scores:
        if m != measure or unit is None or model not in (model_a, model_b) or qid not in dataset_of:
            continue
        if ds is not None and dataset_of[qid] != ds:
            continue
        key = (model, dataset_of[qid], layer, unit, hyp)
        best = latest.get(key)
        if best is None:
            latest[key] = (qid, score) if score is not None else (None, None)
        elif score is not None and (best[0] is None or qid > best[0]):
            latest[key] = (qid, score)
    out = {}
    for (model, dataset, layer, unit, hyp), (_, score) in latest.items():
        if model == model_a and (model_b, dataset, layer, unit, hyp) in latest:
            out[(dataset, layer, unit, hyp)] = (score, latest[(model_b, dataset, layer, unit, hyp)][1])
    return out


def _compare(con, sql):
    cur = con.execute(sql)
    assert [d[0] for d in cur.description] == COMPARE_COLUMNS
    rows = cur.fetchall()
    got = {(r[6], r[0], r[1], r[2]): (r[3], r[4]) for r in rows}
    assert len(got) == len(rows)                          # one row per (dataset, layer, unit, hypothesis)
    for r in rows:
        assert r[5] == (None if r[3] is None or r[4] is None else pytest.approx(r[4] - r[3]))
    deltas = [abs(r[5]) for r in rows if r[5] is not None]
    assert deltas == sorted(deltas, reverse=True)         # largest change first, NULL deltas last
    assert all(r[5] is None for r in rows[len(deltas):])
    return got


def _tables(con):
    scores = con.execute("SELECT query_id, model, layer, unit, hypothesis, measure, score FROM scores").fetchall()
    queries = con.execute("SELECT query_id, dataset FROM queries").fetchall()
    return scores, queries


@pytest.mark.parametrize("seed", [0, 1])
def test_compare_scores_pairs_scores_of_one_dataset_like_the_reference(con, seed):
    """Queries on two datasets, three models, each (model, dataset) scored by several queries, some
    scores NULL: compare_scores pairs each model's latest score of a dataset with the other's of
    the same dataset only, as the plain-Python reference does."""
    rng = random.Random(seed)
    qid = 0
    for _ in range(8):
        qid += 1
        dataset = rng.choice(["d1", "d2"])
        models = rng.sample(["m1", "m2", "m3"], rng.randint(1, 3))
        con.execute("INSERT INTO queries (query_id, model, dataset) VALUES (?, ?, ?)", [qid, ", ".join(models), dataset])
        rows = []
        for model, layer, hyp, measure in itertools.product(models, ["l0", "l1"], ["h1", "h2"], ["corr", "iou"]):
            for unit in [*range(rng.randint(3, 6)), None]:
                score = None if rng.random() < 0.08 else rng.uniform(-1, 1)
                rows.append(dict(model=model, layer=layer, hypothesis=hyp, measure=measure, unit=unit,
                                 score=score, ci_low=None, ci_high=None))
        _insert_scores(con, rows, query_id=qid)
    scores, queries = _tables(con)
    # d3: a registered dataset no query scored (no rows); an unregistered name is an error
    con.execute("INSERT INTO datasets (name) VALUES ('d3')")
    seen_datasets = set()
    for a, b, measure, ds in itertools.product(["m1", "m2"], ["m2", "m3"], ["corr", "iou"], [None, "d1", "d2", "d3"]):
        ds_arg = "" if ds is None else f", ds := '{ds}'"
        got = _compare(con, f"SELECT * FROM compare_scores('{a}', '{b}', measure_name := '{measure}'{ds_arg})")
        want = reference_compare_scores(scores, queries, a, b, measure, ds)
        assert got.keys() == want.keys(), (a, b, measure, ds)
        for key, (sa, sb) in want.items():
            assert got[key] == (sa, sb), (a, b, measure, ds, key)
        assert ds is None or {k[0] for k in got} <= {ds}
        seen_datasets |= {k[0] for k in got}
    assert seen_datasets == {"d1", "d2"}


def test_compare_scores_ignores_a_later_query_on_another_dataset(planted):
    """The reported bug: both models scored on 'snippets', then the trained one alone on another
    dataset; the later scores must not be paired with the untrained copy's 'snippets' scores."""
    dbd.add_dataset(planted, "other", [t + "7 (x) 8\n" for t in conftest.TEXTS[:8]])
    dbd.inspect(planted, "planted", ["planted", "mix"], ["digit"], "snippets", baseline=True)
    first = dict(((layer, unit), score) for layer, unit, score in planted.execute(
        "SELECT layer, unit, score FROM scores WHERE model = 'planted' AND measure = 'corr'").fetchall())
    dbd.inspect(planted, "planted", ["planted", "mix"], ["digit"], "other")
    later = dict(((layer, unit), score) for layer, unit, score in planted.execute(
        "SELECT layer, unit, score FROM scores WHERE model = 'planted' AND query_id = (SELECT max(query_id) "
        "FROM queries)").fetchall())
    assert any(first[k] != later[k] for k in first)      # the two datasets give other scores
    got = _compare(planted, "SELECT * FROM compare_scores('planted', 'planted~untrained')")
    assert {k[0] for k in got} == {"snippets"}
    assert {(k[1], k[2]): v[0] for k, v in got.items()} == first
    assert got == reference_compare_scores(*_tables(planted), "planted", "planted~untrained")
    assert _compare(planted, "SELECT * FROM compare_scores('planted', 'planted~untrained', ds := 'other')") == {}
    # both models on 'other' too: a row per dataset; ds := picks one
    dbd.inspect(planted, "planted", ["planted", "mix"], ["digit"], "other", baseline=True, limit=6)
    scores, queries = _tables(planted)
    got = _compare(planted, "SELECT * FROM compare_scores('planted', 'planted~untrained')")
    assert {k[0] for k in got} == {"snippets", "other"}
    assert got == reference_compare_scores(scores, queries, "planted", "planted~untrained")
    for ds in ("snippets", "other"):
        only = _compare(planted, f"SELECT * FROM compare_scores('planted', 'planted~untrained', ds := '{ds}')")
        assert only == {k: v for k, v in got.items() if k[0] == ds} and only


# -- the SQL inspect macro passes every argument of dbd.inspect on ------------------------

def test_sql_inspect_takes_stable_windows_baseline_seed_and_dtype(planted):
    rows = planted.execute("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', batch_size := 2, "
                           "top_k := 2, stable_windows := 4, max_error := 0.5, seed := 1)").fetchall()
    assert len(rows) == 5
    params = json.loads(planted.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["stable_windows"] == 4 and params["top_k"] == 2 and params["seed"] == 1
    # the same query from Python has the same fingerprint (a cache hit); another stable_windows has not
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", batch_size=2, top_k=2, stable_windows=4,
                max_error=0.5, seed=1)
    assert planted.execute("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("cache",)]
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", batch_size=2, top_k=2, stable_windows=3,
                max_error=0.5, seed=1)
    assert planted.execute("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() != [("cache",)]
    with pytest.raises(Exception, match="stable_windows must be a positive integer"):
        planted.execute("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', top_k := 2, "
                        "stable_windows := 0)").fetchall()
    # baseline_seed seeds the untrained copy: the SQL scores equal Python's with the same seed
    sql = planted.execute("SELECT layer, unit, score FROM inspect('planted', ['mix'], ['digit'], 'snippets', "
                          "baseline := true, baseline_seed := 7) WHERE model = 'planted~untrained' "
                          "ORDER BY layer, unit").fetchall()
    params = json.loads(planted.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["baseline_seed"] == 7
    py7 = dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", baseline=True, baseline_seed=7, reuse=False)
    py0 = dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", baseline=True, baseline_seed=0, reuse=False)

    def twin(t):
        return sorted((r["layer"], r["unit"], r["score"]) for r in t.to_pylist() if r["model"] == "planted~untrained")
    assert sql == twin(py7) and sql != twin(py0)
    # dtype: the activations kept by keep_activations are stored in that type
    planted.execute("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', keep_activations := true, "
                    "dtype := 'float16')").fetchall()
    assert planted.execute("SELECT DISTINCT dtype FROM behaviors WHERE model = 'planted'").fetchall() == [("float16",)]
    with pytest.raises(Exception, match="dtype must be one of"):
        planted.execute("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                        "keep_activations := true, dtype := 'int8')").fetchall()
