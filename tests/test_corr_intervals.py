"""Record-clustered intervals of the correlation measure (inspectors/correlation.py).

Symbols of one record are dependent (a character inside a string is followed by another inside
it), so an interval that counts every symbol as an independent observation is far too narrow.
With record ids the state reports the sandwich (linearisation) interval with records as
clusters. Checked here against a direct numpy computation of the same estimator (per symbol
influence values summed per record), against a cluster bootstrap, by its coverage of a known
population correlation in simulated data with record-level effects (where the symbol-level
Fisher interval fails), and through the engine on the planted model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.inspectors.correlation import PearsonState

HYPS = [{"name": "b", "kind": "binary"}, {"name": "c", "kind": "continuous"}]


def reference(x, y, rec, confidence=0.95):
    """(r, se, lo, hi, p, records) per (unit, hypothesis) straight from the symbols: the influence
    value x~ y~ - r/2 (x~^2 + y~^2) of every labelled symbol, summed per record."""
    W, H = x.shape[1], y.shape[1]
    out = {k: np.full((W, H), np.nan) for k in ("r", "se", "lo", "hi", "p")}
    records = np.zeros(H, int)
    for h in range(H):
        m = ~np.isnan(y[:, h])
        recs, inv = np.unique(rec[m], return_inverse=True)
        G = len(recs)
        records[h] = G
        for u in range(W):
            if np.ptp(x[m, u]) == 0:
                continue                                   # a constant unit: no score
            xs, ys = x[m, u].astype(np.float64), y[m, h]
            xt, yt = (xs - xs.mean()) / xs.std(), (ys - ys.mean()) / ys.std()
            r = np.mean(xt * yt)
            infl = xt * yt - r / 2 * (xt ** 2 + yt ** 2)
            z = np.bincount(inv, weights=infl, minlength=G)
            se = np.sqrt(G / (G - 1) * np.sum(z ** 2)) / m.sum()
            q = stats.t.ppf(0.5 + confidence / 2, G - 1)
            if abs(r) > 1 - 1e-9:
                continue                                   # a perfect correlation: no spread to bound
            sez = se / (1 - r * r)
            out["r"][u, h], out["se"][u, h] = r, se
            out["lo"][u, h] = np.tanh(np.arctanh(r) - q * sez)
            out["hi"][u, h] = np.tanh(np.arctanh(r) + q * sez)
            out["p"][u, h] = 2 * stats.t.sf(abs(r) / se, G - 1)
    return out, records


def clustered_data(seed, records=60, width=5, offset=40.0):
    """Records of 5-40 symbols; unit 0 follows label b, unit 1 a record-level effect shared with
    label c, unit 2 pure noise; a large offset on every unit (cancellation risk)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 41, records)
    rec = np.repeat(np.arange(100, 100 + records), sizes)
    n = len(rec)
    effect = rng.normal(size=records)[rec - 100]
    b = rng.integers(0, 2, n).astype(np.float64)
    c = effect + rng.normal(size=n)
    x = rng.normal(size=(n, width))
    x[:, 0] += b
    x[:, 1] += 0.8 * effect
    y = np.stack([b, c], 1)
    return (x * 0.3 + offset).astype(np.float32), y, rec


def feed(x, y, rec, cuts, **kw):
    """One state fed in batches cut at record boundaries ``cuts`` (indices into the runs), each
    batch in its own state, combined."""
    starts = np.flatnonzero(np.r_[True, rec[1:] != rec[:-1]])
    bounds = [0] + [starts[c] for c in cuts] + [len(rec)]
    total = PearsonState(x.shape[1], HYPS, **kw)
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = PearsonState(x.shape[1], HYPS, **kw)
        part.update(torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b]), torch.from_numpy(rec[a:b]))
        total.combine(part)
    return total


def grid(t, col):
    rows = t.to_pylist()
    W = max(r["unit"] for r in rows) + 1
    H = len({r["hypothesis"] for r in rows})
    return np.array([np.nan if r[col] is None else r[col] for r in rows], dtype=np.float64).reshape(W, H)


@pytest.mark.parametrize("masked", [False, True])
def test_clustered_interval_equals_the_direct_computation(masked):
    x, y, rec = clustered_data(0)
    if masked:
        y[::4, 1] = np.nan                     # some symbols without a label for c
        y[rec == 101, 1] = np.nan              # and a record with none
    want, records = reference(x, y, rec)
    for cuts in ([], [1, 7, 8, 30], list(range(1, 60))):     # one batch, uneven ones, a record each
        t = feed(x, y, rec, cuts).finalize()
        assert np.allclose(grid(t, "score"), want["r"], atol=1e-12)
        assert np.allclose(grid(t, "ci_low"), want["lo"], atol=1e-9)
        assert np.allclose(grid(t, "ci_high"), want["hi"], atol=1e-9)
        assert np.allclose(grid(t, "p_value"), want["p"], rtol=1e-6, atol=1e-12)
        assert (grid(t, "records") == records[None, :]).all()
    assert records[1] == (59 if masked else 60)


def test_streamed_state_equals_one_state_whatever_the_shifts():
    """Batches whose means differ a lot (each state takes its first batch's means as its
    coordinates) combine into the intervals of a single pass."""
    x, y, rec = clustered_data(1)
    x[rec >= 130] += 25.0                                   # the second half of the records is shifted
    one = feed(x, y, rec, []).finalize()
    many = feed(x, y, rec, [3, 29, 30, 31, 50]).finalize()
    for col in ("score", "ci_low", "ci_high", "p_value"):
        assert np.allclose(grid(many, col), grid(one, col), atol=1e-10, equal_nan=True)
    want, _ = reference(x, y, rec)
    assert np.allclose(grid(one, "ci_low"), want["lo"], atol=1e-9)


def test_clustered_se_agrees_with_a_cluster_bootstrap():
    """The sandwich standard error against 2,000 resamplings of whole records (within 15%)."""
    x, y, rec = clustered_data(2, records=80)
    st = feed(x, y, rec, [10, 40])
    se, _ = st.clustered_se(st.correlations())
    rng = np.random.default_rng(0)
    ids = np.unique(rec)
    rows = {r: np.flatnonzero(rec == r) for r in ids}
    boot = []
    for _ in range(2000):
        take = np.concatenate([rows[r] for r in rng.choice(ids, len(ids))])
        xs, ys = x[take].astype(np.float64), y[take]
        xc, yc = xs - xs.mean(0), ys - ys.mean(0)
        boot.append((xc.T @ yc) / np.sqrt(np.outer((xc ** 2).sum(0), (yc ** 2).sum(0))))
    bse = np.std(boot, axis=0, ddof=1)
    assert np.allclose(se, bse, rtol=0.15)


def test_records_intervals_cover_where_symbol_intervals_do_not():
    """Data with a known population correlation and record-level dependence: 200 simulated
    corpora of 40 records. x = e_rec + noise, y = e_rec + noise (e_rec shared by a record's
    symbols), so rho = var(e) / (var(e) + var(noise)) = 0.5. Record-clustered 95% intervals
    hold rho in about 95% of corpora; Fisher intervals over symbols in far fewer."""
    rng = np.random.default_rng(3)
    hyps = [{"name": "y", "kind": "continuous"}]
    hit_rec = hit_sym = 0
    trials = 200
    for _ in range(trials):
        sizes = rng.integers(20, 80, 40)
        rec = np.repeat(np.arange(40), sizes)
        e = rng.normal(size=40)[rec]
        x = (e + rng.normal(size=len(rec)))[:, None].astype(np.float32)
        y = (e + rng.normal(size=len(rec)))[:, None]
        for intervals in ("records", "symbols"):
            st = PearsonState(1, hyps, intervals=intervals)
            st.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(rec))
            r = st.finalize().to_pylist()[0]
            inside = r["ci_low"] <= 0.5 <= r["ci_high"]
            if intervals == "records":
                hit_rec += inside
            else:
                hit_sym += inside
    assert 0.88 <= hit_rec / trials <= 0.99
    assert hit_sym / trials < 0.75


def test_without_record_ids_or_with_symbols_the_intervals_are_fisher():
    x, y, rec = clustered_data(4)
    fisher = PearsonState(x.shape[1], HYPS)
    fisher.update(torch.from_numpy(x), torch.from_numpy(y))                    # no record ids
    sym = PearsonState(x.shape[1], HYPS, intervals="symbols")
    sym.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(rec))
    for t in (fisher.finalize(), sym.finalize()):
        assert "records" not in t.column_names
        for u in range(x.shape[1]):
            ref = stats.pearsonr(x[:, u].astype(np.float64), y[:, 1])
            ci = ref.confidence_interval(0.95)
            assert grid(t, "ci_low")[u, 1] == pytest.approx(ci.low, abs=1e-9)
            assert grid(t, "p_value")[u, 1] == pytest.approx(ref.pvalue, abs=1e-9)
    # a state that met rows without record ids cannot cluster: combined, it falls back to Fisher
    clustered = feed(x, y, rec, [5])
    clustered.combine(fisher)
    assert "records" not in clustered.finalize().column_names
    with pytest.raises(DeepBaseError, match="intervals must be 'records'.*got 'rows'"):
        PearsonState(2, HYPS, intervals="rows")


def test_engine_full_scan_reports_record_clustered_intervals(planted):
    """Through dbd.inspect: the intervals equal the direct computation over a per-record forward
    pass (records as clusters), detail names the records, and corr={'intervals': 'symbols'}
    gives scipy's."""
    from conftest import TEXTS, planted_per_record
    hyps = ("digit", "bracket_depth")
    X, Y, rec = planted_per_record(hyps)
    want, records = reference(X, Y, rec)
    assert records[0] == len(TEXTS)
    t = dbd.inspect(planted, "planted", ["planted"], list(hyps), "snippets", batch_size=5)
    rows = {(r["unit"], r["hypothesis"]): r for r in t.to_pylist()}
    checked = 0
    for u in range(X.shape[1]):
        for j, h in enumerate(hyps):
            r = rows[(u, h)]
            if np.isnan(want["r"][u, j]) or r["score"] is None or abs(want["r"][u, j]) > 0.999:
                continue                               # (the planted digit unit: r = 1, no spread)
            assert r["score"] == pytest.approx(want["r"][u, j], abs=1e-5)
            assert (r["ci_low"], r["ci_high"]) == pytest.approx((want["lo"][u, j], want["hi"][u, j]), abs=1e-4)
            assert '"records": %d' % records[j] in r["detail"]
            checked += 1
    assert checked >= 4
    sym = dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", corr={"intervals": "symbols"})
    r0 = [r for r in sym.to_pylist() if r["unit"] == 0][0]
    ci = stats.pearsonr(X[:, 0].astype(np.float64), Y[:, 0]).confidence_interval(0.95)
    assert (r0["ci_low"], r0["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-5)
    assert r0["detail"] is None or "records" not in r0["detail"]


def test_pointbiserial_shares_corr_intervals_on_binary_labels():
    """pointbiserial is Pearson's r with the 0/1 label: the same score, interval and p-value as
    corr, with records as clusters and with intervals='symbols' (scipy's pointbiserialr)."""
    from deepbase_duck.inspectors.pointbiserial import PointBiserialState
    x, y, rec = clustered_data(5)
    y = y[:, :1].copy()
    y[::9, 0] = np.nan                                       # some symbols unlabelled
    hyps = [{"name": "b", "kind": "binary"}]
    for kw in ({}, {"intervals": "symbols"}):
        tables = []
        for cls in (PearsonState, PointBiserialState):
            total = cls(x.shape[1], hyps, **kw)
            for a, b in ((0, 300), (300, len(rec))):
                part = cls(x.shape[1], hyps, **kw)
                part.update(torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b]), torch.from_numpy(rec[a:b]))
                total.combine(part)
            tables.append(total.finalize())
        corr, pb = tables
        for col in ("score", "ci_low", "ci_high", "p_value"):
            assert np.allclose(grid(pb, col), grid(corr, col), atol=1e-9, equal_nan=True), (kw, col)
        if kw:
            m = ~np.isnan(y[:, 0])
            ref = stats.pointbiserialr(y[m, 0], x[m, 0].astype(np.float64))
            assert grid(pb, "p_value")[0, 0] == pytest.approx(ref.pvalue, abs=1e-9)
        else:
            assert "records" in pb.column_names


def test_a_unit_constant_on_the_labelled_symbols_has_no_score_and_a_perfect_one_a_point_interval():
    """Unit 0 varies on unlabelled symbols and is constant (0.7) on the labelled ones: its variance
    there is float64 rounding from the batches' centring, so r, interval and p are NULL (they
    came back as r ~ 1e-9, p = 0). Unit 1 equals 2 y + 1: r = 1, the interval [1, 1], p = 0
    (a rounding-sized standard error divided by 1 - r^2 gave [-1, 1])."""
    rng = np.random.default_rng(8)
    rec = np.repeat(np.arange(12), 9)
    y = rng.normal(size=(len(rec), 1))
    y[::3, 0] = np.nan                                          # a third of the symbols unlabelled
    x = np.zeros((len(rec), 2), np.float32)
    x[:, 0] = np.where(np.isnan(y[:, 0]), rng.normal(size=len(rec)) * 5 + 3, 0.7)
    x[:, 1] = np.where(np.isnan(y[:, 0]), rng.normal(size=len(rec)), 2 * np.nan_to_num(y[:, 0]) + 1)
    y1 = np.where(np.isnan(y), np.nan, (x[:, 1:].astype(np.float64) - 1) / 2)     # x = 2 y + 1 exactly
    hyps = [{"name": "c", "kind": "continuous"}]
    for intervals in ("records", "symbols"):
        st = PearsonState(2, hyps, intervals=intervals)
        for a in range(0, len(rec), 27):                          # batches of 3 records
            st.update(torch.from_numpy(x[a:a + 27]), torch.from_numpy(y1[a:a + 27]), torch.from_numpy(rec[a:a + 27]))
        rows = st.finalize().to_pylist()
        assert rows[0]["score"] is None and rows[0]["ci_low"] is None and rows[0]["p_value"] is None, rows[0]
        assert rows[1]["score"] == pytest.approx(1.0, abs=1e-12)
        assert rows[1]["ci_low"] == pytest.approx(1.0, abs=1e-9) and rows[1]["ci_high"] == pytest.approx(1.0, abs=1e-9)
        assert rows[1]["p_value"] == pytest.approx(0.0, abs=1e-12)


def test_a_first_batch_without_a_label_does_not_fix_its_shift_at_zero():
    """Labels far from 0 (1e6) whose first batch (or first merged state) has none: the label's
    shift comes from the first batch that has it, so the interval equals that of a state that
    never saw the unlabelled batch (it widened to [-1, 1] with p near 1)."""
    x, y, rec = clustered_data(7)
    y = y.copy()
    y[:, 1] += 1e6
    plain = PearsonState(x.shape[1], HYPS)
    plain.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(rec))
    want = plain.finalize()
    blank = (torch.from_numpy(x[:8] + 5), torch.full((8, 2), float("nan"), dtype=torch.float64),
             torch.full((8,), 99, dtype=torch.int64))              # a record with no label at all
    first = PearsonState(x.shape[1], HYPS)
    first.update(*blank)
    first.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(rec))
    merged = PearsonState(x.shape[1], HYPS)
    merged.update(*blank)
    rest = PearsonState(x.shape[1], HYPS)
    rest.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(rec))
    merged.combine(rest)
    for got in (first.finalize(), merged.finalize()):
        for col in ("ci_low", "ci_high"):
            np.testing.assert_allclose(got.column(col).to_numpy(zero_copy_only=False),
                                       want.column(col).to_numpy(zero_copy_only=False), rtol=1e-7, atol=1e-9)
        p = got.column("p_value").to_numpy(zero_copy_only=False)
        assert np.allclose(p, want.column("p_value").to_numpy(zero_copy_only=False), rtol=1e-5, atol=1e-300)


def test_max_error_is_inf_not_nan_over_three_symbols():
    st = PearsonState(1, [{"name": "b", "kind": "binary"}])
    st.update(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[0.0], [1.0], [1.0]]), torch.tensor([1, 1, 2]))
    assert st.max_error() == float("inf")


def test_spearman_intervals_are_corrs_on_the_ranks_with_records_as_clusters():
    """spearman's record-clustered interval and p-value equal the corr reference applied to the
    average ranks (scipy.stats.rankdata) of the labelled rows; merged states give the same;
    intervals='symbols' keeps the Bonett-Wright Fisher interval."""
    from deepbase_duck.inspectors.spearman import SpearmanState, fisher_interval_bw
    x, y, rec = clustered_data(11)
    y = y.copy()
    y[::7, 1] = np.nan                                        # some rows unlabelled for c
    ranked_y = np.full_like(y, np.nan)
    ranked_x = {}
    for h in range(y.shape[1]):
        m = ~np.isnan(y[:, h])
        ranked_y[m, h] = stats.rankdata(y[m, h])
        ranked_x[h] = np.column_stack([stats.rankdata(x[m, u]) for u in range(x.shape[1])])
    one = SpearmanState(x.shape[1], HYPS)
    one.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(rec))
    a, b = SpearmanState(x.shape[1], HYPS), SpearmanState(x.shape[1], HYPS)
    a.update(torch.from_numpy(x[:500]), torch.from_numpy(y[:500]), torch.from_numpy(rec[:500]))
    b.update(torch.from_numpy(x[500:]), torch.from_numpy(y[500:]), torch.from_numpy(rec[500:]))
    for t in (one.finalize(), a.combine(b).finalize()):
        got = {c: t.column(c).to_numpy(zero_copy_only=False).reshape(x.shape[1], -1)
               for c in ("score", "ci_low", "ci_high", "p_value", "records")}
        for h in range(y.shape[1]):
            m = ~np.isnan(y[:, h])
            want, records = reference(ranked_x[h], ranked_y[m, h:h + 1], rec[m])
            assert got["records"][0, h] == records[0]
            for col, key in (("score", "r"), ("ci_low", "lo"), ("ci_high", "hi"), ("p_value", "p")):
                np.testing.assert_allclose(got[col][:, h], want[key][:, 0], rtol=1e-9, atol=1e-12)
    sym = SpearmanState(x.shape[1], HYPS, intervals="symbols")
    sym.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(rec))
    t = sym.finalize()
    r = t.column("score").to_numpy(zero_copy_only=False).reshape(x.shape[1], -1)
    lo, _ = fisher_interval_bw(r, np.broadcast_to((~np.isnan(y)).sum(0)[None, :], r.shape), 0.95)
    np.testing.assert_allclose(t.column("ci_low").to_numpy(zero_copy_only=False).reshape(r.shape), lo, rtol=1e-12)
    assert "records" not in t.column_names
    assert stats.spearmanr(x[:, 0], y[:, 0]).statistic == pytest.approx(r[0, 0], abs=1e-12)
