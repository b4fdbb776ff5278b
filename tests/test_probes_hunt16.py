"""Probes, permutation tests, CKA and the sampled / class-moment measures: bugs found by driving
the states directly, checked against scikit-learn, scipy and numpy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet, LogisticRegression, Ridge
from sklearn.metrics import r2_score

import deepbase_duck as dbd
from deepbase_duck.errors import BadParameterError, DeepBaseError
from deepbase_duck.inspectors import probes
from deepbase_duck.inspectors.base import measure_class
from deepbase_duck.inspectors.cka import LinearCKAState, linear_cka
from deepbase_duck.inspectors.probes import ProbeState, test_split_mask
from deepbase_duck.inspectors.significance import permutation_p_values

pytestmark = pytest.mark.usefixtures("one_thread")

CON = {"name": "c", "kind": "continuous"}


def standardised(X, te):
    """The probe's features: float32 activations standardised with the train split's mean and
    population sd."""
    Xd = X.astype(np.float32).astype(np.float64)
    mu, sd = Xd[~te].mean(0), Xd[~te].std(0)
    sd[sd == 0] = 1.0
    return (Xd - mu) / sd


def rows(t, measure):
    return [r for r in t.to_pylist() if r["measure"] == measure]


# ------------------------------------------------------- a class seen only in the test split
def test_a_class_without_training_rows_takes_no_weight_mass():
    """min_per_class=0 lets a class occur only in the test split. Its softmax column has no
    training row behind it: its weights are the optimiser's residue around 0 (1e-12), which the
    old ranking normalised to a mass of 1 like any class, so it took 1/3 of every unit's
    global mass (the planted unit fell from 0.95 to 0.73) and reordered the other units by
    noise. Now the global mass is that of the trained classes -- sklearn's binomial
    LogisticRegression on the train split, |coef| normalised -- and the class' own
    probe_class_weight rows are NULL."""
    rng = np.random.default_rng(3)
    n, W = 600, 6
    rid = np.repeat(np.arange(150), 4)
    te = test_split_mask(rid, 0, 0.2)
    X = rng.normal(size=(n, W))
    k = (X[:, 4] > 0).astype(float)                 # classes x / y planted on unit 4
    k[np.nonzero(te)[0][:3]] = 2                    # class z: three test rows, no training row
    hyp = {"name": "k", "kind": "categorical", "categories": ["x", "y", "z"]}
    st = ProbeState(W, [hyp], topk=(), min_per_class=0)
    st.update(torch.tensor(X), torch.tensor(k[:, None]), torch.tensor(rid))
    t = st.finalize()

    Z = standardised(X, te)
    ref = LogisticRegression(C=2 / ((~te).sum() * 1e-3), tol=1e-10, max_iter=10_000).fit(Z[~te], k[~te])
    mass = np.abs(ref.coef_[0]) / np.abs(ref.coef_[0]).sum()
    got = {r["unit"]: r for r in rows(t, "probe_weight")}
    np.testing.assert_allclose([got[u]["score"] for u in range(W)], mass, atol=5e-4)   # L-BFGS tolerance
    top3 = [u for u in sorted(got, key=lambda u: got[u]["rank"])][:3]
    assert top3 == list(np.argsort(-mass)[:3])      # the masses apart by more than the tolerance
    assert got[4]["rank"] == 1 and got[4]["score"] > 0.9
    assert sum(got[u]["score"] for u in range(W)) == pytest.approx(1.0)
    per_class = rows(t, "probe_class_weight")
    z = [r for r in per_class if r["hypothesis"] == "k=z"]
    assert len(z) == W and all(r["score"] is None and r["rank"] is None for r in z)
    x = {r["unit"]: r["score"] for r in per_class if r["hypothesis"] == "k=x"}
    np.testing.assert_allclose([x[u] for u in range(W)], mass, atol=5e-4)
    probe = rows(t, "probe")[0]                     # the class' test rows still count as errors
    assert probe["n_test"] == int(te.sum())


# ---------------------------------------------------------------- labels far from 0
def far_labels(offset: float):
    """400 rows of 4 units over 100 records of 4 rows, their test split, and continuous labels
    ``offset`` + unit 0 + noise."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(400, 4)).astype(np.float32)
    rid = np.repeat(np.arange(100), 4)
    return X, rid, test_split_mask(rid, 0, 0.2), offset + X[:, 0].astype(np.float64) + 0.3 * rng.normal(size=400)


@pytest.mark.parametrize("offset", [1e12, -1e15])
def test_ridge_head_weights_are_sklearns_for_labels_far_from_zero(offset):
    """The ridge head's right-hand side assumed the centred labels sum to 0, but their mean is
    rounded at the labels' scale (to 0.125 at 1e15), and sum (x - shift) times that moved the
    weights by 0.1 from sklearn's Ridge on the same labels (less the offset: exact). At 1e12
    R2 is that Ridge's r2_score up to the rounding of an intercept held at the labels' scale
    (at 1e15 the labels' own resolution, 0.125, rounds any prediction made at their scale)."""
    X, rid, te, y = far_labels(offset)
    W = X.shape[1]
    st = ProbeState(W, [CON], topk=())
    st.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    fit = st.fit()
    Z = standardised(X, te)
    alpha = 1e-3 * (~te).sum()
    centred = Ridge(alpha=alpha).fit(Z[~te], y[~te] - offset)       # the exact weights
    np.testing.assert_allclose(fit["fits"][0]["W"][:, 0].numpy(), centred.coef_, atol=1e-9)
    if abs(offset) < 1e13:
        want = r2_score(y[te] - offset, centred.predict(Z[te]))
        assert fit["results"][0]["score"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("float32", [False, True])
@pytest.mark.parametrize("offset", [1e6, 1e12])
def test_elastic_net_head_is_sklearns_for_labels_far_from_zero(monkeypatch, offset, float32):
    """With l1 > 0 a continuous head is fit by FISTA on residuals out - y: with labels far from 0
    those kept only the digits the offset spared (at 1e12, 1e-4 in float64: weights 1e-3 off
    sklearn's ElasticNet; in float32, the dtype of samples over 2**23 cells, nothing at all).
    The head now fits its labels less their mean and adds it back to the intercept."""
    if float32:
        if offset > 1e6:
            pytest.skip("float32 features: one case is enough")
        monkeypatch.setattr(probes, "_FLOAT64_CELLS", 0)          # train in float32
    X, rid, te, y = far_labels(offset)
    W = X.shape[1]
    l1, l2 = 0.01, 1e-3
    st = ProbeState(W, [CON], topk=(), l1=l1, l2=l2, max_epochs=5000, tol=1e-12, patience=20)
    st.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    fit = st.fit()
    Z = standardised(X, te)
    ref = ElasticNet(alpha=l1 + l2, l1_ratio=l1 / (l1 + l2), tol=1e-12, max_iter=100_000).fit(Z[~te], y[~te])
    atol = 1e-4 if float32 else 1e-6
    np.testing.assert_allclose(fit["fits"][0]["W"][:, 0].numpy(), ref.coef_, atol=atol)
    assert float(fit["fits"][0]["b"][0]) - offset == pytest.approx(ref.intercept_ - offset, abs=1e-3)
    assert fit["results"][0]["score"] == pytest.approx(r2_score(y[te], ref.predict(Z[te])), abs=1e-4)


# ---------------------------------------------------------------------------- CKA
def test_cka_state_of_a_unit_infinite_on_every_symbol_is_nan_as_linear_ckas():
    """A unit at +inf on every symbol (float16 overflow of a unit far from 0) had bounds
    inf == inf, so the state took it for a constant unit, dropped it and returned a finite CKA,
    while linear_cka (and the docstring) give NaN for a non-finite activation."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 2))
    x = np.c_[rng.normal(size=50), np.full(50, 1e6)]
    x16 = torch.tensor(x).half()                    # 1e6 overflows float16: inf
    assert math.isnan(linear_cka(x16, y))
    st = LinearCKAState(2, 2)
    st.update(x16[:20], torch.tensor(y[:20]))
    other = LinearCKAState(2, 2)
    other.update(x16[20:], torch.tensor(y[20:]))
    assert math.isnan(st.combine(other).finalize())
    ok = LinearCKAState(2, 2)                       # the finite unit alone still scores
    ok.update(torch.tensor(x[:, :1]).repeat(1, 2), torch.tensor(y))
    assert ok.finalize() == pytest.approx(linear_cka(x[:, :1].repeat(2, 1), y), abs=1e-12)


# ------------------------------------------------------------------- permutation seeds
@pytest.mark.parametrize("seed", [None, -1, 2.5, "1"])
def test_permutation_seed_must_be_a_whole_number(seed):
    """seed=None drew fresh OS entropy: p-values that changed from call to call; -1 and 2.5
    failed inside numpy (ValueError / TypeError) without naming the parameter."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 2))
    y = a[:, 0] + rng.normal(size=40)
    with pytest.raises(BadParameterError, match="seed"):
        permutation_p_values(a, y, "corr", 5, seed=seed, hypotheses=[CON])
    p1 = permutation_p_values(a, y, "corr", 5, seed=3.0, hypotheses=[CON])     # 3.0 is 3
    p2 = permutation_p_values(a, y, "corr", 5, seed=3, hypotheses=[CON])
    np.testing.assert_array_equal(p1, p2)


# --------------------------------------------------------------- batches of the wrong shape
BAD_BATCHES = {
    "activations width": ((5, 4), (5, 2), 5, "activations of shape"),
    "label columns": ((5, 3), (5, 3), 5, "labels of shape"),
    "label rows": ((5, 3), (4, 2), 5, "labels of shape"),
    "record ids": ((5, 3), (5, 2), 4, "4 record ids for 5 rows"),
    "1-d activations": ((5,), (5, 2), 5, "activations of shape"),
}


@pytest.mark.parametrize("measure", ["spearman", "pointbiserial", "probeless", "mi", "ap"])
@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_a_batch_of_the_wrong_shape_is_refused_and_the_state_kept(measure, case):
    """Spearman, pointbiserial, probeless, mi (and ap, on spearman's sampled state) took a batch
    whose labels had the wrong number of columns or rows, or record ids of the wrong length,
    silently (mi, probeless) or failed with a torch RuntimeError half-way through the update
    (pointbiserial: the class moments updated, its Pearson state not). Now a DeepBaseError
    names the measure and the shapes, and the state scores as if the batch never came."""
    H = [{"name": "a", "kind": "binary"}, {"name": "b", "kind": "binary"}]
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(40, 3)))
    y = torch.tensor((rng.random((40, 2)) > 0.5).astype(float))
    rid = torch.arange(40) // 4
    params = {"calibration_rows": 10} if measure == "mi" else {}
    st = measure_class(measure)(3, H, **params)
    ref = measure_class(measure)(3, H, **params)
    for s in (st, ref):
        s.update(x[:20], y[:20], rid[:20])
    a_shape, y_shape, k, msg = BAD_BATCHES[case]
    with pytest.raises(DeepBaseError, match=msg) as e:
        st.update(torch.ones(a_shape, dtype=torch.float64), torch.zeros(y_shape, dtype=torch.float64),
                  torch.arange(k))
    assert measure in str(e.value)
    for s in (st, ref):
        s.update(x[20:], y[20:], rid[20:])
    assert st.finalize().equals(ref.finalize())


# ------------------------------------------------- permutations of mi with calibration records
def test_permutation_p_values_of_mi_with_calibration_records():
    """The permuted rows carry no record ids, and an mi state given ``calibration_records``
    refuses a batch without them: permutations := N with mi's calibration_records failed the
    whole query. The bins now come from the rows themselves (the same for the observed and
    every permuted score): the p-values are those of mi binned on its first calibration_rows."""
    rng = np.random.default_rng(4)
    a = rng.normal(size=(120, 3))
    y = (a[:, :1] + rng.normal(size=(120, 1)) > 0).astype(float)
    B = [{"name": "b", "kind": "binary"}]
    got = permutation_p_values(a, y, "mi", 19, seed=2, hypotheses=B, calibration_records=[0, 1, 2],
                               calibration_rows=30)
    want = permutation_p_values(a, y, "mi", 19, seed=2, hypotheses=B, calibration_rows=30)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == pytest.approx(1 / 20)            # the informative unit beats every permutation


def test_engine_permutations_with_mi_calibration_records(planted):
    """The same through dbd.inspect: permutations := 9 with mi's calibration records."""
    t = dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", measures=["mi"], permutations=9,
                    mi={"calibration_records": [0, 1, 2], "calibration_rows": 40}).to_pylist()
    d = {r["unit"]: json.loads(r["detail"]) for r in t}
    assert "3 calibration records" in d[0]["bin_rule"]
    assert d[0]["perm_p_value"] == pytest.approx(1 / 10)     # unit 0 copies the digit label


@pytest.mark.parametrize("measure", ["spearman", "pointbiserial", "probeless", "mi"])
def test_one_label_column_is_read_for_every_hypothesis(measure):
    """Labels of one column for a state of two hypotheses are the same labels for both (mi and
    probeless broadcast them before; spearman and pointbiserial failed with a RuntimeError,
    pointbiserial after its class moments had taken the batch)."""
    H = [{"name": "a", "kind": "binary"}, {"name": "b", "kind": "binary"}]
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(60, 3)))
    y = torch.tensor((x[:, :1].numpy() + rng.normal(size=(60, 1)) > 0).astype(float))
    params = {"calibration_rows": 20} if measure == "mi" else {}
    one = measure_class(measure)(3, H, **params)
    one.update(x, y, torch.arange(60) // 3)
    two = measure_class(measure)(3, H, **params)
    two.update(x, y.repeat(1, 2), torch.arange(60) // 3)
    assert one.finalize().equals(two.finalize())


def test_a_rare_class_error_says_how_to_go_on_and_the_way_it_names_works():
    """A categorical hypothesis with one rare class (a POS tag met a few times) fails the probe
    under the default min_per_class=5: the error names the class and says what to do, and
    what it says (min_per_class 0) trains the probe."""
    cat = {"name": "pos", "kind": "categorical", "categories": ["a", "b", "rare"]}
    rng = np.random.default_rng(2)
    n = 400
    y = rng.integers(0, 2, n).astype(np.float64)
    y[:6] = 2                                                   # 'rare': 6 rows, some in the test split
    X = rng.normal(size=(n, 3)).astype(np.float32)
    X[:, 0] += y
    rid = np.repeat(np.arange(100), 4)
    st = ProbeState(3, [cat], topk=())
    st.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    with pytest.raises(DeepBaseError, match=r"class 'rare'.*min_per_class=5.*\{'min_per_class': 0\}"):
        st.fit()
    st = ProbeState(3, [cat], topk=(), min_per_class=0)
    st.update(torch.tensor(X), torch.tensor(y[:, None]), torch.tensor(rid))
    assert 0 < st.fit()["results"][0]["score"] <= 1
