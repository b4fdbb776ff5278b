"""Edge cases of the probes and the significance tests, against independent references
(scikit-learn, scipy, numpy) on data where the answer is known."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import ElasticNet, LinearRegression, LogisticRegression, Ridge
from sklearn.metrics import f1_score, log_loss

from deepbase_duck.inspectors.probes import ProbeState, test_split_mask, wilson_interval
from deepbase_duck.inspectors.significance import benjamini_hochberg, permutation_p_values

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = {"name": "b", "kind": "binary"}
CON = {"name": "r", "kind": "continuous"}


def fed(hyps, X, Y, rid, **kw):
    kw.setdefault("topk", ())
    st = ProbeState(X.shape[1], hyps, **kw)
    st.update(torch.tensor(X), torch.tensor(np.asarray(Y, dtype=np.float64).reshape(len(X), -1)),
              torch.tensor(rid))
    return st


def probe_rows(t, measure, hyp):
    return [r for r in t.to_pylist() if r["measure"] == measure and r["hypothesis"] == hyp]


def standardised(X, te):
    """The state's features: float32 activations standardised with the train split's mean and
    population sd (sd 1 for a constant unit)."""
    Xd = X.astype(np.float32).astype(np.float64)
    mu, sd = Xd[~te].mean(0), Xd[~te].std(0)
    sd[sd == 0] = 1.0
    return (Xd - mu) / sd


def collinear_units(seed=7, n=600, constant=True):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    if constant:
        X[:, 2] = 3.0                              # a constant unit
    X[:, 4] = X[:, 0] * 2                          # a unit copying another (exactly, in float32)
    X[:, 3] = X[:, 1] * 0.37 + X[:, 0] * 1.3       # a combination of others (up to rounding)
    y = X[:, 0] + X[:, 1] + rng.normal(size=n) * 0.1
    return X, y, np.arange(n)


# --------------------------------------------------------------- unpenalised least squares
@pytest.mark.parametrize("params", [{"l2": 0.0}, {"ridge_alpha": 0.0}])
@pytest.mark.parametrize("constant", [True, False])
def test_unpenalised_ridge_is_min_norm_least_squares_and_deterministic(params, constant):
    """alpha = 0 with collinear units: the weights are the minimum-norm least-squares ones
    (sklearn's LinearRegression), the same on every fit, and a constant unit's weight is 0. The
    old code solved the singular normal equations with torch.linalg.solve (huge opposite
    weights that changed with the sums' rounding) or, when that raised, torch.linalg.lstsq,
    which returned a different rank from call to call (all-zero weights, R2 ~ 0, included)."""
    X, y, rid = collinear_units(constant=constant)
    te = test_split_mask(rid, 0, 0.2)
    Z = standardised(X, te)
    ref = LinearRegression().fit(Z[~te], y[~te])
    ref_r2 = ref.score(Z[te], y[te])
    weights = []
    for _ in range(4):
        st = fed([CON], X, y, rid, **params)
        fit = st.fit()
        W = fit["fits"][0]["W"][:, 0].numpy()
        weights.append(W)
        np.testing.assert_allclose(W, ref.coef_, atol=1e-6)
        assert float(fit["fits"][0]["b"][0]) == pytest.approx(ref.intercept_ + 0.0, abs=1e-6)
        assert fit["results"][0]["score"] == pytest.approx(ref_r2, abs=1e-9)
    assert all(np.array_equal(weights[0], w) for w in weights[1:])
    if constant:
        assert weights[0][2] == 0.0
        (w2,) = [r for r in probe_rows(st.finalize(), "probe_weight", "r") if r["unit"] == 2]
        assert w2["score"] == 0.0 and w2["rank"] == 5


def test_unpenalised_ridge_full_rank_matches_linear_regression():
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(500, 6)) * rng.uniform(0.5, 4, 6) + 10).astype(np.float32)
    y = X @ rng.normal(size=6) + rng.normal(size=500)
    rid = np.repeat(np.arange(100), 5)
    te = test_split_mask(rid, 0, 0.2)
    Z = standardised(X, te)
    ref = LinearRegression().fit(Z[~te], y[~te])
    st = fed([CON], X, y, rid, l2=0.0)
    np.testing.assert_allclose(st.fit()["fits"][0]["W"][:, 0].numpy(), ref.coef_, rtol=1e-9, atol=1e-9)
    (r,) = probe_rows(st.finalize(), "probe", "r")
    assert r["score"] == pytest.approx(ref.score(Z[te], y[te]), abs=1e-12)


# ------------------------------------------------------------------- elastic net, ridge_alpha
@pytest.mark.parametrize("ridge_alpha", [None, 100.0])
def test_elastic_net_head_uses_ridge_alpha_as_the_ridge_head_does(ridge_alpha):
    """With l1 > 0 a continuous head is sklearn's ElasticNet with the L2 part the ridge head's:
    lam = ridge_alpha / n_h (or l2). The old code ignored ridge_alpha there (lam = l2 always),
    so l1 = 1e-9 gave a different probe from l1 = 0 (Ridge(ridge_alpha))."""
    rng = np.random.default_rng(4)
    n = 800
    X = rng.normal(size=(n, 6)).astype(np.float32)
    y = X[:, 0] - 2 * X[:, 3] + rng.normal(size=n)
    rid = np.repeat(np.arange(n // 4), 4)
    te = test_split_mask(rid, 0, 0.2)
    Z = standardised(X, te)
    l1, l2 = 0.05, 0.01
    lam = l2 if ridge_alpha is None else ridge_alpha / int((~te).sum())
    ref = ElasticNet(alpha=l1 + lam, l1_ratio=l1 / (l1 + lam), tol=1e-12, max_iter=100_000).fit(Z[~te], y[~te])
    st = fed([CON], X, y, rid, l1=l1, l2=l2, ridge_alpha=ridge_alpha, max_epochs=5000, tol=1e-12, patience=20)
    np.testing.assert_allclose(st.fit()["fits"][0]["W"][:, 0].numpy(), ref.coef_, atol=1e-5)
    (r,) = probe_rows(st.finalize(), "probe", "r")
    assert r["score"] == pytest.approx(ref.score(Z[te], y[te]), abs=1e-6)
    if ridge_alpha is not None:   # l1 -> 0 reaches the closed-form ridge head with the same alpha
        tiny = fed([CON], X, y, rid, l1=1e-9, l2=l2, ridge_alpha=ridge_alpha, max_epochs=5000, tol=1e-12,
                   patience=20)
        ridge = Ridge(alpha=ridge_alpha).fit(Z[~te], y[~te])
        np.testing.assert_allclose(tiny.fit()["fits"][0]["W"][:, 0].numpy(), ridge.coef_, atol=1e-5)


# ------------------------------------------------------------------------- held-out loss
def test_heldout_loss_of_an_untrained_continuous_head_is_nan():
    """A continuous hypothesis labelled only in test records so far trains no probe (score
    NULL); its held-out loss is NaN, so a plateau check cannot count it as flat. The old code
    scored the untrained head's constant 0 prediction: a finite loss, the same at every check
    (improvement 0 < plateau_tol), as if that probe had converged."""
    rng = np.random.default_rng(12)
    n = 400
    rid = np.repeat(np.arange(n // 4), 4)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    te = test_split_mask(rid, 0, 0.2)
    yb = (X[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(float)
    yr = np.where(te, X[:, 1] * 3 + 5, np.nan)
    st = fed([BIN, CON], X, np.stack([yb, yr], 1), rid)
    model = st.probe_model()
    loss = st.heldout_loss(model)
    assert math.isnan(loss["r"])
    assert math.isfinite(st.constant_loss()["r"])          # there are labelled test rows
    assert probe_rows(st.finalize(), "probe", "r")[0]["score"] is None
    # the trained binary head's loss is sklearn's log loss of its probabilities
    Z = standardised(X, te)
    W, b = model["fits"][0]["W"].numpy(), model["fits"][0]["b"].numpy()
    logit = Z[te] @ (W[:, 1] - W[:, 0]) + (b[1] - b[0])
    assert loss["b"] == pytest.approx(log_loss(yb[te], 1 / (1 + np.exp(-logit)), labels=[0, 1]), rel=1e-9)
    assert st.constant_loss()["b"] == pytest.approx(stats.entropy(np.bincount(yb[te].astype(int))), rel=1e-12)


# -------------------------------------------------- checked and found correct (guards)
def test_probe_matches_sklearn_with_nan_labels_imbalance_and_offsets():
    rng = np.random.default_rng(1)
    n, w = 2000, 8
    rid = np.repeat(np.arange(n // 5), 5)
    X = (rng.normal(size=(n, w)) * rng.uniform(0.1, 5, w) + rng.normal(size=w) * 1e4).astype(np.float32)
    te = test_split_mask(rid, 0, 0.2)
    Z = standardised(X, te)
    yb = (Z @ rng.normal(size=w) + rng.normal(size=n) > 1.5).astype(float)        # imbalanced
    yb[rng.random(n) < 0.1] = np.nan                                             # unlabelled rows
    yc = np.argmax(Z @ rng.normal(size=(w, 6)) + rng.gumbel(size=(n, 6)), 1).astype(float)
    cat = {"name": "c", "kind": "categorical", "categories": list("abcdef")}
    l2 = 1e-2
    st = fed([BIN, cat], X, np.stack([yb, yc], 1), rid, l2=l2)
    t = st.finalize()
    for j, (name, two) in enumerate((("b", True), ("c", False))):
        y = np.stack([yb, yc], 1)[:, j]
        tr, tt = ~te & ~np.isnan(y), te & ~np.isnan(y)
        C = (2.0 if two else 1.0) / (tr.sum() * l2)
        sk = LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(Z[tr], y[tr])
        (r,) = probe_rows(t, "probe", name)
        assert r["n_train"] == tr.sum() and r["n_test"] == tt.sum()
        assert r["score"] == pytest.approx(sk.score(Z[tt], y[tt]), abs=2.0 / tt.sum())
        assert r["macro_f1"] == pytest.approx(f1_score(y[tt], sk.predict(Z[tt]), average="macro"), abs=0.01)
        ci = stats.binomtest(round(r["score"] * r["n_test"]), r["n_test"]).proportion_ci(0.95, "wilson")
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_probe_topk_equals_sklearn_refit_on_the_ranked_units_and_merge_order():
    rng = np.random.default_rng(5)
    n, w = 1500, 10
    rid = np.repeat(np.arange(n // 5), 5)
    X = (rng.normal(size=(n, w)) * rng.uniform(0.5, 3, w)).astype(np.float32)
    te = test_split_mask(rid, 0, 0.2)
    Z = standardised(X, te)
    yb = (Z @ rng.normal(size=w) + rng.normal(size=n) > 0).astype(float)
    l2 = 3e-2
    st = fed([BIN], X, yb, rid, l2=l2, topk=(2, 4, w))
    t = st.finalize()
    ranks = {r["unit"]: r["rank"] for r in probe_rows(t, "probe_weight", "b")}
    W = st.fit()["fits"][0]["W"].numpy()
    mass = np.abs(W).mean(1) / np.abs(W).sum(0).mean()
    assert sorted(ranks, key=ranks.get) == list(np.argsort(-mass, kind="stable"))
    order = sorted(ranks, key=ranks.get)
    for k in (2, 4, w):
        cols = order[:k]
        sk = LogisticRegression(C=2 / ((~te).sum() * l2), max_iter=10_000, tol=1e-10).fit(Z[~te][:, cols], yb[~te])
        (r,) = [x for x in probe_rows(t, "probe_topk", "b") if x["k"] == k]
        assert r["score"] == pytest.approx(sk.score(Z[te][:, cols], yb[te]), abs=1.5 / te.sum())
    # the same rows in another order, over merged states: the same table
    perm = rng.permutation(n)
    parts = [fed([BIN], X[p], yb[p], rid[p], l2=l2, topk=(2, 4, w)) for p in np.array_split(perm, 4)]
    merged = parts[2].combine(parts[0]).combine(parts[3]).combine(parts[1])
    assert merged.finalize().to_pylist() == t.to_pylist()


def test_wilson_and_benjamini_hochberg_match_scipy():
    for n in (1, 2, 7, 50, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for conf in (0.9, 0.95, 0.99):
                ci = stats.binomtest(k, n).proportion_ci(conf, method="wilson")
                assert wilson_interval(k, n, conf) == pytest.approx((ci.low, ci.high), abs=1e-12)
    rng = np.random.default_rng(0)
    for trial in range(50):
        p = np.round(rng.random(rng.integers(1, 30)) ** 3, 2 if trial % 2 else 12)    # ties too
        np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)
    p = np.array([[np.nan, 0.01], [0.04, 0.03]])
    q = benjamini_hochberg(p)
    assert np.isnan(q[0, 0])
    np.testing.assert_allclose(q[~np.isnan(p)], stats.false_discovery_control([0.01, 0.04, 0.03]))


def test_permutation_p_values_approach_the_exact_permutation_test():
    x = np.array([[0.1], [0.5], [0.2], [0.9], [0.7], [0.3], [1.2]])
    y = np.array([0, 1, 0, 1, 1, 0, 1.0])

    def corr(a, lab):
        return np.array([np.corrcoef(a[:, 0], np.ravel(lab))[0, 1]])

    obs = corr(x, y)[0]
    vals = np.array([corr(x, y[list(p)])[0] for p in itertools.permutations(range(7))])
    exact = {"two-sided": np.mean(np.abs(vals) >= abs(obs) - 1e-12), "greater": np.mean(vals >= obs - 1e-12),
             "less": np.mean(vals <= obs + 1e-12)}
    for alt, want in exact.items():
        got = permutation_p_values(x, y, corr, 4000, seed=1, alternative=alt)[0]
        assert got == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / 4000) + 1e-3)
