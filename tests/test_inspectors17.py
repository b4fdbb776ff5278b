"""Inspector statistics against independent references (hunt 17): streamed and merged states
must give what one state over all rows gives, and that what exact arithmetic gives."""
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from deepbase_duck.inspectors import measure_class


def _column(table, name):
    return np.array([np.nan if v is None else v for v in table.column(name).to_pylist()], dtype=float)


def _exact_r(x, y):
    """Pearson's r of float64 data in exact rational arithmetic (then rounded once)."""
    X = [Fraction(float(v)) for v in x]
    Y = [Fraction(float(v)) for v in y]
    mx, my = sum(X) / len(X), sum(Y) / len(Y)
    c = sum((a - mx) * (b - my) for a, b in zip(X, Y))
    vx = sum((a - mx) ** 2 for a in X)
    vy = sum((b - my) ** 2 for b in Y)
    return float(c) / np.sqrt(float(vx) * float(vy))


def _streamed(measure, hyps, x, y, batch, **params):
    st = measure_class(measure)(x.shape[1], hyps, **params)
    for a in range(0, len(x), batch):
        st.update(torch.tensor(x[a:a + batch]), torch.tensor(y[a:a + batch]), torch.arange(a, min(a + batch, len(x))))
    return st


@pytest.mark.parametrize("measure", ["corr", "pointbiserial"])
def test_streamed_r_keeps_the_digits_of_units_and_labels_far_from_zero(measure):
    """Activations 1e8 + 1e-3 N(0, 1) (and, for corr, a label 1e8 + N(0, 1)): a one-shot state
    is within 1e-11 of the exact r; the batch means were merged as absolute values, each rounded
    to float64's spacing at 1e8 (1.5e-8, 1e-5 of the units' spread), which put a streamed or
    merged r 1e-7 to 2e-6 off."""
    rng = np.random.default_rng(0)
    n = 400
    x = 1e8 + 1e-3 * rng.normal(size=(n, 2))
    z = (x[:, :1] - 1e8) / 1e-3 + rng.normal(size=(n, 1))
    if measure == "corr":
        y, hyps = 1e8 + z, [{"name": "c", "kind": "continuous"}]
    else:
        y, hyps = (z > 0).astype(float), [{"name": "b", "kind": "binary"}]
    exact = np.array([_exact_r(x[:, w], y[:, 0]) for w in range(2)])
    for batch in (n, 50, 7):
        r = _column(_streamed(measure, hyps, x, y, batch).finalize(), "score")
        np.testing.assert_allclose(r, exact, rtol=0, atol=1e-9, err_msg=f"batches of {batch}")
    # merged in another order: the same r
    parts = [_streamed(measure, hyps, x[a:b], y[a:b], 13) for a, b in ((0, 150), (150, 151), (151, 400))]
    merged = parts[2].combine(parts[0]).combine(parts[1])
    np.testing.assert_allclose(_column(merged.finalize(), "score"), exact, rtol=0, atol=1e-9)


def _exact_cka(x, y):
    """Linear CKA of float64 data with exactly centred cross products (rational arithmetic)."""
    def centred(a):
        cols = [[Fraction(float(v)) for v in a[:, j]] for j in range(a.shape[1])]
        return [[v - sum(c) / len(c) for v in c] for c in cols]

    def gram(a, b):
        return np.array([[float(sum(p * q for p, q in zip(u, v))) for v in b] for u in a])

    xc, yc = centred(x), centred(y)
    return (np.linalg.norm(gram(xc, yc)) ** 2) / (np.linalg.norm(gram(xc, xc)) * np.linalg.norm(gram(yc, yc)))


def test_streamed_and_in_memory_cka_keep_the_digits_of_units_far_from_zero():
    """Units 1e8 + 1e-3 N(0, 1): the streamed CKA merged absolute batch means (each rounded to
    1.5e-8, 1e-5 of the spread) and came out 2e-7 to 4e-7 off; linear_cka centred once, about
    a rounded mean, and came out 1e-9 off."""
    from deepbase_duck.inspectors.cka import LinearCKAState, linear_cka

    rng = np.random.default_rng(0)
    n = 200
    x = 1e8 + 1e-3 * rng.normal(size=(n, 3))
    y = np.c_[x[:, :1] + 1e-3 * rng.normal(size=(n, 1)), 1e8 + 1e-3 * rng.normal(size=(n, 1))]
    exact = _exact_cka(x, y)
    assert abs(linear_cka(x, y) - exact) < 1e-12
    for batch in (n, 50, 7):
        st = LinearCKAState(3, 2)
        for a in range(0, n, batch):
            st.update(x[a:a + batch], y[a:a + batch])
        assert abs(st.finalize() - exact) < 1e-12, batch
    parts = [LinearCKAState(3, 2) for _ in range(3)]
    for st, (a, b) in zip(parts, ((0, 90), (90, 91), (91, 200))):
        st.update(x[a:b], y[a:b])
    merged = LinearCKAState(3, 2).combine(parts[2]).combine(parts[0]).combine(parts[1])
    assert abs(merged.finalize() - exact) < 1e-12


def _integer_data():
    rng = np.random.default_rng(0)
    n = 400
    x = 2 ** 26 + np.c_[rng.integers(0, 8, n), rng.permutation(n)].astype(np.int64)
    b = ((x[:, 0] - 2 ** 26 + 2 * rng.normal(size=n)) > 4).astype(float)
    return x, b


def _integer_score(measure, x, b, dtype, **params):
    st = measure_class(measure)(2, [{"name": "b", "kind": "binary"}], **params)
    st.update(torch.tensor(x).to(dtype), torch.tensor(b[:, None]), torch.arange(len(x)))
    return _column(st.finalize(), "score")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_activations_keep_their_moment_scores(dtype):
    """Integer activations 2^26 + 0..N: corr, pointbiserial and probeless took them for float32
    and their spread (below float32 resolution of 2^26) for rounding: NULL scores. Integers are
    held exactly in float64: scipy's r and the class-mean difference."""
    from scipy import stats

    x, b = _integer_data()
    r = [stats.pearsonr(x[:, w].astype(float), b)[0] for w in range(2)]
    np.testing.assert_allclose(_integer_score("corr", x, b, dtype), r, rtol=1e-12)
    np.testing.assert_allclose(_integer_score("pointbiserial", x, b, dtype), r, rtol=1e-12)
    probeless = [abs(x[b == 1, w].mean() - x[b == 0, w].mean()) for w in range(2)]
    np.testing.assert_allclose(_integer_score("probeless", x, b, dtype), probeless, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_activations_are_sampled_as_the_numbers_they_are(dtype):
    """spearman's and ap's row samples and the dissection's top values held integer activations
    2^26 + 0..N as float32, multiples of 8: ties that took rho from 0.71 to 0.65, ap from 0.85
    to 0.73 and iou from 0.126 to 0.112. Now scipy's, sklearn's and numpy's values."""
    from scipy import stats
    from sklearn.metrics import average_precision_score

    x, b = _integer_data()
    np.testing.assert_allclose(_integer_score("spearman", x, b, dtype),
                               [stats.spearmanr(x[:, w], b)[0] for w in range(2)], rtol=1e-12)
    np.testing.assert_allclose(_integer_score("ap", x, b, dtype),
                               [average_precision_score(b, x[:, w]) for w in range(2)], rtol=1e-12)
    t = np.quantile(x[:, 1].astype(float), 0.9)
    fires = x[:, 1] > t
    inter = (fires & (b == 1)).sum()
    iou = inter / (fires.sum() + (b == 1).sum() - inter)
    assert _integer_score("iou", x, b, dtype, quantile=0.1)[1] == pytest.approx(iou, rel=1e-12)


@pytest.mark.parametrize("measure", ["corr", "iou", "precision", "recall", "f1"])
def test_a_batch_of_the_wrong_shape_is_refused_before_the_state_changes(measure):
    """corr and the dissection measures took a batch's shapes unchecked: a torch RuntimeError
    half-way through the update (record ids one short, activations one unit too wide) after the
    batch's bounds had gone into the state, where the other measures name the problem first."""
    from deepbase_duck.errors import DeepBaseError

    rng = np.random.default_rng(0)
    hyps = [{"name": "a", "kind": "binary"}, {"name": "b", "kind": "binary"}]
    x = rng.normal(size=(40, 3))
    y = (rng.random((40, 2)) < 0.3).astype(float)
    params = {} if measure == "corr" else {"quantile": 0.1}
    st = measure_class(measure)(3, hyps, **params)
    st.update(torch.tensor(x), torch.tensor(y), torch.arange(40))
    before = st.finalize()
    bad = [(torch.tensor(100 + x), torch.tensor(y), torch.arange(39), "39 record ids for 40 rows"),
           (torch.tensor(np.c_[x, x[:, :1]]), torch.tensor(y), torch.arange(40), "activations of shape (40, 4)"),
           (torch.tensor(x), torch.tensor(np.c_[y, y]), torch.arange(40), "labels of shape (40, 4)")]
    for acts, labels, recs, message in bad:
        with pytest.raises(DeepBaseError, match=rf"{measure}: {re.escape(message)}"):
            st.update(acts, labels, recs)
    assert st.finalize().equals(before)
    # one label column stands for every hypothesis, as in the other measures
    one = measure_class(measure)(3, hyps, **params)
    one.update(torch.tensor(x), torch.tensor(y[:, :1]), torch.arange(40))
    both = measure_class(measure)(3, hyps, **params)
    both.update(torch.tensor(x), torch.tensor(np.c_[y[:, :1], y[:, :1]]), torch.arange(40))
    assert one.finalize().equals(both.finalize())


def test_streamed_probeless_keeps_the_digits_of_units_far_from_zero():
    """Units 1e8 + 1e-3 N(0, 1) with class means 1e-3 apart: the class means were merged as
    absolute values, rounded at every merge to float64's spacing at 1e8 (1.5e-8), so a streamed
    probeless score drifted up to 2e-4 from the one-shot one, its ANOVA p-value 1e-4 from
    scipy's f_oneway, the class means several spacings from their float64 values. Now every
    batching gives the class means rounded once, the score of the exact means and scipy's p."""
    from scipy import stats

    rng = np.random.default_rng(0)
    n = 300
    k = rng.integers(0, 3, n).astype(float)
    x = 1e8 + 1e-3 * (rng.normal(size=(n, 2)) + k[:, None] * [1.0, 0.0])
    hyps = [{"name": "k", "kind": "categorical", "categories": ["a", "b", "c"]}]

    def class_mean(w, c):                      # exact
        v = [Fraction(float(a)) for a in x[k == c, w]]
        return sum(v) / len(v)

    exact = [[class_mean(w, c) for c in range(3)] for w in range(2)]
    means = np.array([[float(m) for m in row] for row in exact])      # rounded once
    # the score of the exact means (their differences, 1e-3, keep every digit: not those of the
    # rounded means, each a spacing of 1e8 away)
    score = [float(sum(abs(m[i] - m[j]) for i in range(3) for j in range(i + 1, 3))) for m in exact]
    p_ref = [stats.f_oneway(*[x[k == c, w] for c in range(3)]).pvalue for w in range(2)]
    for batch in (n, 50, 7):
        t = _streamed("probeless", hyps, x, k[:, None], batch).finalize()
        got = np.array(t.column("class_means").to_pylist())
        np.testing.assert_array_equal(got, means, err_msg=f"batches of {batch}")
        np.testing.assert_allclose(_column(t, "score"), score, rtol=1e-12, err_msg=f"batches of {batch}")
        np.testing.assert_allclose(_column(t, "p_value"), p_ref, rtol=1e-9, err_msg=f"batches of {batch}")




def test_pointbiserial_mean_diff_keeps_its_digits_far_from_zero():
    """mean_diff was m1 - m0 of class means about 0, each rounded to float64's spacing at 1e8
    (1.5e-8): for classes 1e-3 apart it was 1e-5 off (relative); now the difference of the
    offsets, within 1e-12 of the exact difference of the exact class means."""
    rng = np.random.default_rng(3)
    n = 400
    y = (rng.random(n) < 0.4).astype(float)
    x = 1e8 + 1e-3 * (rng.normal(size=(n, 1)) + y[:, None])
    hyps = [{"name": "b", "kind": "binary", "categories": None}]

    def exact_mean(v):
        f = [Fraction(float(a)) for a in v]
        return sum(f) / len(f)
    want = float(exact_mean(x[y == 1, 0]) - exact_mean(x[y == 0, 0]))
    for batch in (n, 50, 7):
        t = _streamed("pointbiserial", hyps, x, y[:, None], batch).finalize()
        got = _column(t, "mean_diff")[0]
        assert got == pytest.approx(want, rel=1e-12), batch
