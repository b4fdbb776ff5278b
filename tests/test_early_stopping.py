"""Progressive scans: seeded record order, stop once every batch-means bound is small enough."""
from __future__ import annotations

import json

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

from conftest import TEXTS, planted_adapter


@pytest.fixture
def big(con):
    rng = np.random.default_rng(3)
    records = ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(240)]
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "many", records)
    return con


def test_stops_early_on_a_seeded_prefix_with_honest_bounds(big):
    hyps = ["digit", "bracket_depth", "in_string"]
    full = dbd.inspect(big, "planted", ["planted", "mix"], hyps, "many", batch_size=8).to_pylist()
    early = dbd.inspect(big, "planted", ["planted", "mix"], hyps, "many", batch_size=8, max_error=0.2,
                        seed=5).to_pylist()
    n_records, params = big.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    params = json.loads(params)
    assert params["stopped_early"] and params["bound_reached"] <= 0.2
    assert 40 <= n_records < 240 and params["records_used"] == n_records
    # the records used are the seeded prefix: exactly sample_records(ds, n, seed)
    prefix = {r for (r,) in big.sql(f"SELECT record_id FROM sample_records('many', {n_records}, seed := 5)").fetchall()}
    want_symbols = sum(len(t) for (t,) in big.sql(
        f"SELECT text FROM records WHERE dataset = 'many' AND record_id IN ({','.join(map(str, prefix))})").fetchall())
    assert {r["n"] for r in early if r["hypothesis"] == "digit"} == {want_symbols}
    # the reported intervals contain the full-scan score for at least 95% of the scores
    f = {(r["layer"], r["unit"], r["hypothesis"]): r["score"] for r in full}
    inside = [e["ci_low"] <= f[(e["layer"], e["unit"], e["hypothesis"])] <= e["ci_high"]
              for e in early if e["score"] is not None and f[(e["layer"], e["unit"], e["hypothesis"])] is not None]
    assert len(inside) > 20 and np.mean(inside) >= 0.95
    assert all("batch means" in json.loads(e["detail"])["interval"] for e in early)
    # the planted units are still found
    best = max((e for e in early if e["layer"] == "planted" and e["hypothesis"] == "digit" and e["score"] is not None),
               key=lambda e: abs(e["score"]))
    assert best["unit"] in (0, 1)


def test_same_seed_same_records_and_a_tight_bound_scans_everything(big):
    a = dbd.inspect(big, "planted", ["planted"], ["digit"], "many", batch_size=8, max_error=0.3, seed=2)
    b = dbd.inspect(big, "planted", ["planted"], ["digit"], "many", batch_size=8, max_error=0.3, seed=2, reuse=False)
    assert big.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("model",)]
    assert a.column("score").to_pylist() == b.column("score").to_pylist()
    dbd.inspect(big, "planted", ["planted"], ["digit"], "many", batch_size=8, max_error=1e-6)
    n, params = big.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    assert n == 240 and json.loads(params)["stopped_early"] is False


def test_bad_early_stopping_arguments(big):
    with pytest.raises(DeepBaseError, match="has error bounds for corr, pointbiserial, .*; not for: probe"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", measures=["probe"], max_error=0.1)
    with pytest.raises(DeepBaseError, match=r"max_error must be in \(0, 1\), got 2"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", max_error=2)


def test_early_stopping_from_sql(big):
    rows = big.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'many', batch_size := 8, "
                   "max_error := 0.3, seed := 2)").fetchall()
    assert rows == [(5,)]
    n = big.sql("SELECT n_records FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
    assert n < 240


def test_top_k_stops_once_the_ranking_is_stable_and_agrees_with_the_full_scan(big):
    hyps = ["digit", "bracket_depth", "in_string"]
    full = dbd.inspect(big, "planted", ["planted", "mix"], hyps, "many", batch_size=8).to_pylist()
    early = dbd.inspect(big, "planted", ["planted", "mix"], hyps, "many", batch_size=8, top_k=2,
                        stable_windows=3, seed=4).to_pylist()
    n_records, params = big.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    params = json.loads(params)
    assert params["stopped_early"] and params["stop_rule"] == "top_k" and params["top_k"] == 2
    assert 5 * 8 <= n_records < 240                      # at least MIN_WINDOWS windows of 8 records

    def top(rows, layer, h):
        ok = [r for r in rows if r["layer"] == layer and r["hypothesis"] == h and r["score"] is not None]
        return {r["unit"] for r in sorted(ok, key=lambda r: (-abs(r["score"]), r["unit"]))[:2]}
    for layer in ("planted", "mix"):
        for h in hyps:
            assert top(early, layer, h) == top(full, layer, h), (layer, h)
    assert top(early, "planted", "digit") == {0, 1}      # the planted digit units


def test_bad_top_k_arguments(big):
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(DeepBaseError, match="top_k must be a positive integer"):
            dbd.inspect(big, "planted", ["planted"], ["digit"], "many", top_k=bad)
    with pytest.raises(DeepBaseError, match="stable_windows must be a positive integer"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", top_k=3, stable_windows=0)
    with pytest.raises(DeepBaseError, match="probe measures .* do not take it: probe"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", measures=["probe"], top_k=3)
    assert big.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]


@pytest.mark.parametrize("measure", ["iou", "mi"])
def test_batch_means_bounds_cover_other_measures(big, measure):
    hyps = ["digit", "in_string"]
    full = dbd.inspect(big, "planted", ["planted", "mix"], hyps, "many", measures=[measure], batch_size=8).to_pylist()
    f = {(r["layer"], r["unit"], r["hypothesis"]): r["score"] for r in full}
    cover = []
    for seed in (1, 2, 3):
        early = dbd.inspect(big, "planted", ["planted", "mix"], hyps, "many", measures=[measure], batch_size=8,
                            max_error=0.1, seed=seed).to_pylist()
        n, params = big.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
        assert n < 240 and json.loads(params)["stop_rule"] == "max_error"
        for e in early:
            want = f[(e["layer"], e["unit"], e["hypothesis"])]
            if e["score"] is not None and want is not None:
                assert 0.0 <= e["ci_low"] <= e["score"] <= e["ci_high"]      # clipped to the measure's range
                cover.append(e["ci_low"] - 1e-12 <= want <= e["ci_high"] + 1e-12)
    assert len(cover) >= 30 and np.mean(cover) >= 0.9
