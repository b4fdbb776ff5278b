"""Tests for the group-level inspectors: linear probes (with neuron rankings, top-k, control tasks)
and linear CKA."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from deepbase_duck.errors import DeepBaseError
from deepbase_duck.inspectors import MEASURES, SCORE_SCHEMA
from deepbase_duck.inspectors.cka import LinearCKAState, linear_cka
from deepbase_duck.inspectors.probes import (
    ProbeState,
    control_labels,
    selectivity,
    splitmix64,
    test_split_mask,
)

BIN = {"name": "bin", "kind": "binary"}
CAT = {"name": "cat", "kind": "categorical", "categories": ["a", "b", "c", "d"]}
CON = {"name": "con", "kind": "continuous"}


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n_records=500, rows_per=6, width=20, seed=0):
    """Activations with records; planted binary, 4-class and continuous labels."""
    rng = np.random.default_rng(seed)
    n = n_records * rows_per
    rid = np.repeat(np.arange(1000, 1000 + n_records), rows_per).astype(np.int64)
    X = rng.normal(size=(n, width)) * rng.uniform(0.5, 3.0, width) + rng.normal(size=width)
    Z = (X - X.mean(0)) / X.std(0)
    wb = rng.normal(size=width)
    yb = (Z @ wb + rng.normal(scale=1.5, size=n) > 0).astype(float)
    Wc = rng.normal(size=(width, 4))
    yc = np.argmax(Z @ Wc + rng.gumbel(size=(n, 4)) * 1.5, 1).astype(float)
    yr = Z @ rng.normal(size=width) + rng.normal(scale=2.0, size=n)
    return X, rid, np.stack([yb, yc, yr], 1)


def feed(state, X, Y, rid, batches=1):
    idx = np.array_split(np.arange(len(X)), batches)
    for ix in idx:
        state.update(torch.tensor(X[ix], dtype=torch.float32), torch.tensor(Y[ix], dtype=torch.float64),
                     torch.tensor(rid[ix]))
    return state


def split_xy(X, y, rid, seed=0, frac=0.2):
    """The probe's split, standardised with train statistics (as the state does)."""
    X = X.astype(np.float32).astype(np.float64)
    te = test_split_mask(rid, seed, frac)
    sc = StandardScaler().fit(X[~te])
    return sc.transform(X[~te]), y[~te], sc.transform(X[te]), y[te]


def rows(table, measure, hyp=None):
    d = table.to_pylist()
    return [r for r in d if r["measure"] == measure and (hyp is None or r["hypothesis"] == hyp)]


def one(table, measure, hyp):
    (r,) = rows(table, measure, hyp)
    return r


def sk_logreg_acc(Xtr, ytr, Xte, yte, l2):
    ok_tr, ok_te = ~np.isnan(ytr), ~np.isnan(yte)
    C = 1.0 / (ok_tr.sum() * l2)
    m = LogisticRegression(C=C, solver="lbfgs", max_iter=5000).fit(Xtr[ok_tr], ytr[ok_tr])
    return m.score(Xte[ok_te], yte[ok_te])


def sk_ridge_r2(Xtr, ytr, Xte, yte, alpha):
    ok_tr, ok_te = ~np.isnan(ytr), ~np.isnan(yte)
    m = Ridge(alpha=alpha).fit(Xtr[ok_tr], ytr[ok_tr])
    return m.score(Xte[ok_te], yte[ok_te])


# ------------------------------------------------------------------------- hashing, split
def test_splitmix64_reference_values():
    # Vigna's splitmix64 generator seeded with 0: the outputs are splitmix64(k * golden) for k = 0, 1
    g = 0x9E3779B97F4A7C15
    assert int(splitmix64(0)[0]) == 0xE220A8397B1DCDAF
    assert int(splitmix64(np.array([g], dtype=np.uint64))[0]) == 0x6E789E6AA1B965F4


def test_split_is_by_record_and_near_fraction():
    rid = np.repeat(np.arange(20000), 3)
    te = test_split_mask(rid, seed=3, test_fraction=0.2)
    assert (te.reshape(-1, 3).min(1) == te.reshape(-1, 3).max(1)).all()
    assert abs(te[::3].mean() - 0.2) < 0.015
    assert not np.array_equal(te, test_split_mask(rid, seed=4, test_fraction=0.2))


def test_registered_and_schema():
    assert MEASURES["probe"] is ProbeState
    X, rid, Y = planted(n_records=150, width=8)
    t = feed(ProbeState(8, [BIN, CAT, CON], topk=(1, 4)), X, Y, rid).finalize()
    assert t.schema.names[:len(SCORE_SCHEMA)] == SCORE_SCHEMA.names
    for f in SCORE_SCHEMA:
        assert t.schema.field(f.name).type == f.type
    assert {"metric", "macro_f1", "majority", "n_train", "n_test", "rank", "k"} <= set(t.schema.names)
    assert len(rows(t, "probe")) == 3 and len(rows(t, "probe_weight")) == 3 * 8
    assert len(rows(t, "probe_topk")) == 3 * 2
    assert all(r["unit"] is None for r in rows(t, "probe"))
    r = one(t, "probe", "con")
    assert r["metric"] == "r2" and r["ci_low"] is None and r["p_value"] is None
    r = one(t, "probe", "bin")
    assert r["metric"] == "accuracy" and r["ci_low"] <= r["score"] <= r["ci_high"]
    assert r["p_value"] < 1e-6 and r["n"] == r["n_test"]


# ---------------------------------------------------------------------- sklearn agreement
def test_logistic_matches_sklearn():
    X, rid, Y = planted(seed=1)
    l2 = 1e-3
    st = feed(ProbeState(20, [CAT], l2=l2, topk=()), X, Y[:, [1]], rid, batches=3)
    t = st.finalize()
    Xtr, ytr, Xte, yte = split_xy(X, Y[:, 1], rid)
    ref = sk_logreg_acc(Xtr, ytr, Xte, yte, l2)
    r = one(t, "probe", "cat")
    assert abs(r["score"] - ref) <= 0.01, (r["score"], ref)
    assert r["n_train"] == len(ytr) and r["n_test"] == len(yte)
    assert 0.3 < r["score"] < 0.99  # a non-trivial problem
    maj = np.bincount(yte.astype(int)).max() / len(yte)
    assert r["majority"] == pytest.approx(maj)


def test_ridge_matches_sklearn():
    X, rid, Y = planted(seed=2)
    alpha = 25.0
    t = feed(ProbeState(20, [CON], ridge_alpha=alpha, topk=()), X, Y[:, [2]], rid).finalize()
    Xtr, ytr, Xte, yte = split_xy(X, Y[:, 2], rid)
    assert one(t, "probe", "con")["score"] == pytest.approx(sk_ridge_r2(Xtr, ytr, Xte, yte, alpha), abs=1e-3)
    # default alpha = l2 * n_train
    l2 = 0.05
    t = feed(ProbeState(20, [CON], l2=l2, topk=()), X, Y[:, [2]], rid).finalize()
    ref = sk_ridge_r2(Xtr, ytr, Xte, yte, l2 * len(ytr))
    assert one(t, "probe", "con")["score"] == pytest.approx(ref, abs=1e-3)


def test_multiple_hypotheses_train_together():
    X, rid, Y = planted(seed=3)
    rng = np.random.default_rng(0)
    Y = Y.copy()
    Y[rng.random(len(Y)) < 0.2, 0] = np.nan    # different masks per hypothesis
    Y[rng.random(len(Y)) < 0.3, 1] = np.nan
    Y[rng.random(len(Y)) < 0.1, 2] = np.nan
    l2 = 2e-3
    t = feed(ProbeState(20, [BIN, CAT, CON], l2=l2, topk=()), X, Y, rid, batches=4).finalize()
    Xtr, ytr, Xte, yte = split_xy(X, Y, rid)
    for j, name in enumerate(["bin", "cat"]):
        ref = sk_logreg_acc(Xtr, ytr[:, j], Xte, yte[:, j], l2)
        r = one(t, "probe", name)
        assert abs(r["score"] - ref) <= 0.01, (name, r["score"], ref)
        assert r["n_train"] == int((~np.isnan(ytr[:, j])).sum())
        assert r["n_test"] == int((~np.isnan(yte[:, j])).sum())
    ok = ~np.isnan(ytr[:, 2])
    ref = sk_ridge_r2(Xtr, ytr[:, 2], Xte, yte[:, 2], l2 * ok.sum())
    assert one(t, "probe", "con")["score"] == pytest.approx(ref, abs=1e-3)
    # each jointly trained head equals the head trained alone
    for j, h in enumerate([BIN, CAT, CON]):
        alone = feed(ProbeState(20, [h], l2=l2, topk=()), X, Y[:, [j]], rid).finalize()
        assert one(alone, "probe", h["name"])["score"] == pytest.approx(one(t, "probe", h["name"])["score"], abs=0.005)


# ---------------------------------------------------------------------------- rankings
def sparse_planted(n=4000, width=50, seed=5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, width))
    y = (X[:, 7] - X[:, 23] + 0.8 * X[:, 41] > 0).astype(float)
    rid = np.arange(n) // 4
    return X, rid, y[:, None]


def test_l1_weight_ranking_finds_planted_units():
    X, rid, Y = sparse_planted()
    st = feed(ProbeState(50, [BIN], l1=0.01, l2=1e-4, topk=(1, 2, 3, 5, 10, 50)), X, Y, rid, batches=2)
    t = st.finalize()
    w = rows(t, "probe_weight", "bin")
    assert len(w) == 50 and all(r["unit"] is not None for r in w)
    top = {r["unit"] for r in w if r["rank"] <= 3}
    assert top == {7, 23, 41}
    assert sorted(r["rank"] for r in w) == list(range(1, 51))
    assert sum(r["score"] for r in w) == pytest.approx(1.0)
    assert sum(r["score"] for r in w if r["unit"] in top) > 0.9   # L1 zeroes most of the rest
    # top-k: non-decreasing (up to noise), top-3 close to the full probe
    tk = {r["k"]: r["score"] for r in rows(t, "probe_topk", "bin")}
    assert sorted(tk) == [1, 2, 3, 5, 10, 50]
    ks = sorted(tk)
    for a, b in zip(ks, ks[1:]):
        assert tk[b] >= tk[a] - 0.01
    assert tk[3] > 0.97 and tk[1] < 0.85
    assert tk[50] == pytest.approx(one(t, "probe", "bin")["score"], abs=0.005)


def test_topk_capped_at_width():
    X, rid, Y = planted(n_records=200, width=6)
    t = feed(ProbeState(6, [BIN], topk=(1, 5, 10, 50)), X, Y[:, [0]], rid).finalize()
    assert sorted(r["k"] for r in rows(t, "probe_topk")) == [1, 5, 6]


# ------------------------------------------------------------------------------ merging
def test_merge_equals_one_shot_and_sample_is_identical():
    X, rid, Y = planted(seed=7)
    hyps = [BIN, CAT, CON]
    kw = dict(max_rows=900, topk=(2,))   # the cap binds: ~2400 train rows, ~600 test rows
    whole = feed(ProbeState(20, hyps, **kw), X, Y, rid)
    parts = []
    for ix in np.array_split(np.random.default_rng(1).permutation(len(X)), 4):
        parts.append(feed(ProbeState(20, hyps, **kw), X[ix], Y[ix], rid[ix], batches=3))
    merged = parts[0]
    for p in parts[1:]:
        merged.combine(p)
    for split in ("train", "test"):
        a, b = whole.sample(split), merged.sample(split)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    assert whole.sample("train")[0].numel() == 900
    ta, tb = whole.finalize(), merged.finalize()
    for j, name in enumerate(("bin", "cat", "con")):
        assert one(ta, "probe", name)["score"] == pytest.approx(one(tb, "probe", name)["score"], abs=1e-3)
        assert one(ta, "probe", name)["n_train"] == 900 - int(torch.isnan(whole.sample("train")[2][:, j]).sum())


def test_sample_keeps_smallest_keys():
    X, rid, Y = planted(n_records=100, width=5, seed=8)
    st = feed(ProbeState(5, [BIN], max_rows=50), X, Y[:, [0]], rid, batches=5)
    keys = st.row_keys(torch.tensor(X, dtype=torch.float32), torch.tensor(Y[:, [0]]), rid)
    tr = ~torch.as_tensor(test_split_mask(rid, 0, 0.2))
    expect = torch.sort(keys[tr]).values[:50]
    assert torch.equal(st.sample("train")[0], expect)


# ----------------------------------------------------------------------- control tasks
def test_control_labels_one_per_type_and_distribution():
    rng = np.random.default_rng(0)
    types = rng.integers(0, 6000, size=60000)
    freq = np.array([50.0, 25.0, 15.0, 10.0])
    lab = control_labels(types, 4, freq, seed=11)
    assert lab.shape == types.shape and lab.dtype == np.int64
    per_type = {}
    for t, l in zip(types, lab):
        assert per_type.setdefault(t, l) == l
    counts = np.bincount(np.array(list(per_type.values())), minlength=4)
    _, p = stats.chisquare(counts, counts.sum() * freq / freq.sum())
    assert p > 1e-3
    # one fixed label per type whatever the batch, and strings work too
    assert np.array_equal(control_labels(types[:100], 4, freq, seed=11), lab[:100])
    s = control_labels(np.array(["if", "for", "if"]), 4, freq, seed=1)
    assert s[0] == s[2]
    assert not np.array_equal(control_labels(types, 4, freq, seed=12), lab)


def test_selectivity_positive_when_labels_follow_activations():
    rng = np.random.default_rng(4)
    n, width, K = 4000, 10, 3
    types = rng.integers(0, 300, size=n)
    X = rng.normal(size=(n, width))            # independent of the word type
    real = np.argmax(X[:, :K] * 2 + rng.normal(scale=0.5, size=(n, K)), 1)
    freq = np.bincount(real, minlength=K)
    ctrl = control_labels(types, K, freq, seed=0)
    hyps = [{"name": "real", "kind": "categorical", "categories": ["x", "y", "z"]},
            {"name": "real_control", "kind": "categorical", "categories": ["x", "y", "z"]}]
    Y = np.stack([real, ctrl], 1).astype(float)
    rid = np.arange(n) // 5
    t = feed(ProbeState(width, hyps, control_of={"real_control": "real"}, topk=()), X, Y, rid).finalize()
    acc, cacc = one(t, "probe", "real")["score"], one(t, "probe", "real_control")["score"]
    s = one(t, "selectivity", "real")
    assert s["unit"] is None
    assert s["score"] == pytest.approx(acc - cacc) == pytest.approx(selectivity(acc, cacc))
    assert s["score"] > 0.3 and acc > 0.8
    assert math.isnan(selectivity(0.5, None))
    assert np.allclose(selectivity(np.array([0.9, 0.8]), np.array([0.5, 0.5])), [0.4, 0.3])
    with pytest.raises(DeepBaseError, match="nope"):
        ProbeState(width, hyps, control_of={"nope": "real"})


# ------------------------------------------------------------------------------- errors
def test_too_few_examples_of_a_class_raises():
    X, rid, Y = planted(n_records=200, width=5, seed=9)
    y = Y[:, 1].copy()
    te = test_split_mask(rid, 0, 0.2)
    d = np.nonzero((y == 3) & ~te)[0]
    y[d[3:]] = 0          # class "d" keeps 3 training examples
    st = feed(ProbeState(5, [CAT]), X, y[:, None], rid)
    with pytest.raises(DeepBaseError, match=r"'cat'.*'d'"):
        st.finalize()
    yb = np.zeros(len(y))
    yb[np.nonzero(~te)[0][:2]] = 1
    st = feed(ProbeState(5, [BIN]), X, yb[:, None], rid)
    with pytest.raises(DeepBaseError, match=r"'bin'.*class 1"):
        st.finalize()


def test_bad_categorical_code_raises():
    X, rid, Y = planted(n_records=100, width=5)
    y = Y[:, 1].copy()
    y[0] = 7
    with pytest.raises(DeepBaseError, match="'cat'"):
        feed(ProbeState(5, [CAT]), X, y[:, None], rid).finalize()


def test_max_error_shrinks():
    X, rid, Y = planted(n_records=400, width=5)
    st = ProbeState(5, [BIN])
    assert st.max_error() == float("inf")
    feed(st, X[:400], Y[:400, [0]], rid[:400])
    e1 = st.max_error()
    feed(st, X[400:], Y[400:, [0]], rid[400:])
    assert 0 < st.max_error() < e1
    assert ProbeState(5, [CON]).max_error() == float("inf")


def test_heldout_loss_is_the_test_split_cross_entropy_and_squared_error():
    from sklearn.metrics import log_loss
    X, rid, Y = planted(seed=1)
    l2 = 1e-3
    st = feed(ProbeState(20, [CAT, CON], l2=l2, topk=()), X, Y[:, [1, 2]], rid, batches=3)
    loss = st.heldout_loss(st.probe_model())
    Xtr, ytr, Xte, yte = split_xy(X, Y[:, [1, 2]], rid)
    m = LogisticRegression(C=1.0 / (len(ytr) * l2), solver="lbfgs", max_iter=5000).fit(Xtr, ytr[:, 0])
    assert loss["cat"] == pytest.approx(log_loss(yte[:, 0], m.predict_proba(Xte)), abs=1e-4)
    ridge = Ridge(alpha=l2 * len(ytr)).fit(Xtr, ytr[:, 1])
    assert loss["con"] == pytest.approx(np.mean((ridge.predict(Xte) - yte[:, 1]) ** 2), rel=1e-6)
    const = st.constant_loss()           # the best constant prediction: label entropy, variance
    freq = np.bincount(yte[:, 0].astype(int)) / len(yte)
    assert const["cat"] == pytest.approx(-(freq * np.log(freq)).sum())
    assert const["con"] == pytest.approx(yte[:, 1].var())
    assert loss["cat"] < const["cat"] and loss["con"] < const["con"]
    # a probe fit before class 3 was seen has no probability for it: infinite loss on these rows
    unseen = Y[:, [1, 2]].copy()
    unseen[unseen[:, 0] == 3, 0] = np.nan
    earlier = feed(ProbeState(20, [CAT, CON], l2=l2, topk=()), X, unseen, rid).probe_model()
    assert st.heldout_loss(earlier)["cat"] == math.inf and math.isfinite(st.heldout_loss(earlier)["con"])
    # a head without labelled test rows has no loss
    none = Y[:, [1, 2]].copy()
    none[test_split_mask(rid), 1] = np.nan
    st2 = feed(ProbeState(20, [CAT, CON], l2=l2, topk=()), X, none, rid)
    assert math.isnan(st2.heldout_loss(st2.probe_model())["con"]) and math.isnan(st2.constant_loss()["con"])


# ----------------------------------------------------------------------------------- CKA
def cka_reference(X, Y):
    """Kornblith et al.'s HSIC form with explicit centring matrices."""
    n = X.shape[0]
    Hm = np.eye(n) - np.ones((n, n)) / n
    K, L = Hm @ X @ X.T @ Hm, Hm @ Y @ Y.T @ Hm
    return np.sum(K * L) / math.sqrt(np.sum(K * K) * np.sum(L * L))


def test_cka_streaming_and_merge_match_direct():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 12)) + 50.0
    Y = X[:, :7] @ rng.normal(size=(7, 9)) + rng.normal(size=(600, 9)) * 3 - 20.0
    ref = cka_reference(X, Y)
    parts = []
    for ix in np.array_split(np.arange(600), 4):
        s = LinearCKAState(12, 9)
        for jx in np.array_split(ix, 3):
            s.update(torch.tensor(X[jx]), torch.tensor(Y[jx]))
        parts.append(s)
    merged = parts[0]
    for p in parts[1:]:
        merged.combine(p)
    assert merged.finalize() == pytest.approx(ref, abs=1e-9)
    one_shot = LinearCKAState(12, 9)
    one_shot.update(X, Y)
    assert one_shot.finalize() == pytest.approx(ref, abs=1e-9)
    assert linear_cka(X, Y) == pytest.approx(ref, abs=1e-9)


def test_cka_identity_and_invariances():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 10))
    Y = np.tanh(X @ rng.normal(size=(10, 6)))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    s = LinearCKAState(10, 10)
    s.update(X, X)
    assert s.finalize() == pytest.approx(1.0, abs=1e-12)
    Q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    base = linear_cka(X, Y)
    assert 0 < base < 1
    assert linear_cka(X @ Q, Y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * X, 0.2 * Y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X + 5.0, Y) == pytest.approx(base, abs=1e-10)
    with pytest.raises(DeepBaseError):
        LinearCKAState(3, 4).update(np.zeros((5, 3)), np.zeros((4, 4)))
    assert math.isnan(LinearCKAState(2, 2).finalize())


def test_float32_training_path_agrees(monkeypatch):
    from deepbase_duck.inspectors import probes
    X, rid, Y = planted(seed=12)
    hyps = [BIN, CAT, CON]
    t64 = feed(ProbeState(20, hyps, topk=()), X, Y, rid).finalize()
    monkeypatch.setattr(probes, "_FLOAT64_CELLS", 0)
    t32 = feed(ProbeState(20, hyps, topk=()), X, Y, rid).finalize()
    for name in ("bin", "cat"):
        assert abs(one(t32, "probe", name)["score"] - one(t64, "probe", name)["score"]) <= 0.005
    assert one(t32, "probe", "con")["score"] == pytest.approx(one(t64, "probe", "con")["score"], abs=1e-4)


def test_empty_continuous_group_gives_null_scores():
    t = ProbeState(4, [CON], topk=(2,)).finalize()
    r = one(t, "probe", "con")
    assert r["score"] is None and r["n"] == 0
