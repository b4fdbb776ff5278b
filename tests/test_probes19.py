"""Probes and CKA, session 19: weight masses of classes without weight, refusals of control
tasks, checked against scikit-learn and numpy on data with a known answer."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from deepbase_duck.errors import DeepBaseError
from deepbase_duck.inspectors.probes import ProbeState, test_split_mask
from test_probes_hunt16 import standardised

pytestmark = pytest.mark.usefixtures("one_thread")

ORDINAL = {"name": "k", "kind": "categorical", "categories": ["low", "mid", "high"]}


def rows(t, measure, hyp=None):
    return [r for r in t.to_pylist() if r["measure"] == measure and (hyp is None or r["hypothesis"] == hyp)]


def ordinal_data(n=900, w=4, seed=0):
    """Three ordered classes planted on unit 0 (low below, high above, mid between); units 1.. noise."""
    rng = np.random.default_rng(seed)
    rid = np.repeat(np.arange(n // 3), 3)
    X = rng.normal(size=(n, w))
    s = np.stack([-3 * X[:, 0], np.zeros(n), 3 * X[:, 0]], 1) + rng.gumbel(size=(n, 3))
    return X, np.argmax(s, 1).astype(float), rid, test_split_mask(rid, 0, 0.2)


# ----------------------------------------------- a class whose weights are all 0 (l1)
def test_an_elastic_net_class_without_weight_takes_no_weight_mass():
    """With l1 the softmax's redundant direction is fixed by the penalty: here the middle class'
    column is exactly 0 (as in scikit-learn's elastic-net fit) and the two outer classes carry
    unit 0. The old mass averaged that all-zero column as a class of mass 0 for every unit: the
    planted unit scored 2/3, the scores summed to 2/3, not 1, and 'k=mid' ranked the units
    1..4 by index with scores 0. Now the zero column is left out like a class without training
    rows: unit 0's mass is scikit-learn's |coef| normalised over the units and averaged over
    the classes with weight, and 'k=mid' has no ranking (NULL)."""
    X, y, rid, te = ordinal_data()
    l1, l2 = 3e-2, 1e-3
    st = ProbeState(X.shape[1], [ORDINAL], topk=(), l1=l1, l2=l2, tol=1e-12, patience=50, max_epochs=20_000)
    st.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    t = st.finalize()

    Z = standardised(X, te)
    ntr = int((~te).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        ref = LogisticRegression(penalty="elasticnet", solver="saga", C=1 / ((l1 + l2) * ntr),
                                 l1_ratio=l1 / (l1 + l2), tol=1e-10, max_iter=100_000).fit(Z[~te], y[~te])
    A = np.abs(ref.coef_.T)                                   # (units, classes)
    assert (A[:, 1] == 0).all() and (A[:, [0, 2]].sum(0) > 0).all()    # the data are as planned
    with_weight = A.sum(0) > 0
    mass = (A[:, with_weight] / A[:, with_weight].sum(0)).mean(1)
    got = {r["unit"]: r for r in rows(t, "probe_weight")}
    np.testing.assert_allclose([got[u]["score"] for u in range(4)], mass, atol=1e-6)
    assert got[0]["rank"] == 1 and got[0]["score"] == pytest.approx(1.0)
    assert sum(got[u]["score"] for u in range(4)) == pytest.approx(1.0)
    mid = rows(t, "probe_class_weight", "k=mid")
    assert len(mid) == 4 and all(r["score"] is None and r["rank"] is None for r in mid)
    high = {r["unit"]: r for r in rows(t, "probe_class_weight", "k=high")}
    assert high[0]["rank"] == 1 and high[0]["score"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["binary", "continuous"])
def test_a_probe_on_constant_units_ranks_no_unit(kind):
    """Every unit constant (a dead layer): the probe has no weight to rank -- it predicts the
    train split's majority class or mean label -- and its probe_weight rows were scores 0
    ranked 1..width by unit index, a ranking a query sorting by rank took as real. Now they
    are NULL, as for a head without training rows; the probe score itself stays (the accuracy
    of predicting the majority class, the R2 of predicting the train mean)."""
    rng = np.random.default_rng(2)
    n = 400
    rid = np.repeat(np.arange(n // 4), 4)
    te = test_split_mask(rid, 0, 0.2)
    X = np.tile(np.array([[0.0, 3.0, -1e4]], dtype=np.float32), (n, 1))
    y = (rng.random(n) < 0.3).astype(float) if kind == "binary" else rng.normal(size=n)
    st = ProbeState(3, [{"name": "h", "kind": kind}], topk=(1,))
    st.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    t = st.finalize()
    w = rows(t, "probe_weight")
    assert len(w) == 3 and all(r["score"] is None and r["rank"] is None for r in w)
    (p,) = rows(t, "probe")
    if kind == "binary":
        assert p["score"] == pytest.approx(float(np.mean(y[te] == 0)), abs=1e-12)   # the majority class 0
    else:
        pred = y[~te].mean()
        r2 = 1 - ((y[te] - pred) ** 2).sum() / ((y[te] - y[te].mean()) ** 2).sum()
        assert p["score"] == pytest.approx(r2, abs=1e-9)


# ------------------------------------------------------- refusals of control tasks
def control_state(ctrl_labels, **kw):
    """A binary hypothesis 'x' planted on unit 0 and its control task 'x~control' with the given
    labels (NaN where 'x' has none), as inspect(..., control=True) builds them."""
    rng = np.random.default_rng(4)
    n = len(ctrl_labels)
    X = rng.normal(size=(n, 3))
    x = (X[:, 0] > 0.5).astype(float)
    st = ProbeState(3, [{"name": "x", "kind": "binary"}, {"name": "x~control", "kind": "binary"}],
                    topk=(), control_of={"x~control": "x"}, **kw)
    st.update(torch.tensor(X), torch.tensor(np.stack([x, ctrl_labels], 1)), torch.tensor(np.arange(n) // 4))
    return st


def test_a_control_task_of_one_class_is_refused_naming_the_control_and_what_to_do():
    """Control labels are drawn per word type from the real hypothesis' class frequencies, so
    for a rare class no type may draw it: the control task has one class while 'x' has two.
    The refusal said "hypothesis 'x~control' has a single class 0", a hypothesis the user never
    named, with no way on; now it names the control task of 'x', why, and what to do."""
    st = control_state(np.zeros(400))
    with pytest.raises(DeepBaseError) as e:
        st.finalize()
    msg = str(e.value)
    assert "control task 'x~control' of hypothesis 'x'" in msg and "single class 0" in msg
    assert "word type" in msg and "more records" in msg and "control=True" in msg


def test_a_rare_control_class_is_refused_without_advice_that_fits_only_real_hypotheses():
    """A control class on too few training rows: the old advice 'leave the class out of the
    hypothesis' cannot be followed for a control task (its classes are the real hypothesis'
    ones); the refusal names the control task and offers what works, and the advice it gives
    (min_per_class 0) trains it."""
    ctrl = np.zeros(400)
    ctrl[:8] = 1                               # two records' worth of rows: few in the train split
    st = control_state(ctrl)
    with pytest.raises(DeepBaseError) as e:
        st.finalize()
    msg = str(e.value)
    assert "control task 'x~control' of hypothesis 'x'" in msg and "min_per_class=5" in msg
    assert "leave the class out" not in msg and "control=True" in msg and "{'min_per_class': 0}" in msg
    sel = rows(control_state(ctrl, min_per_class=0).finalize(), "selectivity")
    assert len(sel) == 1 and sel[0]["hypothesis"] == "x" and sel[0]["score"] is not None


@pytest.mark.parametrize("labels, says", [(np.zeros(400), "a single class 0"),
                                          (np.full(400, np.nan), "no labelled rows")])
def test_a_one_class_hypothesis_refusal_says_what_to_do(labels, says):
    """The refusal of a hypothesis with one class (or none) in the selected records named it but
    gave no way on; it now says to select records where another class occurs or to leave the
    hypothesis out of the probe query (the probe of a group trains all its hypotheses together)."""
    st = ProbeState(3, [{"name": "h", "kind": "binary"}], topk=(), min_per_class=0)
    st.update(torch.randn(400, 3), torch.tensor(labels[:, None]), torch.arange(400) // 4)
    with pytest.raises(DeepBaseError, match=rf"'h' has {says}.*select records.*leave 'h' out"):
        st.finalize()



# ------------------------------------------------- a rare class dropped by the row sample
def test_a_rare_class_thinned_by_max_rows_is_refused_pointing_at_max_rows():
    """The probe trains on a sample of at most max_rows rows per split. A class of 1.5% of the
    rows kept 30 training rows in the stream but about 1 in a sample of 100, and the refusal
    ('has 1 training examples ...: select more records') sent the user after records, which
    cannot help: the sample stays at max_rows. It now says how many train rows the sample kept
    of those seen and to raise max_rows, and doing so trains the probe (the rare class's count
    then numpy's)."""
    rng = np.random.default_rng(11)
    n = 2500
    rid = np.repeat(np.arange(n // 5), 5)
    te = test_split_mask(rid, 0, 0.2)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] > 0).astype(float)
    y[rng.choice(n, 40, replace=False)] = 2
    cat = {"name": "k", "kind": "categorical", "categories": ["a", "b", "rare"]}
    st = ProbeState(3, [cat], topk=(), max_rows=100)
    st.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    seen = int((~te).sum())
    with pytest.raises(DeepBaseError) as e:
        st.finalize()
    msg = str(e.value)
    assert "class 'rare'" in msg and "max_rows=100" in msg and f"{seen} train rows" in msg
    assert f"{{'max_rows': {seen}}}" in msg
    big = ProbeState(3, [cat], topk=(), max_rows=seen)
    big.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    (r,) = rows(big.finalize(), "probe")
    assert r["n_train"] == seen and r["n_test"] == int(te.sum())
    assert big.fit()["heads"][0]["prior"].tolist() == np.bincount(y[~te].astype(int)).tolist()

# ---------------------------------------------- checked and found correct (guards)
def test_control_labels_and_counts_follow_the_class_frequencies():
    """The note 'control label counts under-reported' did not hold: over many word types each
    class is drawn at its frequency (a binomial check), a type always gets the same class, and
    the control head of a probe reports the real hypothesis' train / test counts, which are
    numpy's counts of the labelled rows of each split."""
    from scipy import stats
    from deepbase_duck.inspectors.probes import control_labels
    freq = np.array([700.0, 250.0, 50.0])
    types = np.arange(30_000)
    lab = control_labels(types, 3, freq, seed=0)
    counts = np.bincount(lab, minlength=3)
    for c in range(3):
        assert stats.binomtest(int(counts[c]), len(types), freq[c] / freq.sum()).pvalue > 1e-4
    again = control_labels(np.repeat(types[:50], 3), 3, freq, seed=0)
    assert (again.reshape(50, 3) == lab[:50, None]).all()

    n = 2000
    rng = np.random.default_rng(8)
    rid = np.repeat(np.arange(n // 5), 5)
    te = test_split_mask(rid, 0, 0.2)
    X = rng.normal(size=(n, 3))
    x = (X[:, 0] > 0).astype(float)
    x[rng.random(n) < 0.25] = np.nan                       # symbols without a label
    tok = rng.integers(0, 40, n)                           # word types
    ctrl = np.where(np.isnan(x), np.nan, control_labels(tok, 2, np.bincount(x[~np.isnan(x)].astype(int)), 0))
    st = ProbeState(3, [{"name": "x", "kind": "binary"}, {"name": "x~control", "kind": "binary"}], topk=(),
                    control_of={"x~control": "x"}, min_per_class=0)
    st.update(torch.tensor(X), torch.tensor(np.stack([x, ctrl], 1)), torch.tensor(rid))
    probe = {r["hypothesis"]: r for r in rows(st.finalize(), "probe")}
    for h in ("x", "x~control"):
        assert probe[h]["n_train"] == int((~te & ~np.isnan(x)).sum())
        assert probe[h]["n_test"] == probe[h]["n"] == int((te & ~np.isnan(x)).sum())


def test_streamed_cka_is_the_gram_matrix_cka_far_from_zero_with_constant_columns():
    """Linear CKA (Kornblith et al. 2019) as HSIC of the centred Gram matrices, in numpy, against
    the streamed state (uneven batches, merged states) and linear_cka, on float32 activations
    far from 0, groups of very different widths and constant columns: the same to 1e-9."""
    from deepbase_duck.inspectors.cka import LinearCKAState, linear_cka

    def gram_cka(X, Y):
        X = X.astype(np.float64)
        Y = Y.astype(np.float64)
        X, Y = X - X.mean(0), Y - Y.mean(0)
        H = np.eye(len(X)) - 1.0 / len(X)
        K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
        return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))

    rng = np.random.default_rng(9)
    n = 600
    z = rng.normal(size=n)
    for offset, p, q in ((1e4, 1, 300), (1e6, 40, 2), (-3e5, 7, 7)):
        X = (offset + np.outer(z, rng.uniform(0.5, 2, p)) + rng.normal(size=(n, p))).astype(np.float32)
        Y = (offset / 2 + np.tanh(np.outer(z, rng.uniform(0.5, 2, q))) + 0.5 * rng.normal(size=(n, q))).astype(np.float32)
        if p > 1:
            X[:, 1] = np.float32(offset)                       # a constant column
        Y[:, -1] = np.float32(-7.0)
        ref = gram_cka(X, Y)
        assert 0.01 < ref < 0.99
        cuts = [0, 1, 37, 300, 301, n]
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            st = LinearCKAState(p, q)
            st.update(torch.tensor(X[a:b]), torch.tensor(Y[a:b]))
            parts.append(st)
        merged = parts[3]
        for st in (parts[0], parts[4], parts[2], parts[1]):
            merged.combine(st)
        one = LinearCKAState(p, q)
        one.update(torch.tensor(X), torch.tensor(Y))
        for got in (merged.finalize(), one.finalize(), linear_cka(X, Y)):
            assert got == pytest.approx(ref, abs=1e-9)
