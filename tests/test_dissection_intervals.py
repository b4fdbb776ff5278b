"""Intervals and p-values of iou / precision / recall / f1 with records as clusters: against a
direct per-record computation, merged and sampled states, a cluster bootstrap, and the coverage
of a known population value (the symbol-level Wilson interval falls far short of it)."""
import numpy as np
import pytest
import torch
from scipy import stats

from deepbase_duck.errors import BadParameterError
from deepbase_duck.inspectors import measure_class
from deepbase_duck.inspectors.spearman import row_keys

BIN = [{"name": "h0", "kind": "binary"}, {"name": "h1", "kind": "binary"}]
MEASURES = ["iou", "precision", "recall", "f1"]


def corpus(rng, records=40, effect=1.0):
    """Records of 30-150 symbols; unit 0 fires on h0 with a per-record offset (records differ),
    unit 1 noise, unit 2 constant, unit 3 a clean detector of h1; some labels missing."""
    xs, ys, rs = [], [], []
    for g in range(records):
        n = int(rng.integers(30, 150))
        e = rng.normal()
        y0 = (rng.random(n) < 0.08 + 0.08 * (e > 0)).astype(float)
        y1 = (rng.random(n) < 0.2).astype(float)
        y1[rng.random(n) < 0.1] = np.nan
        x = np.stack([2 * y0 + rng.normal(size=n) + effect * e, rng.normal(size=n), np.ones(n),
                      3 * np.nan_to_num(y1) + rng.normal(size=n)], 1)
        xs.append(x), ys.append(np.stack([y0, y1], 1)), rs.append(np.full(n, 1000 + 7 * g))
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.concatenate(rs).astype(np.int64))


def feed(measure, x, y, rec, splits=(), **params):
    st = measure_class(measure)(x.shape[1], BIN, **params)
    b = [0, *splits, len(x)]
    for a, c in zip(b[:-1], b[1:]):
        st.update(torch.as_tensor(x[a:c]), torch.as_tensor(y[a:c]), torch.as_tensor(rec[a:c]))
    return st


def grid(t, col):
    v = np.array([np.nan if a is None else a for a in t.column(col).to_pylist()], dtype=float)
    return v.reshape(-1, len(BIN))


def reference(measure, x, y, rec, q, confidence=0.95):
    """(score, lo, hi, p, records) by a direct loop over units, hypotheses and records."""
    W, H = x.shape[1], y.shape[1]
    out = {k: np.full((W, H), np.nan) for k in ("score", "lo", "hi", "p", "G")}
    ids = np.unique(rec)
    for w in range(W):
        if x[:, w].max() <= x[:, w].min():
            continue
        T = np.quantile(x[:, w].astype(np.float64), 1 - q)
        fires = x[:, w] > T
        for h in range(H):
            m = ~np.isnan(y[:, h])
            pos = m & (y[:, h] != 0)
            per = np.array([[(fires & pos & (rec == g)).sum(), (fires & m & (rec == g)).sum(),
                             (pos & (rec == g)).sum(), (m & (rec == g)).sum()] for g in ids], float)
            per = per[per[:, 3] > 0]                                   # records with a label
            Ig, Ag, Lg, Ng = per.T
            I, A, L, N = per.sum(0)
            G = len(per)
            den_g = {"precision": Ag, "recall": Lg}.get(measure, Ag + Lg - Ig)   # f1: IoU's interval
            R = Ig.sum() / den_g.sum()
            se = np.sqrt(G / (G - 1) * ((Ig - R * den_g) ** 2).sum()) / den_g.sum()
            n = den_g.sum()
            n_eff = min(n, R * (1 - R) / se ** 2) if se > 0 else n
            tq = stats.t.ppf(0.5 + confidence / 2, G - 1)
            k = R * n_eff
            c = (k + tq ** 2 / 2) / (n_eff + tq ** 2)
            half = tq / (n_eff + tq ** 2) * np.sqrt(k * (n_eff - k) / n_eff + tq ** 2 / 4)
            lo, hi = c - half, c + half
            if measure == "f1":
                lo, hi = 2 * lo / (1 + lo), 2 * hi / (1 + hi)
            with np.errstate(invalid="ignore", divide="ignore"):
                score = {"iou": I / (A + L - I), "precision": I / A, "recall": I / L, "f1": 2 * I / (A + L)}[measure]
            with np.errstate(invalid="ignore", divide="ignore"):
                P, B = I / A, L / N
                z = (Ig - P * Ag) / A - (Lg - B * Ng) / N
                sd = np.sqrt(G / (G - 1) * (z ** 2).sum())
            p = stats.t.sf((P - B) / sd, G - 1) if A > 0 else 1.0     # nothing fires: no evidence
            out["score"][w, h], out["lo"][w, h], out["hi"][w, h], out["p"][w, h], out["G"][w, h] = \
                score, lo, hi, p, G
    return out


@pytest.mark.parametrize("measure", MEASURES)
def test_equal_to_a_direct_per_record_computation(measure):
    x, y, rec = corpus(np.random.default_rng(1))
    ref = reference(measure, x, y, rec, 0.05)
    for splits in [(), (37, 1100, 2222, 3001)]:          # records cut across batches: still one record
        t = feed(measure, x, y, rec, splits, quantile=0.05).finalize()
        for col, key in (("score", "score"), ("ci_low", "lo"), ("ci_high", "hi"), ("p_value", "p"),
                         ("records", "G")):
            np.testing.assert_allclose(grid(t, col)[[0, 1, 3]], ref[key][[0, 1, 3]], rtol=1e-9, atol=1e-12,
                                       err_msg=(measure, col))
    assert np.isnan(grid(t, "score")[2]).all()                      # the constant unit: NULL
    assert grid(t, "p_value")[0, 0] < 1e-3 and grid(t, "p_value")[3, 1] < 1e-6   # the planted units


def test_merged_and_sampled_states():
    x, y, rec = corpus(np.random.default_rng(2))
    one = feed("iou", x, y, rec, quantile=0.05).finalize()
    parts = [measure_class("iou")(4, BIN, quantile=0.05) for _ in range(3)]
    for st, (a, b) in zip(parts, [(0, 900), (900, 2500), (2500, len(x))]):   # records split between states
        st.update(torch.as_tensor(x[a:b]), torch.as_tensor(y[a:b]), torch.as_tensor(rec[a:b]))
    merged = parts[1].combine(parts[0]).combine(parts[2]).finalize()
    for col in ("score", "ci_low", "ci_high", "p_value", "records"):
        np.testing.assert_allclose(grid(merged, col), grid(one, col), rtol=1e-12, atol=1e-15)
    # beyond max_rows: the formula on the hashed row sample (keys below 2^(63 - j))
    st = feed("iou", x, y, rec, (1000, 2000), quantile=0.05, max_rows=800, seed=3)
    assert st.j > 0
    keys = row_keys(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(rec), seed=3).numpy()
    rows = keys < (1 << (63 - st.j))
    ref = reference("iou", x[rows], y[rows], rec[rows], 0.05)
    t = st.finalize()
    for col, key in (("ci_low", "lo"), ("ci_high", "hi"), ("p_value", "p"), ("records", "G")):
        np.testing.assert_allclose(grid(t, col)[[0, 1, 3]], ref[key][[0, 1, 3]], rtol=1e-9, atol=1e-12)


def test_symbols_keeps_wilson_and_hypergeometric():
    x, y, rec = corpus(np.random.default_rng(3))
    t = feed("precision", x, y, rec, quantile=0.05, intervals="symbols").finalize()
    assert "records" not in t.column_names
    T = np.quantile(x[:, 0].astype(np.float64), 0.95)
    f, lab = x[:, 0] > T, y[:, 0] != 0
    I, A = (f & lab).sum(), f.sum()
    z = stats.norm.ppf(0.975)
    c = (I + z * z / 2) / (A + z * z)
    half = z / (A + z * z) * np.sqrt(I * (A - I) / A + z * z / 4)
    assert grid(t, "ci_low")[0, 0] == pytest.approx(c - half, abs=1e-12)
    assert grid(t, "p_value")[0, 0] == pytest.approx(stats.hypergeom.sf(I - 1, len(x), lab.sum(), A), rel=1e-9)
    # a batch without record ids falls back to the same
    st = measure_class("precision")(4, BIN, quantile=0.05)
    st.update(torch.as_tensor(x), torch.as_tensor(y))
    assert grid(st.finalize(), "ci_low")[0, 0] == pytest.approx(c - half, abs=1e-12)
    with pytest.raises(BadParameterError, match="intervals must be 'records'"):
        measure_class("iou")(4, BIN, intervals="record")


def test_standard_error_close_to_a_cluster_bootstrap():
    """The linearised standard error against 2,000 resamples of records (threshold held)."""
    rng = np.random.default_rng(4)
    x, y, rec = corpus(rng, records=60)
    t = feed("iou", x, y, rec, quantile=0.05).finalize()
    ids, inv = np.unique(rec, return_inverse=True)
    T = np.quantile(x[:, 0].astype(np.float64), 0.95)
    f, lab = x[:, 0] > T, y[:, 0] != 0
    Ig = np.bincount(inv, f & lab)
    Ug = np.bincount(inv, f | lab)
    boot = []
    for _ in range(2000):
        pick = rng.integers(0, len(ids), len(ids))
        boot.append(Ig[pick].sum() / Ug[pick].sum())
    R = Ig.sum() / Ug.sum()
    G = len(ids)
    se = np.sqrt(G / (G - 1) * ((Ig - R * Ug) ** 2).sum()) / Ug.sum()
    assert se == pytest.approx(np.std(boot), rel=0.15)
    # and the engine's interval is as wide as that se says (Wilson at the effective size)
    lo, hi = grid(t, "ci_low")[0, 0], grid(t, "ci_high")[0, 0]
    assert (hi - lo) / 2 == pytest.approx(stats.t.ppf(0.975, G - 1) * se, rel=0.15)


def test_coverage_of_a_population_value():
    """200 samples of 40 records from a population of 3,000 records with record effects: the
    record interval holds the population's IoU (at the population's threshold) near its 95%;
    the symbol-level Wilson interval far less often."""
    rng = np.random.default_rng(5)
    px, py, prec = corpus(rng, records=3000, effect=1.5)
    Tp = np.quantile(px[:, 0].astype(np.float64), 0.95)
    f, lab = px[:, 0] > Tp, py[:, 0] != 0
    truth = (f & lab).sum() / (f | lab).sum()
    starts = np.flatnonzero(np.r_[True, prec[1:] != prec[:-1]])
    ends = np.r_[starts[1:], len(prec)]
    hit = {"records": 0, "symbols": 0}
    for _ in range(200):
        pick = rng.choice(len(starts), 40, replace=False)
        rows = np.concatenate([np.arange(starts[i], ends[i]) for i in pick])
        for kind in hit:
            t = feed("iou", px[rows], py[rows], prec[rows], quantile=0.05, intervals=kind).finalize()
            hit[kind] += grid(t, "ci_low")[0, 0] <= truth <= grid(t, "ci_high")[0, 0]
    assert 0.88 <= hit["records"] / 200 <= 0.995, hit
    assert hit["symbols"] / 200 < 0.75, hit


def test_engine_reports_record_clustered_intervals(planted):
    """Through dbd.inspect: the same intervals as the direct computation over per-record forward
    passes, detail names the records; iou={'intervals': 'symbols'} gives Wilson's."""
    import deepbase_duck as dbd
    from conftest import TEXTS, planted_per_record
    hyps = ("digit", "in_string")
    X, Y, R = planted_per_record(hyps)
    ref = reference("iou", X, Y, R, 0.05)
    t = dbd.inspect(planted, "planted", ["planted"], list(hyps), "snippets", measures=["iou"],
                    iou={"quantile": 0.05}, batch_size=5)
    rows = {(r["unit"], r["hypothesis"]): r for r in t.to_pylist() if r["unit"] is not None}
    checked = 0
    for (u, h), r in rows.items():
        j = hyps.index(h)
        if r["score"] is None or np.isnan(ref["lo"][u, j]):
            continue
        assert (r["score"], r["ci_low"], r["ci_high"], r["p_value"]) == pytest.approx(
            (ref["score"][u, j], ref["lo"][u, j], ref["hi"][u, j], ref["p"][u, j]), abs=1e-9)
        assert '"records": %d' % len(TEXTS) in r["detail"]
        checked += 1
    assert checked >= 4
    sym = dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", measures=["iou"],
                      iou={"quantile": 0.05, "intervals": "symbols"})
    assert all(r["detail"] is None or "records" not in r["detail"] for r in sym.to_pylist())
