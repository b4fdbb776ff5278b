"""Inspector statistics on adversarial but legitimate data (bug hunt 15), against independent
references (numpy, scipy.stats, sklearn.metrics): constant labels over several batches, float64
activations far from 0, rows of a record apart in a batch, constant CKA groups, interval ends
rounded outside [0, 1], a probe's R2 on constant test labels, label dtypes and codings, float16
and bfloat16 activations, NaN / inf, merges with empty states in any order, a unit equal to its
label, one or two records; and a few cases end to end through dbd.inspect."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import average_precision_score, mutual_info_score, r2_score

import deepbase_duck as dbd
from deepbase_duck.errors import HypothesisError
from deepbase_duck.inspectors import MEASURES, measure_class
from deepbase_duck.inspectors.cka import LinearCKAState, linear_cka
from deepbase_duck.inspectors.probes import ProbeState, test_split_mask

from conftest import TEXTS, planted_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = [{"name": "h", "kind": "binary"}]
CON = [{"name": "c", "kind": "continuous"}]
CAT = [{"name": "k", "kind": "categorical", "categories": ["a", "b", "c", "d"]}]
DISSECTION = ("iou", "precision", "recall", "f1")


def fed(measure, x, y, rec=None, hyps=BIN, cuts=(), **kw):
    """A state of ``measure`` fed x, y (and record ids) in batches cut at ``cuts``."""
    if measure == "probe":
        kw.setdefault("topk", ())
    st = measure_class(measure)(x.shape[1], hyps, **kw)
    bounds = [0, *cuts, len(x)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        st.update(torch.as_tensor(x[a:b]), torch.as_tensor(y[a:b]),
                  None if rec is None else torch.as_tensor(rec[a:b]))
    return st


def col(table, name, measure=None):
    """A finalize() column as float64 (NULL -> NaN), rows of ``measure`` only when given."""
    rows = [r for r in table.to_pylist() if measure is None or r["measure"] == measure]
    return np.array([np.nan if r[name] is None else r[name] for r in rows], dtype=np.float64)


def same(a, b, tol=1e-12):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b)) and \
        np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=tol, atol=tol)


# ------------------------------------------------- corr: a label equal on all its symbols
@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, 1e6 + 0.1])
@pytest.mark.parametrize("unlabelled", [0.0, 0.3])
def test_corr_of_a_constant_label_over_several_batches_is_null(value, unlabelled):
    """A continuous label equal to ``value`` on every labelled symbol, fed in several batches:
    the batch means' merges left a rounding-sized variance (1e-30) and r came out as +-0.05
    with p ~ 1e-8 (end to end below); scipy's r is undefined (NaN). Every column NULL."""
    rng = np.random.default_rng(1)
    n = 900
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = np.full((n, 1), value)
    y[rng.random(n) < unlabelled] = np.nan
    rec = np.arange(n) // 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = ~np.isnan(y[:, 0])
        assert np.isnan(stats.pearsonr(x[m, 0], y[m, 0]).statistic)
    for intervals in ("records", "symbols"):
        for cuts in ((), (100, 450, 451, 800)):
            t = fed("corr", x, y, rec, CON, cuts, intervals=intervals).finalize()
            for c in ("score", "ci_low", "ci_high", "p_value"):
                assert np.isnan(col(t, c)).all(), (intervals, cuts, c)
    # merged states: the same
    a, b = fed("corr", x[:400], y[:400], rec[:400], CON), fed("corr", x[400:], y[400:], rec[400:], CON)
    assert np.isnan(col(a.combine(b).finalize(), "score")).all()
    # a label that varies is still scored (scipy's r), also when it is constant in a batch
    y2 = y.copy()
    y2[600:] = value + 1.0
    t = fed("corr", x, y2, rec, CON, (100, 450, 800)).finalize()
    m = ~np.isnan(y2[:, 0])
    ref = [stats.pearsonr(x[m, u].astype(np.float64), y2[m, 0]).statistic for u in range(3)]
    assert np.allclose(col(t, "score"), ref, atol=1e-9)


# ------------------------------------------- float64 activations far from 0 keep their score
@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_float64_units_far_from_zero_keep_their_scores(offset):
    """float64 activations 1e8 + N(0, 1): corr, pointbiserial and probeless made them NULL (their
    spread is below float32 resolution of 1e8, not below their own: float64 holds them to
    1.5e-8); now scipy's r, pointbiserialr and the class-mean differences."""
    rng = np.random.default_rng(2)
    n = 3000
    y = (rng.random(n) < 0.3).astype(np.float64)
    base = 0.5 * y + rng.normal(size=n)
    x = np.stack([base + offset, rng.normal(size=n) * 1e-3 + offset], 1)     # float64
    rec = np.arange(n) // 30
    for measure in ("corr", "pointbiserial", "probeless"):
        t = fed(measure, x, y[:, None], rec, BIN, (1000, 2000)).finalize()
        s = col(t, "score")
        assert not np.isnan(s).any(), measure
        for u in range(2):
            if measure == "probeless":
                # (about the offset: numpy's class means themselves are a spacing of 1e8 off)
                ref = abs((x[y == 1, u] - offset).mean() - (x[y == 0, u] - offset).mean())
                assert s[u] == pytest.approx(ref, rel=1e-6, abs=1e-9), (measure, u)
            else:
                assert s[u] == pytest.approx(stats.pearsonr(x[:, u], y).statistic, abs=1e-7), (measure, u)
    # the same values as float32 rows stay as they were: below float32 resolution of 1e8, NULL
    t = fed("corr", x.astype(np.float32), y[:, None], rec, BIN).finalize()
    if offset == 1e8:
        assert np.isnan(col(t, "score")).all()


def test_float64_unit_constant_on_the_labelled_symbols_is_still_null():
    """The float64 rule keeps what the float32 one was for: a unit constant (0.7) on a
    hypothesis' labelled symbols and varying elsewhere has a rounding-sized variance there."""
    rng = np.random.default_rng(8)
    rec = np.repeat(np.arange(12), 9)
    y = rng.normal(size=(len(rec), 1))
    y[::3, 0] = np.nan
    x = np.stack([np.where(np.isnan(y[:, 0]), rng.normal(size=len(rec)) * 5 + 1e4, 0.7 + 1e4),
                  rng.normal(size=len(rec))], 1)
    for intervals in ("records", "symbols"):
        t = fed("corr", x, y, rec, CON, tuple(range(27, len(rec), 27)), intervals=intervals).finalize()
        assert np.isnan(col(t, "score")[0]) and np.isnan(col(t, "p_value")[0])
        m = ~np.isnan(y[:, 0])
        assert col(t, "score")[1] == pytest.approx(stats.pearsonr(x[m, 1], y[m, 0]).statistic, abs=1e-12)


# ------------------------------------------ corr: the rows of a record apart in a batch
def _clustered_reference(x, y, rec):
    """Pearson r with the sandwich variance over records, written out per record (records as
    clusters: z_g = sum over the record of x~ y~ - r/2 (x~^2 + y~^2), var = G/(G-1) sum z_g^2 / n^2)."""
    n = len(x)
    xs, ys = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
    r = float((xs * ys).mean())
    infl = xs * ys - r / 2 * (xs * xs + ys * ys)
    ids = np.unique(rec)
    z = np.array([infl[rec == g].sum() for g in ids])
    G = len(ids)
    return r, math.sqrt(G / (G - 1) * (z * z).sum()) / n, G


def test_corr_rows_of_a_record_apart_in_a_batch_are_one_cluster():
    """600 rows of 30 records in a random order: every run of a record counted as a record of
    its own (576 'records', an interval 3x too narrow); now the interval is the grouped rows' one,
    the direct per-record sandwich, as spearman, iou, ap and mi already had it."""
    rng = np.random.default_rng(0)
    G, per = 30, 20
    rec = np.repeat(np.arange(G), per)
    effect = rng.normal(size=G)[rec]
    x = (effect + 0.3 * rng.normal(size=G * per))[:, None]
    y = effect + 0.3 * rng.normal(size=G * per)
    perm = rng.permutation(G * per)
    r, se, groups = _clustered_reference(x[:, 0], y, rec)
    for measure, lab, hyps in (("corr", y, CON), ("pointbiserial", (y > 0) * 1.0, BIN)):
        grouped = fed(measure, x, lab[:, None], rec, hyps).finalize()
        for cuts in ((), (150, 400)):
            shuffled = fed(measure, x[perm], lab[perm, None], rec[perm], hyps, cuts).finalize()
            if not cuts:
                for c in ("score", "ci_low", "ci_high", "p_value", "records"):
                    assert same(col(shuffled, c), col(grouped, c), 1e-9), (measure, c)
            else:            # a record cut across batches counts once per batch (documented)
                assert col(shuffled, "records")[0] <= 3 * G
        assert col(grouped, "records")[0] == groups
    t = fed("corr", x[perm], y[perm, None], rec[perm], CON).finalize()
    assert col(t, "score")[0] == pytest.approx(r, abs=1e-12)
    q = stats.t.ppf(0.975, groups - 1)
    sez = se / (1 - r * r)
    assert col(t, "ci_low")[0] == pytest.approx(math.tanh(math.atanh(r) - q * sez), abs=1e-9)
    assert col(t, "ci_high")[0] == pytest.approx(math.tanh(math.atanh(r) + q * sez), abs=1e-9)


# ------------------------------------------------------------------- CKA of constant groups
@pytest.mark.parametrize("value", [0.1, 1 / 3, 7.7, 1e6 + 0.1])
def test_cka_of_a_constant_group_is_nan_whatever_the_batches(value):
    """A group of constant units: its centred sums are rounding of the batch means (1e-31), and
    CKA came out as 0.22 (two batches of 7 rows) or 1e-3 instead of undefined."""
    rng = np.random.default_rng(0)
    for n in (3, 7, 100, 1001):
        x, y = np.full((n, 2), value), rng.normal(size=(n, 3))
        one, two = LinearCKAState(2, 3), LinearCKAState(2, 3)
        one.update(x, y)
        two.update(x[:n // 2], y[:n // 2])
        two.update(x[n // 2:], y[n // 2:])
        a, b = LinearCKAState(2, 3), LinearCKAState(2, 3)
        a.update(x[:n // 3], y[:n // 3])
        b.update(x[n // 3:], y[n // 3:])
        for got in (one.finalize(), two.finalize(), a.combine(b).finalize(), linear_cka(x, y), linear_cka(y, x)):
            assert math.isnan(got), (n, got)


def test_cka_leaves_a_constant_unit_out_and_matches_hsic():
    """A group with a constant unit beside varying ones: CKA of the varying units (the HSIC
    formula with linear kernels on the centred data, in numpy), streamed or not; a NaN
    activation gives NaN."""
    rng = np.random.default_rng(1)
    n = 301
    x = rng.normal(size=(n, 3))
    x[:, 1] = 0.1
    y = np.stack([x[:, 0] * 2 + rng.normal(size=n), rng.normal(size=n)], 1)
    xc, yc = x[:, [0, 2]] - x[:, [0, 2]].mean(0), y - y.mean(0)
    K, L = xc @ xc.T, yc @ yc.T
    ref = (K * L).sum() / math.sqrt((K * K).sum() * (L * L).sum())
    st = LinearCKAState(3, 2)
    for a in range(0, n, 50):
        st.update(x[a:a + 50], y[a:a + 50])
    assert st.finalize() == pytest.approx(ref, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-12)
    x[7, 2] = np.nan
    st = LinearCKAState(3, 2)
    st.update(x, y)
    assert math.isnan(st.finalize()) and math.isnan(linear_cka(x, y))


# ---------------------------------------------------- interval ends inside [0, 1]
@pytest.mark.parametrize("intervals", ["records", "symbols"])
def test_ratio_intervals_never_leave_zero_one(intervals):
    """Wilson's ends at a score of 0 or 1 rounded to -1e-17 / -5e-17 or 1 + 2e-16: a
    proportion's interval below 0 or above 1. Each interval now lies in [0, 1] and holds its
    score (random small streams with sparse detectors, scores of 0 and 1 among them)."""
    rng = np.random.default_rng(0)
    seen = {0.0: 0, 1.0: 0}
    for _ in range(60):
        n = int(rng.choice([20, 60, 300]))
        x = rng.normal(size=(n, 3))
        x[:, 2] = (rng.random(n) < 0.05) * 1.0
        y = (rng.random(n) < rng.choice([0.02, 0.5, 0.95])) * 1.0
        if rng.random() < 0.3:
            x[:, 0] = y
        rec = np.sort(rng.integers(0, n // 5, n))
        for measure in (*DISSECTION, "ap"):
            kw = {"quantile": float(rng.choice([0.005, 0.1, 0.3]))} if measure in DISSECTION else {}
            t = fed(measure, x, y[:, None], rec, BIN, intervals=intervals, **kw).finalize()
            s, lo, hi = col(t, "score"), col(t, "ci_low"), col(t, "ci_high")
            ok = ~np.isnan(lo)
            assert (lo[ok] >= 0).all() and (hi[ok] <= 1).all(), (measure, lo, hi)
            assert (lo[ok] <= s[ok]).all() and (s[ok] <= hi[ok]).all(), measure
            for v in seen:
                seen[v] += int((s[ok] == v).sum())
    assert seen[0.0] > 10 and seen[1.0] > 10          # the edge cases were met


# ------------------------------------------------------ probe R2 on constant test labels
def _probe_r2(x, y, rec, **kw):
    st = ProbeState(x.shape[1], CON, topk=(1,), **kw)
    st.update(torch.as_tensor(x), torch.as_tensor(y[:, None]), torch.as_tensor(rec))
    t = st.finalize()
    fit = st.fit()
    _, xte, yte = st.sample("test")
    z = st._scale(xte, st._scaler(st.sample("train")[1]), torch.float64)
    pred = (z @ fit["fits"][0]["W"] + fit["fits"][0]["b"])[:, 0].numpy()
    return col(t, "score", "probe")[0], col(t, "score", "probe_topk")[0], yte[:, 0].numpy(), pred


@pytest.mark.parametrize("params", [{}, {"ridge_alpha": 0.0}, {"l1": 1e-3}])
def test_probe_r2_of_constant_test_labels_is_sklearns_force_finite_value(params):
    """Test labels all equal leave R2 undefined; it was NULL. sklearn.metrics.r2_score (its
    default force_finite=True) gives 1.0 for a perfect prediction and 0.0 otherwise, and so does
    the probe now: 1.0 when it was trained on the same constant (the intercept is exactly that
    value), 0.0 when the training labels vary or hold another constant."""
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(size=(n, 3)).astype(np.float32)
    rec = np.arange(n) // 4
    te = test_split_mask(rec, 0, 0.2)
    cases = {                                          # labels -> the R2 sklearn gives on our predictions
        "same constant 3.0": (np.full(n, 3.0), 1.0),
        "same constant 0.5": (np.full(n, 0.5), 1.0),
        "train varies": (np.where(te, 0.5, x[:, 0] * 2.0 + 1.0), 0.0),
        "another constant": (np.where(te, 0.5, 0.25), 0.0),
    }
    for name, (y, want) in cases.items():
        score, topk, yte, pred = _probe_r2(x, y, rec, **params)
        assert score == want and topk == want, (name, score, topk)
        assert r2_score(yte, pred) == want, name       # dyadic labels: sklearn's mean is exact
    # 0.1 is not dyadic: the float mean of [0.1] * k is not 0.1, so sklearn's own denominator is
    # rounding there (r2_score gives -5.8 for predictions of exactly 0.1); the probe predicts the
    # constant exactly and reads equal labels as equal: 1.0
    score, _, yte, pred = _probe_r2(x, np.full(n, 0.1), rec, **params)
    assert score == 1.0 and (pred == 0.1).all()
    assert r2_score(np.full(3, 0.1), np.full(3, 0.1)) == 1.0
    assert r2_score(np.full(3, 0.1), np.full(3, 0.2)) < -1e20          # sklearn's rounding


def test_probe_r2_still_sklearns_on_varying_labels_and_null_on_one_test_row():
    rng = np.random.default_rng(3)
    n = 500
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = 2 * x[:, 0] - x[:, 2] + rng.normal(size=n)
    rec = np.arange(n) // 5
    score, _, yte, pred = _probe_r2(x, y, rec)
    assert score == pytest.approx(r2_score(yte, pred), abs=1e-12)
    # one labelled test row: r2_score is NaN (not well defined), the probe's R2 NULL
    te = test_split_mask(rec, 0, 0.2)
    y1 = y.copy()
    y1[np.flatnonzero(te)[1:]] = np.nan
    score, _, _, _ = _probe_r2(x, y1, rec)
    assert math.isnan(score)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(r2_score([1.0], [0.5]))


# ------------------------------------------------------------- labels: dtypes and codings
ALL = ("corr", "spearman", "pointbiserial", "probeless", "mi", "iou", "ap", "probe")


def _all_measures_scores(x, y, rec, measures=ALL):
    out = {}
    for m in measures:
        kw = {"quantile": 0.05} if m == "iou" else {}
        t = fed(m, x, y, rec, BIN, **kw).finalize()
        out[m] = {c: col(t, c, m) for c in ("score", "ci_low", "ci_high", "p_value")}
    return out


def test_bool_int_and_float_labels_give_the_same_scores():
    rng = np.random.default_rng(4)
    n = 600
    yb = rng.random(n) < 0.3
    x = np.stack([yb + rng.normal(size=n), rng.normal(size=n)], 1).astype(np.float32)
    rec = np.arange(n) // 6
    ref = _all_measures_scores(x, yb[:, None].astype(np.float64), rec)
    for lab in (yb[:, None], yb[:, None].astype(np.int64), yb[:, None].astype(np.int32),
                yb[:, None].astype(np.float32)):
        got = _all_measures_scores(x, lab, rec)
        for m in ref:
            for c in ref[m]:
                assert same(got[m][c], ref[m][c]), (lab.dtype, m, c)
    # against the references
    y = yb.astype(np.float64)
    assert np.allclose(ref["corr"]["score"], [stats.pearsonr(x[:, u], y).statistic for u in range(2)], atol=1e-9)
    assert np.allclose(ref["ap"]["score"], [average_precision_score(y, x[:, u]) for u in range(2)], atol=1e-12)


def test_a_binary_label_coded_other_than_0_1_is_read_as_pointbiserial_reads_it():
    """A binary hypothesis' label is 0 or 'any other value' for pointbiserial, mi, ap and the
    dissection measures; corr and spearman used the raw value (a label of 2 gave corr another r
    than pointbiserial). Now corr and spearman read it as 1 too: scipy on the 0/1 labels."""
    rng = np.random.default_rng(5)
    n = 600
    y01 = (rng.random(n) < 0.3) * 1.0
    x = np.stack([y01 + rng.normal(size=n), rng.normal(size=n)], 1).astype(np.float32)
    rec = np.arange(n) // 6
    odd = y01.copy()
    odd[::7] *= 2.0
    odd[1::11] *= -0.5
    ref = _all_measures_scores(x, y01[:, None], rec)
    got = _all_measures_scores(x, odd[:, None], rec, ALL[:-1])       # the probe refuses labels not 0/1
    for m in got:
        for c in got[m]:
            assert same(got[m][c], ref[m][c]), (m, c)
    odd[2::13] = np.where(y01[2::13] == 1, np.inf, 0.0)
    for m in ("corr", "spearman", "pointbiserial", "mi", "iou", "ap"):   # inf is 'any other value' too
        t = fed(m, x, odd[:, None], rec, BIN, **({"quantile": 0.05} if m == "iou" else {})).finalize()
        assert same(col(t, "score"), ref[m]["score"]), m
    assert np.allclose(ref["corr"]["score"], ref["pointbiserial"]["score"], atol=1e-12)
    assert np.allclose(ref["spearman"]["score"], [stats.spearmanr(x[:, u], y01).statistic for u in range(2)],
                       atol=1e-12)
    with pytest.raises(Exception, match="expected 0 or 1"):
        fed("probe", x, odd[:, None], rec).finalize()


@pytest.mark.parametrize("measure", ["corr", "spearman", "probe"])
def test_an_infinite_continuous_label_is_refused_and_the_state_kept(measure):
    """corr made every unit's r NULL on one inf label, the probe's R2 NULL, spearman ranked it
    as the largest value; a hypothesis' labels are finite (hypotheses.core refuses inf), so the
    measures refuse it by name, and the refused batch leaves the state as it was."""
    rng = np.random.default_rng(6)
    n = 300
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=n))[:, None]
    rec = np.arange(n) // 3
    st = fed(measure, x, y, rec, CON)
    before = st.finalize()
    bad = y[:10].copy()
    bad[4, 0] = -np.inf
    with pytest.raises(HypothesisError, match=rf"{measure}.*'c'.*infinite label \(-inf\) at row 4"):
        st.update(torch.as_tensor(x[:10]), torch.as_tensor(bad), torch.as_tensor(rec[:10] + 1000))
    after = st.finalize()
    for c in ("score", "ci_low", "ci_high", "p_value"):
        assert same(col(after, c), col(before, c), 0), c


# --------------------------------------------------------- float16 and bfloat16 activations
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_score_their_values(dtype):
    """float16 / bfloat16 activations: every measure equals its result on the same values given
    as float32, and the references (scipy, sklearn) on those values."""
    rng = np.random.default_rng(7)
    n = 800
    y = (rng.random(n) < 0.3) * 1.0
    x32 = torch.tensor(np.stack([y * 1.5 + rng.normal(size=n), rng.normal(size=n) * 40 + 300], 1)) \
        .to(dtype).to(torch.float32)                       # values representable in ``dtype``
    xh = x32.to(dtype)
    rec = np.arange(n) // 8
    for m in ("corr", "spearman", "pointbiserial", "probeless", "mi", "iou", "ap", "probe"):
        kw = {"quantile": 0.05} if m == "iou" else {}
        a = fed(m, xh, y[:, None], rec, **kw).finalize()
        b = fed(m, x32, y[:, None], rec, **kw).finalize()
        for c in ("score", "ci_low", "ci_high", "p_value"):
            assert same(col(a, c), col(b, c), 1e-12), (m, c)
    xs = x32.numpy().astype(np.float64)
    t = fed("corr", xh, y[:, None], rec).finalize()
    assert np.allclose(col(t, "score"), [stats.pearsonr(xs[:, u], y).statistic for u in range(2)], atol=1e-12)
    t = fed("ap", xh, y[:, None], rec).finalize()
    assert np.allclose(col(t, "score"), [average_precision_score(y, xs[:, u]) for u in range(2)], atol=1e-12)


# ------------------------------------------------------------- NaN / inf activations: NULL
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_activation_nulls_its_unit_in_every_unit_measure(bad):
    """As documented for corr: a unit with a NaN or infinite activation anywhere scores NULL
    (score, interval, p-value) in every unit-level measure, the other units are unchanged, and
    a NaN unit of a CKA group makes CKA NaN."""
    rng = np.random.default_rng(8)
    n = 600
    y = (rng.random(n) < 0.3) * 1.0
    k = rng.integers(0, 4, n) * 1.0
    x = np.stack([y + rng.normal(size=n), rng.normal(size=n), k + rng.normal(size=n)], 1)
    xb = x.copy()
    xb[123, 1] = bad
    rec = np.arange(n) // 6
    for m in sorted(MEASURES):
        if not MEASURES[m].unit_level:
            continue
        hyps, lab = (CAT, k) if m in ("mi", "probeless") else (BIN, y)
        kw = {"quantile": 0.05} if m in DISSECTION else {}
        clean = fed(m, x, lab[:, None], rec, hyps, **kw).finalize()
        for cuts in ((), (300,)):
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)   # no numpy warning leaks out
                t = fed(m, xb, lab[:, None], rec, hyps, cuts, **kw).finalize()
            for c in ("score", "ci_low", "ci_high", "p_value"):
                got, want = col(t, c), col(clean, c)
                assert np.isnan(got[1]), (m, c)
                assert same(got[[0, 2]], want[[0, 2]], 1e-9), (m, c)


# ------------------------------------------- merges with empty states, in any order
MERGE_CASES = [("corr", "con"), ("corr", "bin"), ("spearman", "con"), ("pointbiserial", "bin"),
               ("probeless", "cat"), ("mi", "cat"), ("iou", "bin"), ("f1", "bin"), ("ap", "bin"),
               ("probe", "cat"), ("probe", "con")]


@pytest.mark.parametrize("measure,kind", MERGE_CASES)
def test_combine_with_empty_states_in_any_order_equals_one_update(measure, kind):
    rng = np.random.default_rng(9)
    n = 1500
    h = (rng.random(n) < 0.3) * 1.0
    c = rng.normal(size=n) + 1e3
    c[rng.random(n) < 0.1] = np.nan
    k = rng.integers(0, 4, n) * 1.0
    k[rng.random(n) < 0.1] = np.nan
    x = np.stack([h + 0.01 * np.nan_to_num(c) + np.nan_to_num(k) + rng.normal(size=n),
                  rng.normal(size=n) + 100, np.round(rng.normal(size=n)), np.full(n, 0.5)], 1).astype(np.float32)
    y, hyps = {"bin": (h, BIN), "con": (c, CON), "cat": (k, CAT)}[kind]
    rec = np.arange(n) // 25
    kw = {"quantile": 0.02} if measure in DISSECTION else {"topk": (1,)} if measure == "probe" else {}

    def table(st):
        t = st.finalize()
        return {name: col(t, name) for name in t.column_names
                if str(t.schema.field(name).type) in ("double", "int64", "int32")}

    want = table(fed(measure, x, y[:, None], rec, hyps, **kw))
    cuts = [0, 400, 1100, n]

    def part(i=None):
        if i is None:
            return measure_class(measure)(4, hyps, **kw)
        a, b = cuts[i], cuts[i + 1]
        return fed(measure, x[a:b], y[a:b, None], rec[a:b], hyps, **kw)

    for order in ((0, 1, 2), (2, 0, 1)):
        for empty_at in (None, 0, 2, 4):
            parts = [part(i) for i in order]
            if empty_at is not None:
                e = part()
                if empty_at == 4:
                    e.combine(part())                      # an empty state merged into an empty one
                    empty_at = 0
                parts.insert(empty_at, e)
            st = parts[0]
            for p in parts[1:]:
                st.combine(p)
            got = table(st)
            for name in want:
                assert same(got[name], want[name], 1e-9), (order, empty_at, name)


# --------------------------------------------------------- a unit equal to its label
def test_a_unit_equal_to_its_label():
    """r = 1 with the point interval [1, 1] and p = 0 (records), rho = 1, AP = 1, MI = H(label)
    (mutual_info_score), IoU = precision = recall = 1 at the label's own quantile, probeless =
    mean difference 1; -label gives r = -1 with [-1, -1]."""
    rng = np.random.default_rng(10)
    n = 400
    y = np.zeros(n)
    y[rng.permutation(n)[:100]] = 1.0
    x = np.stack([y, -y, y + rng.normal(size=n) * 0.1], 1).astype(np.float32)
    rec = np.arange(n) // 4
    for m, u, want in (("corr", 0, 1.0), ("corr", 1, -1.0), ("pointbiserial", 0, 1.0),
                       ("spearman", 0, 1.0), ("spearman", 1, -1.0)):
        r = fed(m, x, y[:, None], rec).finalize().to_pylist()[u]
        assert r["score"] == pytest.approx(want, abs=1e-12), m
        assert r["ci_low"] == pytest.approx(want, abs=1e-9) and r["ci_high"] == pytest.approx(want, abs=1e-9), m
        assert r["p_value"] == pytest.approx(0.0, abs=1e-12), m
    assert col(fed("ap", x, y[:, None], rec).finalize(), "score")[0] == 1.0
    mi = col(fed("mi", x, y[:, None], rec).finalize(), "score")
    assert mi[0] == pytest.approx(mutual_info_score(y, y), rel=1e-12) and mi[1] == pytest.approx(mi[0], rel=1e-12)
    for m in DISSECTION:                                  # the top quarter is exactly the label
        t = fed(m, x, y[:, None], rec, quantile=0.25 - 1e-9).finalize()
        assert col(t, "score")[0] == 1.0, m
    assert col(fed("probeless", x, y[:, None], rec).finalize(), "score")[0] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------- one, two and three records
def test_one_and_two_records_give_scores_without_record_intervals():
    """Fewer than 3 records: every record-clustered interval and p-value is NULL (documented),
    the scores are the references'; 'symbols' intervals are there over more than 3 symbols."""
    rng = np.random.default_rng(11)
    n = 40
    y = (rng.random(n) < 0.4) * 1.0
    x = np.stack([y + rng.normal(size=n) * 0.5, rng.normal(size=n)], 1).astype(np.float32)
    xs = x.astype(np.float64)
    for rec in (np.zeros(n, np.int64), np.arange(n) // 20):
        for m in ("corr", "spearman", "pointbiserial", "iou", "ap", "mi"):
            kw = {"quantile": 0.3} if m == "iou" else {}
            t = fed(m, x, y[:, None], rec, **kw).finalize()
            assert not np.isnan(col(t, "score")).any(), m
            for c in ("ci_low", "ci_high", "p_value"):
                assert np.isnan(col(t, c)).all(), (m, c)
            if m in ("corr", "spearman", "pointbiserial", "iou", "ap"):
                t = fed(m, x, y[:, None], rec, intervals="symbols", **kw).finalize()
                assert not np.isnan(col(t, "ci_low")).any(), m
        t = fed("corr", x, y[:, None], rec).finalize()
        assert np.allclose(col(t, "score"), [stats.pearsonr(xs[:, u], y).statistic for u in range(2)], atol=1e-12)
        t = fed("ap", x, y[:, None], rec).finalize()
        assert np.allclose(col(t, "score"), [average_precision_score(y, xs[:, u]) for u in range(2)], atol=1e-12)


# ------------------------------------------------------------------------- end to end
@pytest.fixture
def planted_store():
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    yield con
    dbd.close(con)


def test_engine_constant_continuous_hypothesis_is_null_and_its_probe_r2_one(planted_store):
    """A continuous hypothesis that holds 0.1 on every character, through dbd.inspect in batches
    of 3 records: corr gave r = 0.04..0.09 with p = 1e-8 on the planted units (a constant label
    has no correlation); it is NULL now, as spearman's was. The probe, trained and tested on the
    constant, predicts it exactly: R2 1.0 (r2_score's force_finite value)."""
    @dbd.hypothesis("flat_tenth_hunt15", kind="continuous", description="0.1 on every character")
    def flat(text):
        return [0.1] * len(text)

    t = dbd.inspect(planted_store, "planted", ["planted"], ["flat_tenth_hunt15", "digit"], "snippets",
                    measures=["corr", "spearman", "probe"], batch_size=3).to_pylist()
    flat_rows = [r for r in t if r["hypothesis"] == "flat_tenth_hunt15"]
    for r in flat_rows:
        if r["measure"] in ("corr", "spearman"):
            assert r["score"] is None and r["ci_low"] is None and r["p_value"] is None, r
        if r["measure"] == "probe":
            assert r["score"] == 1.0, r
    # the planted unit 0 copies `digit`: r = 1 with the point interval, as before
    digit0 = [r for r in t if r["hypothesis"] == "digit" and r["measure"] == "corr" and r["unit"] == 0][0]
    assert digit0["score"] == pytest.approx(1.0, abs=1e-12)
    assert digit0["ci_low"] == pytest.approx(1.0, abs=1e-9) and digit0["p_value"] == pytest.approx(0.0, abs=1e-12)


def test_engine_scores_equal_the_inspector_states_fed_by_hand(planted_store):
    """dbd.inspect's corr, pointbiserial and ap over the planted layer equal the states fed the
    planted activations record by record in a shuffled row order (corr groups a record's rows)."""
    from conftest import planted_per_record
    X, Y, R = planted_per_record(["digit"])
    t = dbd.inspect(planted_store, "planted", ["planted"], ["digit"], "snippets",
                    measures=["corr", "pointbiserial", "ap"], batch_size=4)
    perm = np.random.default_rng(12).permutation(len(X))
    for m in ("corr", "pointbiserial", "ap"):
        want = fed(m, X[perm], Y[perm], R[perm]).finalize()
        for c in ("score", "ci_low", "ci_high"):
            assert same(col(t, c, m), col(want, c), 1e-9), (m, c)
