"""The result macro top_units (sql/30_results.sql): its ranking and its `separated` flag,
against a plain-Python reference on scores with known intervals, and on a planted model whose
digit unit must come out first and separated."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

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
