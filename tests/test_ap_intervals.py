"""ap intervals with records as clusters (intervals='records', the default): AP's linearised
variance against a finite-difference derivative of a weighted AP written from its definition,
the scores still sklearn's, invariant to batching and merging, and coverage of a population AP
on simulated records where Boyd et al.'s binomial interval over the positives fails."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from deepbase_duck.errors import DeepBaseError
from deepbase_duck.inspectors import measure_class
from deepbase_duck.inspectors.dissection import wilson_effective

HB = [{"name": "y", "kind": "binary"}, {"name": "z", "kind": "binary"}]
pytestmark = pytest.mark.usefixtures("one_thread")


def records(seed, R=25, W=3):
    rng = np.random.default_rng(seed)
    m = rng.integers(3, 15, R)
    rec = np.repeat(np.arange(R) * 3 + 1, m)
    s = np.repeat(rng.normal(size=R), m)
    n = len(rec)
    y = (rng.random(n) < 1 / (1 + np.exp(-2 * s))).astype(float)
    z = (rng.random(n) < 0.3).astype(float)
    z[rng.random(n) < 0.2] = np.nan
    x = np.round(s[:, None] * np.array([1.0, 0.3, 0.0])[:W] + rng.normal(size=(n, W)), 1)   # ties
    return x.astype(np.float32), np.stack([y, z], 1), rec


def weighted_ap(x, y, w):
    """AP from its definition with row weights: the mean over positives j (weighted) of
    precision at threshold x_j, N+(x_j) / N(x_j), N counting the weights of rows >= x_j."""
    tot = 0.0
    for j in np.flatnonzero(y):
        ge = x >= x[j]
        tot += w[j] * (w * y * ge).sum() / (w * ge).sum()
    return tot / (w * y).sum()


def feed(st, x, y, rec, cuts):
    for a, b in zip(cuts[:-1], cuts[1:]):
        st.update(torch.as_tensor(x[a:b]), torch.as_tensor(y[a:b]), torch.as_tensor(rec[a:b]))
    return st


def col(t, name, H=2):
    return np.array([np.nan if v is None else v for v in t.column(name).to_pylist()], float).reshape(-1, H)


def test_linearised_variance_matches_a_finite_difference_derivative():
    x, y, rec = records(0)
    st = feed(measure_class("ap")(x.shape[1], HB), x, y, rec, [0, 50, len(x)])
    ap, npos, nval, se, G = st._compute(with_se=True)
    t = st.finalize()
    for h in range(2):
        keep = ~np.isnan(y[:, h])
        xs, ys, rs = x[keep].astype(np.float64), y[keep, h], rec[keep]
        n = len(ys)
        assert G[h] == len(np.unique(rs))
        for w in range(x.shape[1]):
            assert abs(ap[w, h] - average_precision_score(ys, xs[:, w])) < 1e-12
            eps = 1e-6
            d = np.array([(weighted_ap(xs[:, w], ys, 1 + eps * (np.arange(n) == i))
                           - weighted_ap(xs[:, w], ys, 1 - eps * (np.arange(n) == i))) / (2 * eps) for i in range(n)])
            assert abs(d.sum()) < 1e-6                            # scale-free: the derivatives sum to 0
            zr = np.array([d[rs == r].sum() for r in np.unique(rs)])
            ref = np.sqrt(G[h] / (G[h] - 1) * (zr ** 2).sum())
            assert abs(se[w, h] - ref) < 1e-6 * ref
    lo, hi = wilson_effective(ap, se, np.broadcast_to(npos, ap.shape), np.broadcast_to(G, ap.shape), 0.95)
    np.testing.assert_allclose(col(t, "ci_low"), np.fmin(lo, ap), rtol=1e-12)
    np.testing.assert_allclose(col(t, "ci_high"), np.fmax(hi, ap), rtol=1e-12)
    assert t.column("records").to_pylist()[:2] == list(G)


def test_batching_merging_and_the_symbol_interval():
    x, y, rec = records(1)
    one = feed(measure_class("ap")(3, HB), x, y, rec, [0, len(x)]).finalize()
    a = feed(measure_class("ap")(3, HB), x[:97], y[:97], rec[:97], [0, 40, 97])
    b = feed(measure_class("ap")(3, HB), x[97:], y[97:], rec[97:], [0, len(x) - 97])
    merged = b.combine(a).finalize()
    for c in ("score", "ci_low", "ci_high"):
        np.testing.assert_allclose(col(merged, c), col(one, c), rtol=1e-12)
    sym = feed(measure_class("ap")(3, HB, intervals="symbols"), x, y, rec, [0, len(x)]).finalize()
    bare = measure_class("ap")(3, HB)
    bare.update(torch.as_tensor(x), torch.as_tensor(y))
    for c in ("score", "ci_low", "ci_high"):
        np.testing.assert_allclose(col(bare.finalize(), c), col(sym, c), rtol=1e-12)
    np.testing.assert_allclose(col(sym, "score"), col(one, "score"), rtol=1e-12)
    assert "records" not in sym.column_names
    # two records: no clustered interval
    two = feed(measure_class("ap")(3, HB), x, y, np.where(rec < 40, 0, 1), [0, len(x)]).finalize()
    assert np.isnan(col(two, "ci_low")).all() and not np.isnan(col(two, "score")).all()
    with pytest.raises(DeepBaseError, match="intervals"):
        measure_class("ap")(3, HB, intervals="rec")


def test_coverage_of_a_population_ap():
    def draw(rng, R, m, W):
        s = rng.normal(size=R)
        y = (rng.random(R * m) < np.repeat(1 / (1 + np.exp(-1.5 * s - 1.5)), m)).astype(float)
        x = np.repeat(s, m)[:, None] + np.repeat(rng.normal(size=(R, W)), m, 0) + rng.normal(size=(R * m, W))
        return x.astype(np.float32), y[:, None], np.repeat(np.arange(R), m)

    bx, by, _ = draw(np.random.default_rng(99), 50_000, 20, 1)
    true = average_precision_score(by[:, 0], bx[:, 0])
    W = 30
    cover = {"records": [], "symbols": []}
    for rep in range(12):
        x, y, rec = draw(np.random.default_rng(1000 + rep), 120, 20, W)
        for iv in cover:
            t = feed(measure_class("ap")(W, HB[:1], intervals=iv), x, y, rec, [0, len(x)]).finalize()
            lo, hi = col(t, "ci_low", 1), col(t, "ci_high", 1)
            cover[iv].append(((lo <= true) & (true <= hi)).mean())
    assert np.mean(cover["records"]) > 0.9                       # measured 0.96
    assert np.mean(cover["symbols"]) < 0.8                       # measured 0.61
