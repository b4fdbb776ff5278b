"""Progressive scans: seeded record order, stop once every batch-means bound is small enough (and
the probes' held-out loss has plateaued)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.catalog import session_of
from deepbase_duck.cli import main as cli_main
from deepbase_duck.engine.inspect import (MIN_WINDOWS, PLATEAU_PATIENCE, WindowMoments, batch_means_half_width,
                                          plan_inspect, rank_sets)
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.models.charlstm import VOCAB, encode_chars

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
    t = dbd.inspect(big, "planted", ["planted"], ["digit"], "many", batch_size=8, max_error=1e-6)
    n, params = big.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    assert n == 240 and json.loads(params)["stopped_early"] is False
    # every record read: the full scan's intervals, and the bound reached is their largest half-width
    half = [max(r["score"] - r["ci_low"], r["ci_high"] - r["score"]) for r in t.to_pylist() if r["ci_low"] is not None]
    assert half and json.loads(params)["bound_reached"] == pytest.approx(max(half), rel=1e-12)


def test_bad_early_stopping_arguments(big):
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
    # top_k at least every scanned layer's width: each set holds all units, the rule means nothing
    with pytest.raises(DeepBaseError, match=r"top_k=5 is not below the width of any layer scanned "
                                            r"\(planted: 5 units, mix: 4 units\)"):
        dbd.inspect(big, "planted", ["planted", "mix"], ["digit"], "many", top_k=5)
    assert big.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]
    # one narrow layer among wider ones is fine: its set is always stable, the others decide
    dbd.inspect(big, "planted", ["planted", "mix"], ["digit"], "many", top_k=4, batch_size=8)
    assert json.loads(big.sql("SELECT params FROM queries").fetchall()[0][0])["top_k"] == 4


@pytest.mark.parametrize("measure", ["iou", "mi", "probeless"])
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


# -- probes: the held-out loss plateau ------------------------------------------------------------
def last_query(con):
    n, params = con.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return n, json.loads(params)


def probe_scores(t):
    return {(r["layer"], r["hypothesis"]): r for r in t.to_pylist() if r["measure"] == "probe"}


def first_stop(checks):
    """Indices of the checks at which the plateau rule holds (MIN_WINDOWS windows in, the last
    PLATEAU_PATIENCE checks flat)."""
    return [i for i, c in enumerate(checks) if c["windows"] >= MIN_WINDOWS and i + 1 >= PLATEAU_PATIENCE
            and all(x["plateau"] for x in checks[i + 1 - PLATEAU_PATIENCE:i + 1])]


def test_probe_plateau_stops_early_and_agrees_with_the_full_scan(big):
    layers, hyps = ["planted", "mix"], ["digit", "in_string"]
    full = probe_scores(dbd.inspect(big, "planted", layers, hyps, "many", measures=["probe"], batch_size=8))
    early = probe_scores(dbd.inspect(big, "planted", layers, hyps, "many", measures=["probe"], batch_size=8,
                                     plateau_tol=0.01, seed=1))
    n, p = last_query(big)
    assert p["stopped_early"] and p["stop_rule"] == "plateau" and p["plateau_tol"] == 0.01
    assert p["bound_reached"] is None and p["records_used"] == n
    checks = p["plateau_checks"]
    assert [c["windows"] for c in checks] == [2 ** i for i in range(1, len(checks) + 1)]
    # the scan stopped at the first check where the rule held, one window of 8 records a window
    assert first_stop(checks) == [len(checks) - 1] and n == 8 * checks[-1]["windows"] < 240
    for c in checks[-PLATEAU_PATIENCE:]:
        assert all(c["improvement"][l][h] < 0.01 for l in layers for h in hyps), c
    assert all(c["loss"][l][h] >= 0 for c in checks for l in layers for h in hyps)
    assert [c["train_rows"]["planted"] for c in checks] == sorted({c["train_rows"]["planted"] for c in checks})
    # the probes trained on the records used score within a small tolerance of the full scan's
    assert early.keys() == full.keys() == {(l, h) for l in layers for h in hyps}
    for k, e in early.items():
        assert abs(e["score"] - full[k]["score"]) <= 0.03, (k, e["score"], full[k]["score"])
        assert e["n"] < full[k]["n"] and "interval" not in json.loads(e["detail"])   # Wilson, not batch means
    assert early[("planted", "digit")]["score"] == 1.0
    # max_error alone stops the probes on the same plateau (default plateau_tol 0.01)
    again = probe_scores(dbd.inspect(big, "planted", layers, hyps, "many", measures=["probe"], batch_size=8,
                                     max_error=0.1, seed=1))
    n2, p2 = last_query(big)
    assert (n2, p2["stop_rule"], p2["plateau_tol"]) == (n, "plateau", 0.01)
    assert {k: r["score"] for k, r in again.items()} == {k: r["score"] for k, r in early.items()}


class WeakUnits(torch.nn.Module):
    """``width`` units, each carrying `whitespace` weakly (+-signal) under noise of its own that
    is pseudo-random per record, position and unit (padding does not change it): a probe needs
    all the units and many rows, so its held-out loss keeps improving as records come in."""

    def __init__(self, width=128, signal=0.06):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freq", 10 + 50 * torch.rand(width, generator=g, dtype=torch.float64))
        self.register_buffer("step", 10 * torch.rand(width, generator=g, dtype=torch.float64))
        self.register_buffer("space", torch.tensor([c.isspace() for c in VOCAB], dtype=torch.float64))
        self.signal = signal

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], dtype=torch.float64)
        record = (ids.double() * torch.cos(0.37 * pos + 1)).sum(1)[:, None, None]     # pad id 0 adds 0
        noise = torch.sin(record * self.freq + pos[None, :, None] * self.step)
        return (self.signal * (2 * self.space[ids] - 1)[..., None] + noise).float()


class WeakModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weak = WeakUnits()

    def forward(self, ids):
        return self.weak(ids)


def test_a_probe_that_keeps_improving_is_not_stopped_early(big):
    dbd.register_model(big, "weak", CharAdapter(WeakModel(), encode_chars, "chars-test", device="cpu"))
    dbd.inspect(big, "planted", ["planted"], ["digit"], "many", measures=["probe"], batch_size=8,
                plateau_tol=0.01, seed=1)
    n_easy, easy = last_query(big)
    t = dbd.inspect(big, "weak", ["weak"], ["whitespace"], "many", measures=["probe"], batch_size=8,
                    plateau_tol=0.01, seed=1)
    n_hard, hard = last_query(big)
    assert easy["stop_rule"] == "plateau" and n_easy == 8 * 8          # the first check allowed to stop
    assert hard["stop_rule"] is None and not hard["stopped_early"] and n_hard == 240
    checks = hard["plateau_checks"]
    assert first_stop(checks) == []
    # the held-out loss kept falling by more than the tolerance at the first comparisons
    assert all(c["improvement"]["weak"]["whitespace"] >= 0.01 for c in checks[1:3]), checks
    r = probe_scores(t)[("weak", "whitespace")]
    assert json.loads(r["detail"])["majority"] + 0.05 < r["score"] < 0.95       # learnable, but hard


def test_corr_and_probe_stop_when_both_rules_hold(big):
    layers, hyps = ["planted", "mix"], ["digit", "in_string"]

    def run(**kw):
        t = dbd.inspect(big, "planted", layers, hyps, "many", batch_size=8, seed=1, **kw)
        return t, *last_query(big)
    _, n_probe, _ = run(measures=["probe"], plateau_tol=0.01)
    orders = []
    for max_error in (0.3, 0.03):
        _, n_corr, _ = run(measures=["corr"], max_error=max_error)
        t, n_both, p = run(measures=["corr", "probe"], max_error=max_error)
        assert p["stop_rule"] == "max_error+plateau" and p["bound_reached"] <= max_error
        assert p["plateau_checks"][-1]["plateau"] and p["plateau_tol"] == 0.01
        # neither rule alone: the scan went on until both held
        assert n_both == max(n_corr, n_probe) < 240, (max_error, n_corr, n_probe, n_both)
        orders.append(n_corr < n_probe)
        for r in t.to_pylist():
            assert ("interval" in json.loads(r["detail"] or "{}")) == (r["measure"] == "corr")
    assert orders == [True, False]       # the bound held first, then the plateau held first


def test_bad_plateau_arguments(big):
    for bad in (0, 1, -0.5, 1.5, "0.01", True, float("nan")):
        with pytest.raises(DeepBaseError, match=r"plateau_tol must be a number in \(0, 1\), got"):
            dbd.inspect(big, "planted", ["planted"], ["digit"], "many", measures=["probe"], plateau_tol=bad)
    with pytest.raises(DeepBaseError, match="plateau_tol stops the probe measure .* computes no probe "
                                            r"\(measures: corr\)"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", plateau_tol=0.01)
    assert big.sql("SELECT count(*) FROM queries").fetchall() == [(0,)]


def test_plateau_from_sql_and_the_cli(big, tmp_path):
    big.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'many', measures := ['probe'], "
            "batch_size := 8, plateau_tol := 0.01, seed := 1)").fetchall()
    n, p = last_query(big)
    assert p["stop_rule"] == "plateau" and p["plateau_tol"] == 0.01 and n == 64
    path = str(tmp_path / "cli.duckdb")
    con = dbd.connect(path, progress=False)
    dbd.register_model(con, "planted", "ray_models:planted")       # a loader spec the CLI can load
    dbd.add_dataset(con, "many", big.sql("SELECT text FROM records WHERE dataset = 'many' ORDER BY record_id")
                    .fetchnumpy()["text"].tolist())
    dbd.close(con)
    assert cli_main(["inspect", path, "planted", "many", "--quiet", "--layers", "planted", "--hypotheses", "digit",
                     "--measures", "probe", "--batch-size", "8", "--seed", "1", "--plateau-tol", "0.01"]) == 0
    con = dbd.connect(path, progress=False)
    try:
        n_cli, p_cli = last_query(con)
    finally:
        dbd.close(con)
    keys = ("stop_rule", "plateau_tol", "records_used", "plateau_checks")
    assert n_cli == n and {k: p_cli[k] for k in keys} == {k: p[k] for k in keys}


def test_batch_means_bound_counts_only_the_windows_where_a_score_is_defined():
    from scipy import stats
    from deepbase_duck.engine.inspect import batch_means_half_width
    rng = np.random.default_rng(0)
    windows = [rng.normal(size=4) for _ in range(10)]
    for i, w in enumerate(windows):
        if i >= 3:
            w[1] = np.nan                    # a rare class: scored in 3 windows only
        if i >= 1:
            w[2] = np.nan                    # seen in one window: no spread to estimate
        w[3] = np.nan                        # never defined (a constant unit): NULL, not bounded
    half = batch_means_half_width(windows, 0.95)
    col = lambda j, m: np.array([w[j] for w in windows[:m]])  # noqa: E731
    assert half[0] == pytest.approx(stats.t.ppf(0.975, 9) * col(0, 10).std(ddof=1) / np.sqrt(10))
    assert half[1] == pytest.approx(stats.t.ppf(0.975, 2) * col(1, 3).std(ddof=1) / np.sqrt(3))
    assert half[2] == np.inf and half[3] == 0.0


def test_a_score_defined_in_no_window_is_unbounded_not_settled(big):
    """A label constant within each record, windows of one record: corr is undefined in every
    window but defined over the records merged; it has no batch-means bound (the scan must not
    stop on a bound of 0 with zero-width intervals, as it did)."""
    from deepbase_duck.hypotheses.core import Hypothesis, register
    register(Hypothesis("has_hash", lambda t: [float("#" in t)] * len(t), "binary"))
    t = dbd.inspect(big, "planted", ["mix"], ["has_hash"], "many", batch_size=1, max_error=0.05, seed=2,
                    limit=40)
    q = big.sql("SELECT n_records, params->>'stop_rule', params->>'bound_reached' FROM queries "
                "ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    rows = [r for r in t.to_pylist() if r["score"] is not None]
    # read to the end without a batch-means bound: the bound reached is the full scan's
    # (the largest half-width of the intervals reported), above max_error
    half = max(max(r["score"] - r["ci_low"], r["ci_high"] - r["score"]) for r in rows)
    assert q[0] == 40 and q[1] is None and float(q[2]) == pytest.approx(half, rel=1e-12) and half > 0.05
    # every record read: the full scan's intervals (records as clusters), not batch means over
    # windows that had no score of their own
    full = dbd.inspect(big, "planted", ["mix"], ["has_hash"], "many", batch_size=1, limit=40, reuse=False)
    want = {(r["unit"], r["hypothesis"]): (r["score"], r["ci_low"], r["ci_high"]) for r in full.to_pylist()}
    assert rows and all(want[(r["unit"], r["hypothesis"])] == pytest.approx((r["score"], r["ci_low"], r["ci_high"]),
                                                                            abs=1e-12) for r in rows)
    assert all(-1 < r["ci_low"] < r["ci_high"] < 1 and "interval" not in r["detail"] for r in rows)


def _rare_dataset(con, every: int | None = None):
    """240 records as in ``big`` with a rare class, '@' (hypothesis 'at_sign'): by default two
    records start with one, the first and the last of the seeded order of seed 5, so a scan meets
    the second '@' only at its end; with ``every``, every ``every``-th record of that order holds
    one at a seeded position (a class seen now and then, moving the ranking of its units)."""
    from deepbase_duck.hypotheses.core import Hypothesis, register
    register(Hypothesis("at_sign", lambda t: [float(c == "@") for c in t], "binary"))
    rng = np.random.default_rng(3)
    records = ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(240)]
    order = [i for (i,) in con.sql("SELECT i FROM range(240) t(i) ORDER BY sample_key('rare', i, 5), i").fetchall()]
    for i in ((order[0], order[-1]) if every is None else order[::every]):
        k = 0 if every is None else int(rng.integers(0, len(records[i])))
        records[i] = records[i][:k] + "@" + records[i][k:]
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "rare", records)
    return records


def test_min_support_keeps_a_rare_class_from_holding_the_scan(con):
    _rare_dataset(con)
    hyps = ["digit", "in_string", "at_sign"]
    kw = {"batch_size": 8, "max_error": 0.2, "seed": 5}
    dbd.inspect(con, "planted", ["planted"], hyps, "rare", **kw)
    held = json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    # once the first '@' is read, its scores are defined in one window: unbounded until the second
    # '@', read last, so the plain rule reads everything
    assert held["records_used"] == 240 and held["rare"] is None
    early = dbd.inspect(con, "planted", ["planted"], hyps, "rare", min_support=50, **kw).to_pylist()
    p = json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert p["stopped_early"] and p["records_used"] < 240 and p["min_support"] == 50
    used = [int(r) for (r,) in con.sql(f"SELECT record_id FROM sample_records('rare', {p['records_used']}, "
                                       "seed := 5)").fetchall()]
    ids = dict(con.sql("SELECT record_id, text FROM records WHERE dataset = 'rare'").fetchall())
    ats = sum(ids[r].count("@") for r in used)
    assert p["rare"] == {"at_sign": ats}              # the rarer value: the '@' characters read
    # every score of the common columns meets max_error; the rare one's rows are still returned
    half = [(r["ci_high"] - r["ci_low"]) / 2 for r in early if r["hypothesis"] != "at_sign" and r["score"] is not None]
    assert half and max(half) <= 0.2 + 1e-12 and p["bound_reached"] <= 0.2
    assert sum(r["hypothesis"] == "at_sign" for r in early) == 5
    # with a threshold every column meets (digits are common), the answer is the plain rule's
    dbd.inspect(con, "planted", ["planted"], ["digit"], "rare", min_support=5, **kw)
    d = json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "rare", reuse=False, **kw)
    plain = json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert d["rare"] == {} and d["records_used"] == plain["records_used"]


def test_min_support_keeps_a_rare_class_from_holding_a_ranking(con):
    records = _rare_dataset(con, every=16)
    hyps = ["digit", "in_string", "at_sign"]
    kw = {"batch_size": 8, "top_k": 3, "seed": 5}
    plain = dbd.inspect(con, "planted", ["planted"], hyps, "rare", **kw)
    n_plain, p_plain = last_query(con)
    early = dbd.inspect(con, "planted", ["planted"], hyps, "rare", min_support=50, **kw)
    n, p = last_query(con)
    assert p["stop_rule"] == p_plain["stop_rule"] == "top_k" and n < n_plain < 240
    used = [int(r) for (r,) in con.sql(f"SELECT record_id FROM sample_records('rare', {n}, seed := 5)").fetchall()]
    assert p["rare"] == {"at_sign": sum(records[r].count("@") for r in used)} and p_plain["rare"] is None

    def tops(t, h):
        rows = [r for r in t.to_pylist() if r["hypothesis"] == h and r["score"] is not None]
        return {r["unit"] for r in sorted(rows, key=lambda r: (-abs(r["score"]), r["unit"]))[:3]}
    # the common columns' rankings are the ones the plain rule settled on
    assert all(tops(early, h) == tops(plain, h) for h in ("digit", "in_string"))


def test_label_support_counts_against_numpy():
    from deepbase_duck.engine.labels import LabelSupport
    cols = [{"name": "b", "kind": "binary"}, {"name": "c", "kind": "categorical", "categories": ("x", "y", "z")},
            {"name": "v", "kind": "continuous"}]
    rng = np.random.default_rng(0)
    sup, ys = LabelSupport(cols), []
    for block in range(4):
        n = rng.integers(1, 5, 3)
        y = np.column_stack([rng.choice([0.0, 1.0, np.nan], n.sum(), p=[0.7, 0.2, 0.1]),
                             rng.choice([0.0, 1.0, np.nan], n.sum()),          # category 'z' never occurs
                             rng.choice([0.5, np.nan], n.sum())])
        ids = [3 * block, 3 * block + 1, 3 * block + 2]
        sup.add(torch.as_tensor(y), ids, n)
        ys.append(y)
    y = np.vstack(ys)
    want = {"b": int(min((y[:, 0] == 0).sum(), (y[:, 0] == 1).sum())), "c": 0, "v": int((~np.isnan(y[:, 2])).sum())}
    assert sup.support() == want
    # a record met again (a stored layer read on its own) is not counted twice
    sup.add(ys[1], [3, 4, 5], [len(ys[1]) - 2, 1, 1])
    assert sup.support() == want
    merged = LabelSupport(cols).merge(sup)
    assert merged.support() == want


def test_bad_min_support_arguments(big):
    with pytest.raises(DeepBaseError, match="min_support leaves rare label columns out of the max_error and top_k rules"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", min_support=10)
    with pytest.raises(DeepBaseError, match="min_support must be a non-negative integer, got -1"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", max_error=0.2, min_support=-1)


def test_min_support_from_sql_and_the_cli(con, tmp_path):
    records = _rare_dataset(con)
    rows = con.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit', 'at_sign'], 'rare', "
                   "batch_size := 8, max_error := 0.2, seed := 5, min_support := 50)").fetchall()
    assert rows == [(10,)]
    n, p = last_query(con)
    assert p["stopped_early"] and p["rare"] == {"at_sign": 1} and n < 240
    path = str(tmp_path / "cli.duckdb")
    c = dbd.connect(path, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")         # a loader spec the CLI can load
    dbd.add_dataset(c, "rare", records)
    dbd.close(c)
    assert cli_main(["inspect", path, "planted", "rare", "--quiet", "--layers", "planted", "--hypotheses", "digit",
                     "at_sign", "--batch-size", "8", "--seed", "5", "--max-error", "0.2", "--min-support", "50"]) == 0
    c = dbd.connect(path, progress=False)
    try:
        n_cli, p_cli = last_query(c)
    finally:
        dbd.close(c)
    assert n_cli == n and p_cli["rare"] == p["rare"] and p_cli["min_support"] == 50


def test_top_sets_rank_null_scores_last_against_a_reference():
    import pyarrow as pa
    from deepbase_duck.engine.inspect import top_sets
    # constant units (NULL scores) never make a top set while units with scores remain
    t = pa.table({"unit": pa.array([0, 1, 2, 3, None], pa.int32()), "hypothesis": ["h"] * 5,
                  "score": pa.array([None, None, None, -0.1, 0.9], pa.float64())})
    assert top_sets(t, 1) == {"h": frozenset({3})} and top_sets(t, 2) == {"h": frozenset({0, 3})}

    def reference(t, k):
        units, hyps, sc = (t.column(c).to_pylist() for c in ("unit", "hypothesis", "score"))
        out = {}
        for h in set(hyps):
            rows = sorted((i for i, x in enumerate(hyps) if x == h and units[i] is not None),
                          key=lambda i: (-(abs(sc[i]) if sc[i] is not None else -1.0), units[i]))
            out[h] = frozenset(units[i] for i in rows[:k])
        return out

    rng = np.random.default_rng(0)
    for _ in range(100):
        W, H = int(rng.integers(1, 30)), int(rng.integers(1, 5))
        scores = [None if rng.random() < 0.2 else float(x) for x in np.round(rng.normal(size=W * H), 1)]  # ties
        t = pa.table({"unit": pa.array([u for u in range(W) for _ in range(H)], pa.int32()),
                      "hypothesis": [f"h{j}" for _ in range(W) for j in range(H)],
                      "score": pa.array(scores, pa.float64())})
        k = int(rng.integers(1, 12))
        assert top_sets(t, k) == reference(t, k)
        u, h, s = (np.array([-1 if x is None else x for x in t.column("unit").to_pylist()]),
                   np.array(t.column("hypothesis").to_pylist(), dtype=object),
                   np.array([np.nan if x is None else x for x in t.column("score").to_pylist()]))
        assert rank_sets(u, h, s, k) == reference(t, k)     # the stop rule's path, from score_rows




def test_window_moments_equal_batch_means_over_every_prefix():
    # the stop rule's running form of the batch-means bound, against the direct one (nanstd over
    # all windows), with scores missing in some windows and one never defined
    rng = np.random.default_rng(3)
    windows = [np.where(rng.random(300) < 0.3, np.nan, rng.normal(5.0, 2.0, 300)) for _ in range(30)]
    for w in windows:
        w[0] = np.nan                                     # a score no window defines: 0 (not bounded)
    windows[4][1] = 7.0                                   # a score defined in one window: unbounded
    for w in windows[:4] + windows[5:]:
        w[1] = np.nan
    m = WindowMoments()
    for i, w in enumerate(windows, 1):
        m.add(w)
        got, want = m.half_width(0.95), batch_means_half_width(windows[:i], 0.95)
        assert np.array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-10, atol=1e-15)
    assert got[0] == 0.0 and got[1] == np.inf


def test_pearson_score_rows_are_finalize_columns():
    from deepbase_duck.inspectors.correlation import PearsonState
    st = PearsonState(6, [{"name": "a", "kind": "binary"}, {"name": "b", "kind": "continuous"}])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    x[:, 2] = 1.5                                         # a constant unit: NULL score
    y = torch.stack([(torch.rand(200, generator=g) < 0.3).double(), torch.randn(200, generator=g, dtype=torch.float64)], 1)
    y[::7, 1] = float("nan")
    st.update(x, y)
    t = st.finalize()
    unit, hyp, score = st.score_rows()
    assert unit.tolist() == t.column("unit").to_pylist() and hyp.tolist() == t.column("hypothesis").to_pylist()
    ref = np.array([np.nan if v is None else v for v in t.column("score").to_pylist()])
    assert np.isnan(score[4]) and np.isnan(score[5])
    np.testing.assert_array_equal(score, ref)


class _SplitAdapter(CharAdapter):
    window_split = 4


def test_window_split_runs_each_window_as_length_sorted_batches_with_the_same_result(big):
    """A model whose adapter declares window_split = 4 (stored in its catalog row) runs each
    progressive window as 4 length-sorted batches: the same records in the same windows, hence
    the same records used and the same scores as the model run one batch per window."""
    from deepbase_duck.engine.inspect import plan_inspect, seeded_windows
    torch.manual_seed(0)
    planted = planted_adapter()
    dbd.register_model(big, "split4", _SplitAdapter(planted.module, encode_chars, "chars-test", device="cpu"))
    assert big.sql("SELECT name, window_split FROM models ORDER BY name").fetchall() == [("planted", 1), ("split4", 4)]
    session = session_of(big)
    one, four = (plan_inspect(session, m, ["planted"], ["digit"], "many", batch_size=8, max_error=0.2, seed=5)
                 for m in ("planted", "split4"))
    b1, w1 = seeded_windows(session, one)
    b4, w4 = seeded_windows(session, four)
    assert w1 == [1] * 30 and w4 == [4] * 30 and [len(b) for b in b4] == [2] * 120
    lengths = dict(big.sql("SELECT record_id, length(text) FROM records WHERE dataset = 'many'").fetchall())
    for i, window in enumerate(b1):                        # the same records per window, cut by length
        cut = b4[4 * i:4 * i + 4]
        assert sorted(r for b in cut for r in b) == sorted(window)
        assert all(max(lengths[r] for r in a) <= min(lengths[r] for r in b) for a, b in zip(cut, cut[1:]))
    runs = {}
    for m in ("planted", "split4"):
        rows = dbd.inspect(big, m, ["planted", "mix"], ["digit", "in_string"], "many", batch_size=8,
                           max_error=0.2, seed=5).to_pylist()
        n, params = big.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
        runs[m] = (n, json.loads(params)["bound_reached"], rows)
    (n1, bound1, r1), (n4, bound4, r4) = runs["planted"], runs["split4"]
    assert n1 == n4 < 240 and bound4 == pytest.approx(bound1, abs=1e-12)
    for a, b in zip(r1, r4):
        assert (a["layer"], a["unit"], a["hypothesis"], a["n"]) == (b["layer"], b["unit"], b["hypothesis"], b["n"])
        assert (a["score"] is None) == (b["score"] is None)
        if a["score"] is not None:
            assert b["score"] == pytest.approx(a["score"], abs=1e-12)
            assert b["ci_low"] == pytest.approx(a["ci_low"], abs=1e-12)


def test_bad_window_split_is_named(big):
    class Bad(CharAdapter):
        window_split = 0
    with pytest.raises(DeepBaseError, match=r"window_split must be a positive integer, got 0"):
        dbd.register_model(big, "bad", Bad(planted_adapter().module, encode_chars, "chars-test", device="cpu"))
    assert big.sql("SELECT count(*) FROM models WHERE name = 'bad'").fetchall() == [(0,)]


def test_progressive_scan_over_stored_activations_reads_the_seeded_windows(big, tmp_path, monkeypatch):
    """Activations stored (float32, in a few parts): the progressive query reads the same records,
    the seeded order's prefix, with the same bound and scores as the model would give, and another
    seed another prefix; with a part cache too small for one part, the same again."""
    import importlib
    engine = importlib.import_module("deepbase_duck.engine.inspect")
    hyps = ["digit", "bracket_depth"]
    q = dict(batch_size=8, max_error=0.25, reuse=False)

    def run(seed):
        t = dbd.inspect(big, "planted", ["planted", "mix"], hyps, "many", seed=seed, **q)
        source, params = big.sql("SELECT source, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
        params = json.loads(params)
        return source, params, {(r["layer"], r["unit"], r["hypothesis"]): r for r in t.to_pylist()}

    model = {seed: run(seed) for seed in (5, 6)}
    dbd.extract(big, "planted", ["planted", "mix"], "many", batch_size=40)
    parts = big.sql("SELECT count(*) FROM behavior_parts").fetchall()[0][0]
    assert parts >= 10                                            # several parts per layer
    import pyarrow.parquet as pq
    root = session_of(big).act_root
    files = [root / d / f for d, f in big.sql("SELECT b.directory, p.file FROM behavior_parts p "
                                              "JOIN behaviors b USING (behavior_id)").fetchall()]
    assert max(pq.ParquetFile(f).metadata.num_row_groups for f in files) >= 2   # records read by row group
    for cache in (engine.PART_CACHE_BYTES, 1):
        monkeypatch.setattr(engine, "PART_CACHE_BYTES", cache)
        for seed in (5, 6):
            source, params, rows = run(seed)
            m_source, m_params, m_rows = model[seed]
            assert (source, m_source) == ("stored", "model")
            assert params["records_used"] == m_params["records_used"] < 240
            prefix = big.sql(f"SELECT sum(length(r.text)) FROM seeded_order('many', seed := {seed}) o "
                             f"JOIN records r USING (record_id) WHERE o.rank <= {params['records_used']}").fetchall()[0][0]
            assert rows[("planted", 0, "digit")]["n"] == prefix
            assert params["bound_reached"] == pytest.approx(m_params["bound_reached"], abs=1e-9)
            for k, r in rows.items():
                want = m_rows[k]
                for col in ("score", "ci_low", "ci_high"):
                    if want[col] is None:
                        assert r[col] is None
                    else:
                        assert r[col] == pytest.approx(want[col], abs=1e-9), (k, col)
    assert model[5][1]["records_used"] != model[6][1]["records_used"] or \
        model[5][2][("mix", 0, "digit")]["score"] != model[6][2][("mix", 0, "digit")]["score"]


def test_mi_windows_share_the_totals_bins_so_merges_are_exact(con):
    """A progressive scan's window states for mi take the total's calibrated edges
    (window_state): the windows merged equal one state fed the same rows; a fresh state per
    window calibrated on its own rows and merged approximately ('approximate merge' in bin_rule)."""
    import random
    from deepbase_duck.engine.inspect import window_state
    from deepbase_duck.inspectors import measure_class
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48000, 4))
    y = (rng.random((48000, 1)) < 0.3).astype(float)
    x[:, 0] += 0.3 * y[:, 0]
    hyps = [{"name": "a", "kind": "binary"}]
    make = lambda *k: measure_class("mi")(4, hyps)  # noqa: E731
    one, total = make(), make()
    window = make()
    for a in range(0, 48000, 12000):
        xb, yb = torch.tensor(x[a:a + 12000]), torch.tensor(y[a:a + 12000])
        one.update(xb, yb)
        window.update(xb, yb)
        total.combine(window)
        window = window_state(total, make, None)
    got, want = total.finalize().to_pylist(), one.finalize().to_pylist()
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-12)
    assert total.approx_rows == 0
    # through the engine: windows of 16 records of 1,000 characters (16,000 rows: each window
    # would calibrate itself)
    random.seed(0)
    texts = ["".join(random.choice("abc 123 (x) 'q' #9\n") for _ in range(1000)) for _ in range(48)]
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "long", texts)
    t = dbd.inspect(con, "planted", ["planted"], ["digit"], "long", measures=["mi"], max_error=0.001, seed=1)
    rules = {json.loads(r["detail"])["bin_rule"] for r in t.to_pylist()}
    assert rules == {"quantile (10 bins) of the first 10000 rows"}


def test_min_support_with_every_column_rare_bounds_nothing_and_does_not_stop(big):
    """When every label column is still rare, no score is bounded: the bound is unknown (inf),
    not 0, so the scan does not stop at its fifth window on nothing."""
    t = dbd.inspect(big, "planted", ["mix"], ["in_string"], "many", max_error=0.02, seed=1, min_support=10**6,
                    limit=60)
    n, rule, bound = big.sql("SELECT n_records, params->>'stop_rule', params->>'bound_reached' FROM queries "
                             "ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    # read to the end: the bound reached is that of the full scan's intervals
    half = max(max(r["score"] - r["ci_low"], r["ci_high"] - r["score"]) for r in t.to_pylist()
               if r["ci_low"] is not None)
    assert n == 60 and rule is None and float(bound) == pytest.approx(half, rel=1e-12) and half > 0.02


def test_stable_windows_without_top_k_is_refused_in_python_and_sql(big):
    with pytest.raises(DeepBaseError, match=r"stable_windows \(5\) .* needs top_k"):
        dbd.inspect(big, "planted", ["planted"], ["digit"], "many", stable_windows=5)
    with pytest.raises(Exception, match=r"stable_windows \(5\) .* needs top_k"):
        big.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'many', stable_windows := 5)").fetchall()
    # left out, a ranking query waits 3 windows (recorded in the query's params)
    dbd.inspect(big, "planted", ["planted"], ["digit"], "many", batch_size=8, top_k=2, seed=1)
    assert last_query(big)[1]["stable_windows"] == 3


@pytest.mark.parametrize("rule", ["max_error", "top_k", "iou"])
def test_a_class_not_met_yet_keeps_the_scan_reading(big, rule):
    """A hypothesis whose class no window has met has every unit score NULL: it is not settled
    (its half-widths counted 0 and its all-NULL top-k sets, tied by unit number, looked stable,
    so the scan stopped with its scores all NULL and bound 0). Here its only positive records come
    last in the seeded order: the scan reads on to them and scores it."""
    order = [r for (r,) in big.sql("SELECT record_id FROM seeded_order('many', seed := 2)").fetchall()]
    texts = dict(big.sql("SELECT record_id, text FROM records WHERE dataset = 'many'").fetchall())
    last = {texts[r] for r in order[-3:]}
    assert all(texts[r] not in last for r in order[:-3])          # (those texts are nowhere else)

    @dbd.hypothesis(f"last_three_{rule}", kind="binary")
    def last_three(text):
        return [(0, len(text))] if text in last else []
    kw = dict(max_error=0.9) if rule in ("max_error", "iou") else dict(top_k=3, stable_windows=1)
    if rule == "iou":           # (its scores are 0, not NULL, while the class is unmet: the labels say it)
        kw["measures"] = ["iou"]
    t = dbd.inspect(big, "planted", ["mix"], ["digit", f"last_three_{rule}"], "many", batch_size=8, seed=2, **kw)
    params = json.loads(big.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["records_used"] == 240 and not params["stopped_early"] and params["stop_rule"] is None
    scores = [r["score"] for r in t.to_pylist() if r["hypothesis"] == f"last_three_{rule}"]
    assert scores and all(s is not None for s in scores)
    # without it the same query stops early, on the digit column alone
    t = dbd.inspect(big, "planted", ["mix"], ["digit"], "many", batch_size=8, seed=2, **kw)
    params = json.loads(big.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["stopped_early"] and params["records_used"] < 240


def test_a_rule_that_first_holds_at_the_last_window_is_no_early_stop():
    """A scan whose rule held only once every record was read stopped nothing: its report said
    'stopped early after 125 of 125 records' with the full scan's wider bound."""
    from types import SimpleNamespace
    from deepbase_duck.engine.inspect import stop_report
    plan = SimpleNamespace(record_ids=list(range(10)), probe_checks=[], model="m")
    last = {"records_used": 10, "stopped_early": True, "stop_rule": "max_error", "bound": 0.1}
    out = stop_report([(plan, last)])
    assert (out["stopped_early"], out["stop_rule"], out["records_used"]) == (False, None, 10)
    early = dict(last, records_used=6)
    out = stop_report([(plan, early)])
    assert (out["stopped_early"], out["stop_rule"]) == (True, "max_error")
    other = SimpleNamespace(record_ids=list(range(10)), probe_checks=[], model="n")
    out = stop_report([(plan, dict(last, stopped_early=False, stop_rule=None)), (other, dict(last, stop_rule="top_k"))])
    assert (out["stopped_early"], out["stop_rule"]) == (False, None)    # not 'm: None; n: top_k'


def test_a_category_the_dataset_never_holds_does_not_keep_the_scan_reading(big):
    """A categorical hypothesis' category that no record holds ('upos=PUNCT' over text without
    punctuation) has every corr score NULL, for good: it does not block the stop rule."""
    from deepbase_duck.hypotheses.core import Hypothesis, register

    def brackets(text):
        kinds = {"(": "round", ")": "round", "[": "square", "]": "square"}
        return [(i, i + 1, kinds[c]) for i, c in enumerate(text) if c in kinds]
    register(Hypothesis("brackets_absent_kind", brackets, "categorical", categories=("round", "square", "never")))
    t = dbd.inspect(big, "planted", ["mix"], ["digit", "brackets_absent_kind"], "many", batch_size=8, seed=2,
                    max_error=0.9)
    params = json.loads(big.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["stopped_early"] and params["records_used"] < 240
    never = [r["score"] for r in t.to_pylist() if r["hypothesis"] == "brackets_absent_kind=never"]
    assert never and all(v is None for v in never)


@pytest.mark.parametrize("rule", ["max_error", "top_k", "iou"])
def test_a_hypothesis_constant_over_the_stored_labels_does_not_keep_the_scan_reading(big, rule):
    """A binary hypothesis whose class no selected record holds, and a continuous one constant
    over them, have undefined (or 0) scores for good. Before, a progressive scan read every
    record waiting for them; with their labels stored for every selected record the store says
    they are constant, and the scan stops as it would without them. A class met only in the
    last records of the seeded order still keeps it reading, stored labels or not."""
    order = [r for (r,) in big.sql("SELECT record_id FROM seeded_order('many', seed := 2)").fetchall()]
    texts = dict(big.sql("SELECT record_id, text FROM records WHERE dataset = 'many'").fetchall())
    last = {texts[r] for r in order[-3:]}

    @dbd.hypothesis(f"nowhere_{rule}", kind="binary")
    def nowhere(text):
        return [(i, i + 1) for i, c in enumerate(text) if c == "\x07"]     # no record holds a BEL

    @dbd.hypothesis(f"flat_{rule}", kind="continuous")
    def flat(text):
        return [(0, len(text), 2.5)]

    @dbd.hypothesis(f"late_{rule}", kind="binary")
    def late(text):
        return [(0, len(text))] if text in last else []
    kw = dict(max_error=0.9) if rule in ("max_error", "iou") else dict(top_k=3, stable_windows=1)
    measures = ["iou"] if rule == "iou" else ["corr"]
    constant = [f"nowhere_{rule}"] + ([] if rule == "iou" else [f"flat_{rule}"])   # (iou takes binary only)

    def run(hyps):
        t = dbd.inspect(big, "planted", ["mix"], ["digit"] + hyps, "many", batch_size=8, seed=2,
                        measures=measures, **kw)
        return t, json.loads(big.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    _, alone = run([])
    assert alone["stopped_early"]
    dbd.annotate(big, constant + [f"late_{rule}"], "many")
    t, params = run(constant)
    assert params["stopped_early"] and params["records_used"] == alone["records_used"]
    assert sorted(params["constant_columns"]) == sorted(constant)
    for h in constant:
        scores = [r["score"] for r in t.to_pylist() if r["hypothesis"] == h]
        assert scores and all(s is None or s == 0 for s in scores)
    plan = plan_inspect(session_of(big), "planted", ["mix"], ["digit", f"late_{rule}"] + constant,
                                           "many", measures=measures, **kw)
    assert sorted(plan.constant_columns) == sorted(constant)
    _, params = run([f"late_{rule}"] + constant)
    assert params["records_used"] == 240 and not params["stopped_early"]
    # labels of some selected records not stored (a dataset grown since): not known to be constant
    big.execute("DELETE FROM labeled_records WHERE dataset = 'many' AND record_id = ? AND hypothesis = ?",
                [order[-1], f"nowhere_{rule}"])
    plan = plan_inspect(session_of(big), "planted", ["mix"], constant, "many",
                                           measures=measures, **kw)
    assert plan.constant_columns == constant[1:]
