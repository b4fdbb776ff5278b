"""mi intervals and p-values with records as clusters (intervals='records', the default): the
delete-a-group jackknife and the second-order Rao-Scott test, against a direct computation
(sklearn's mutual_info_score per left-out group, the residual covariance's eigenvalues), exact
under any batching and merging, and calibrated on simulated records: coverage of a population
MI and the false-positive rate under independence, where the symbol-level ones fail."""
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import mutual_info_score

from deepbase_duck.errors import DeepBaseError
from deepbase_duck.inspectors import measure_class
from deepbase_duck.inspectors.mutual_information import plugin_mi, record_groups

HB = [{"name": "y", "kind": "binary"}]
HC = [{"name": "c", "kind": "categorical", "categories": ["a", "b", "c", "d"]}, {"name": "y", "kind": "binary"}]


pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(seed, R=120, W=5, effect=1.0):
    """Records of 5-40 symbols; units with a record effect shared with the labels (unit 0
    strongly, the others less), a categorical label with a record-level class mix, a binary one
    with NaN on some symbols; record ids not in order."""
    rng = np.random.default_rng(seed)
    m = rng.integers(5, 41, R)
    s = rng.normal(size=R)
    rec_of = np.repeat(rng.permutation(10_000)[:R] + 7, m)
    S = np.repeat(s, m)
    n = int(m.sum())
    x = (np.repeat(rng.normal(size=(R, W)), m, 0) + rng.normal(size=(n, W))
         + effect * S[:, None] * np.r_[3.0, np.linspace(0.5, 0.1, W - 1)][None, :])
    cat = np.clip(np.floor(S + rng.normal(size=n) * 0.7 + 2), 0, 3)
    yb = (rng.random(n) < 1 / (1 + np.exp(-1.5 * S))).astype(float)
    yb[rng.random(n) < 0.1] = np.nan
    return x.astype(np.float32), np.stack([cat, yb], 1), rec_of


def feed(st, x, y, rec, bounds):
    for a, b in zip(bounds[:-1], bounds[1:]):
        st.update(torch.as_tensor(x[a:b]), torch.as_tensor(y[a:b]), torch.as_tensor(rec[a:b]))
    return st


def col(t, name):
    return np.array([np.nan if v is None else v for v in t.column(name).to_pylist()], dtype=float)


def groups_ref(rec, G):
    """The group rule written again in plain Python integers."""
    return np.array([(((int(r) * 0x9E3779B1) % 2 ** 32) * G) >> 32 for r in rec])


def test_groups_follow_records_not_batches():
    rec = np.arange(0, 5000, 3)
    g = record_groups(torch.as_tensor(rec), 20).numpy()
    assert np.array_equal(g, groups_ref(rec, 20))
    counts = np.bincount(g, minlength=20)
    assert counts.min() > 0.6 * counts.mean()                  # consecutive ids spread over the groups


def test_jackknife_and_rao_scott_match_a_direct_computation():
    x, y, rec = clustered(0)
    G = 20
    st = feed(measure_class("mi")(x.shape[1], HC, bins=6, calibration_rows=700), x, y, rec,
              [0, 333, 1200, len(x)])
    t = st.finalize()
    edges = st.bin_edges()
    conf = 0.95
    grp = groups_ref(rec, G)
    H = len(HC)
    score, lo, hi, p = (col(t, k).reshape(-1, H) for k in ("score", "ci_low", "ci_high", "p_value"))
    mm = col(t, "mi_miller_madow").reshape(-1, H)
    jg = np.array(t.column("jackknife_groups").to_pylist()).reshape(-1, H)
    for w in range(x.shape[1]):
        b = np.searchsorted(edges[w], x[:, w].astype(np.float64), side="right")
        for h in range(H):
            keep = ~np.isnan(y[:, h])
            lab = (y[keep, h] != 0).astype(int) if HC[h]["kind"] == "binary" else y[keep, h].astype(int)
            bb, gg = b[keep], grp[keep]
            full = mutual_info_score(lab, bb)
            assert abs(score[w, h] - full) < 1e-9
            present = np.unique(gg)
            assert jg[w, h] == len(present)
            loo = np.array([mutual_info_score(lab[gg != k], bb[gg != k]) for k in present])
            k = len(present)
            sd = np.sqrt((k - 1) / k * ((loo - loo.mean()) ** 2).sum())
            q = stats.t.ppf(0.5 + conf / 2, k - 1)
            bias = full - mm[w, h]
            assert abs(hi[w, h] - (full + q * sd)) < 1e-9
            assert abs(lo[w, h] - max(0.0, full - bias - q * sd)) < 1e-9
            # Rao-Scott, second order: moments of the eigenvalues of n Cov(residuals) over the
            # replicates (unbiased for a Wishart covariance), Pearson's X^2 from scipy
            bins_all, cls_all = np.arange(6), np.unique(lab)

            def resid(mask):
                tab = np.array([[np.sum((bb[mask] == i) & (lab[mask] == j)) for j in cls_all]
                                for i in bins_all], dtype=float)
                P = tab / tab.sum()
                E = np.outer(P.sum(1), P.sum(0))
                return np.where(E > 0, (P - E) / np.sqrt(np.where(E > 0, E, 1)), 0).ravel()

            reps = np.array([resid(gg != k_) for k_ in present])
            cov = (k - 1) / k * (reps - reps.mean(0)).T @ (reps - reps.mean(0))
            lam = np.linalg.eigvalsh(keep.sum() * cov)
            v = k - 1
            t2 = v * (v * (lam ** 2).sum() - lam.sum() ** 2) / ((v - 1) * (v + 2))
            t1sq = lam.sum() ** 2 - 2 * t2 / v
            df = (len(np.unique(bb)) - 1) * (len(cls_all) - 1)
            d = min(max(t1sq / t2, 1), df) if t2 > 0 else df
            x2 = stats.chi2_contingency(stats.contingency.crosstab(lab, bb).count, correction=False).statistic
            ref_p = stats.f.sf(x2 / lam.sum(), d, d * v)
            assert abs(p[w, h] - ref_p) < 1e-7 * max(1.0, ref_p)
    assert np.nanargmax(score[:, 1]) == 0                       # the planted unit


def test_exact_under_batching_merging_and_record_order():
    x, y, rec = clustered(1)
    kw = dict(bins=5, edges=np.tile([-1.0, -0.3, 0.3, 1.0], (x.shape[1], 1)))
    one = feed(measure_class("mi")(x.shape[1], HC, **kw), x, y, rec, [0, len(x)]).finalize()
    cuts = [0, 17, 18, 500, 1234, len(x)]                       # records cut across batches
    parts = [feed(measure_class("mi")(x.shape[1], HC, **kw), x[a:b], y[a:b], rec[a:b], [0, b - a])
             for a, b in zip(cuts[:-1], cuts[1:])]
    merged = parts[3]
    for other in (parts[0], parts[4], parts[2], parts[1]):
        merged = merged.combine(other)
    perm = np.random.default_rng(5).permutation(len(x))          # rows in any order
    shuffled = feed(measure_class("mi")(x.shape[1], HC, **kw), x[perm], y[perm], rec[perm],
                    [0, 999, len(x)]).finalize()
    for t in (merged.finalize(), shuffled):
        for c in ("score", "ci_low", "ci_high", "p_value", "n"):
            np.testing.assert_allclose(col(t, c), col(one, c), rtol=1e-11, atol=1e-13)


def test_symbol_intervals_without_record_ids_and_by_request():
    x, y, rec = clustered(2)
    kw = dict(bins=5, calibration_rows=500)
    sym = feed(measure_class("mi")(x.shape[1], HC, intervals="symbols", **kw), x, y, rec, [0, 900, len(x)])
    bare = measure_class("mi")(x.shape[1], HC, **kw)
    for a, b in ((0, 900), (900, len(x))):
        bare.update(torch.as_tensor(x[a:b]), torch.as_tensor(y[a:b]))
    ts, tb = sym.finalize(), bare.finalize()
    assert "jackknife_groups" not in ts.column_names and "jackknife_groups" not in tb.column_names
    for c in ("score", "ci_low", "ci_high", "p_value"):
        np.testing.assert_allclose(col(tb, c), col(ts, c), rtol=1e-12)
    # the symbol p-value is Pearson's chi-square test
    e = sym.bin_edges()
    b = np.searchsorted(e[0], x[:, 0].astype(np.float64), side="right")
    keep = ~np.isnan(y[:, 1])
    g = stats.chi2_contingency(stats.contingency.crosstab(y[keep, 1], b[keep]).count, correction=False)
    assert abs(col(ts, "p_value").reshape(-1, 2)[0, 1] - g.pvalue) < 1e-9
    # a state fed with records, then a batch without: symbol intervals for the whole state
    mixed = feed(measure_class("mi")(x.shape[1], HC, **kw), x[:900], y[:900], rec[:900], [0, 900])
    mixed.update(torch.as_tensor(x[900:]), torch.as_tensor(y[900:]))
    np.testing.assert_allclose(col(mixed.finalize(), "ci_high"), col(ts, "ci_high"), rtol=1e-12)


def test_few_groups_give_null_intervals():
    x, y, rec = clustered(3, R=2)
    t = feed(measure_class("mi")(x.shape[1], HB, bins=3, calibration_rows=20), x, y[:, 1:], rec,
             [0, len(x)]).finalize()
    assert not np.isnan(col(t, "score")).all()
    assert np.isnan(col(t, "ci_low")).all() and np.isnan(col(t, "p_value")).all()
    assert set(t.column("jackknife_groups").to_pylist()) <= {1, 2}


def test_bad_parameters_are_named():
    with pytest.raises(DeepBaseError, match="intervals"):
        measure_class("mi")(3, HB, intervals="record")
    with pytest.raises(DeepBaseError, match="jackknife_groups"):
        measure_class("mi")(3, HB, jackknife_groups=2)
    a = measure_class("mi")(3, HB, jackknife_groups=10)
    with pytest.raises(DeepBaseError, match="jackknife_groups"):
        a.combine(measure_class("mi")(3, HB))


def null_records(seed, R=150, m=30, W=40, bins=8):
    """Independent units and labels, each clustered by record (unit ICC 0.5, label ICC 1/3)."""
    rng = np.random.default_rng(seed)
    x = (np.repeat(rng.normal(size=(R, W)), m, 0) + rng.normal(size=(R * m, W))).astype(np.float32)
    y = (rng.random(R * m) < np.repeat(rng.beta(1, 1, R), m)).astype(float)[:, None]
    rec = np.repeat(np.arange(R), m)
    e = np.tile(np.quantile(x, np.arange(1, bins) / bins), (W, 1))
    return x, y, rec, e


def test_false_positives_under_independence():
    rates = {"records": [], "symbols": []}
    for seed in range(6):
        x, y, rec, e = null_records(seed)
        for iv in rates:
            t = feed(measure_class("mi")(x.shape[1], HB, bins=8, edges=e, intervals=iv), x, y, rec,
                     [0, 2000, len(x)]).finalize()
            rates[iv].append((col(t, "p_value") < 0.05).mean())
    assert np.mean(rates["records"]) < 0.08                      # measured 0.04
    assert np.mean(rates["symbols"]) > 0.2                       # measured 0.33


def test_coverage_of_a_population_mi():
    def draw(rng, R, m, W):
        s = rng.normal(size=R)
        y = (rng.random(R * m) < np.repeat(1 / (1 + np.exp(-1.5 * s)), m)).astype(float)[:, None]
        x = (np.repeat(s, m)[:, None] + np.repeat(rng.normal(size=(R, W)), m, 0)
             + rng.normal(size=(R * m, W))).astype(np.float32)
        return x, y, np.repeat(np.arange(R), m)

    bx, by, _ = draw(np.random.default_rng(99), 100_000, 30, 1)         # the population, 3M rows
    e1 = np.quantile(bx[:, 0], np.arange(1, 8) / 8)
    b = np.searchsorted(e1, bx[:, 0].astype(np.float64), side="right")
    table = np.zeros((8, 2))
    np.add.at(table, (b, by[:, 0].astype(int)), 1)
    true = float(plugin_mi(table))
    W = 40
    cover = {"records": [], "symbols": []}
    for rep in range(10):
        x, y, rec = draw(np.random.default_rng(1000 + rep), 150, 30, W)
        for iv in cover:
            t = feed(measure_class("mi")(W, HB, bins=8, edges=np.tile(e1, (W, 1)), intervals=iv),
                     x, y, rec, [0, len(x)]).finalize()
            cover[iv].append(((col(t, "ci_low") <= true) & (true <= col(t, "ci_high"))).mean())
    assert np.mean(cover["records"]) > 0.9                       # measured 0.95
    assert np.mean(cover["symbols"]) < 0.8                       # measured 0.65


def test_p_values_hold_on_sparse_tables_and_keep_their_power():
    """Pearson's X^2 (not the G-test 2 n MI, whose chi-square approximation fails on sparse
    tables: 88% of these independent units fell below 0.05); records of independent symbols
    keep the power of the symbol-level test."""
    rng = np.random.default_rng(6)
    K = 60
    HK = [{"name": "c", "kind": "categorical", "categories": [str(i) for i in range(K)]}]
    rates = {"records": [], "symbols": []}
    for trial in range(8):
        x = rng.normal(size=(1000, 20))
        y = rng.integers(0, K, 1000).astype(float)[:, None]
        for iv in rates:
            t = feed(measure_class("mi")(20, HK, intervals=iv), x, y, np.arange(1000) // 5, [0, 1000]).finalize()
            rates[iv].append(col(t, "p_value"))
    for iv, ps in rates.items():
        assert np.mean(np.concatenate(ps) < 0.05) < 0.1, iv          # measured 0.03 and 0.05
    K = 17
    HK = [{"name": "c", "kind": "categorical", "categories": [str(i) for i in range(K)]}]
    found = {"records": [], "symbols": []}
    for trial in range(10):
        y = rng.integers(0, K, 2000).astype(float)
        x = rng.normal(size=(2000, 5)) + 0.3 * (y[:, None] % 3)
        for iv in found:
            t = feed(measure_class("mi")(5, HK, intervals=iv), x, y[:, None], np.arange(2000) // 5,
                     [0, 2000]).finalize()
            found[iv].append(col(t, "p_value") < 0.05)
    assert np.mean(found["records"]) >= 0.9 * np.mean(found["symbols"]) > 0.5


def test_interval_holds_the_score_and_bad_values_give_null():
    y = np.tile([0.0, 1.0], 500)[:, None]
    x = np.concatenate([y, np.random.default_rng(0).normal(size=(1000, 1))], 1)
    x[7, 1] = np.nan                                                # unit 1: one NaN activation
    for iv in ("records", "symbols"):
        st = feed(measure_class("mi")(2, HB, bins=2, calibration_rows=10, intervals=iv), x, y,
                  np.arange(1000) // 10, [0, 400, 1000])
        t = st.finalize()
        s, lo, hi = col(t, "score"), col(t, "ci_low"), col(t, "ci_high")
        assert abs(s[0] - np.log(2)) < 1e-12                      # unit 0 copies a balanced label
        assert lo[0] <= s[0] <= hi[0]                             # Miller-Madow's bias is negative here
        assert st.max_error() >= 0
        assert np.isnan(s[1]) and np.isnan(lo[1]) and np.isnan(col(t, "p_value")[1])
    with pytest.raises(DeepBaseError, match="edges must be finite"):
        measure_class("mi")(1, HB, bins=3, edges=[[0.0, np.nan]])
