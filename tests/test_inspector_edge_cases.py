"""Edge cases of the inspector states found by a bug hunt: Wilson ends at a perfect score,
non-finite activations in the probe, permutation p-values of a group-level measure, the
'unknown parameter' message, seeds above 2**32, one-class probes and non-integer CKA widths.
Statistics are checked against independent references (scipy, sklearn, closed forms)."""
import math
import re

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from sklearn.linear_model import LogisticRegression, Ridge

from deepbase_duck.errors import BadParameterError, DeepBaseError
from deepbase_duck.inspectors import MEASURES, measure_class
from deepbase_duck.inspectors.cka import LinearCKAState
from deepbase_duck.inspectors.probes import ProbeState, test_split_mask, wilson_interval
from deepbase_duck.inspectors.significance import measure_score_fn, permutation_p_values
from deepbase_duck.inspectors.spearman import SpearmanState, row_keys

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = [{"name": "h", "kind": "binary"}]


def rows(table, measure):
    return [r for r in table.to_pylist() if r["measure"] == measure]


# ------------------------------------------------------------- #4 Wilson ends at 0 and 1
def wilson_reference(k, n, confidence=0.95):
    """The Wilson interval by its definition: the p in (0, 1) whose score statistic
    (k/n - p)^2 n / (p (1 - p)) equals z^2, one on each side of k/n (brentq); the end is 0 at
    k = 0 and 1 at k = n."""
    z = stats.norm.ppf(0.5 + confidence / 2)
    ph = k / n
    g = lambda p: (ph - p) ** 2 * n / (p * (1 - p)) - z * z   # noqa: E731
    eps = 1e-15
    lo = 0.0 if k == 0 else optimize.brentq(g, eps, ph if k < n else 1 - eps, xtol=1e-15, rtol=1e-15)
    hi = 1.0 if k == n else optimize.brentq(g, ph if k else eps, 1 - eps, xtol=1e-15, rtol=1e-15)
    return lo, hi


def test_wilson_interval_contains_perfect_and_zero_scores():
    for n in range(1, 3000):
        lo, hi = wilson_interval(n, n)
        assert hi == 1.0 and lo <= 1.0, (n, lo, hi)
        lo, hi = wilson_interval(0, n)
        assert lo == 0.0 and hi >= 0.0, (n, lo, hi)
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 500))
        k = int(rng.integers(0, n + 1))
        conf = float(rng.choice([0.8, 0.9, 0.95, 0.99]))
        lo, hi = wilson_interval(k, n, conf)
        assert lo <= k / n <= hi
        rl, rh = wilson_reference(k, n, conf)
        assert abs(lo - rl) < 1e-9 and abs(hi - rh) < 1e-9, (k, n, conf, lo, hi, rl, rh)


def test_probe_perfect_accuracy_interval_contains_score():
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(0, 1, (n, 3)).astype(np.float32)
    x[:, 0] += np.sign(x[:, 0]) * 2                         # separable with a wide margin
    y = (x[:, 0] > 0).astype(float)[:, None]
    st = ProbeState(3, BIN, topk=(1,))
    st.update(torch.tensor(x), torch.tensor(y), torch.arange(n) // 4)
    t = st.finalize()
    for r in rows(t, "probe") + rows(t, "probe_topk"):
        assert r["score"] == 1.0
        assert r["ci_low"] <= r["score"] <= r["ci_high"], r
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_reference(r["n"], r["n"]), abs=1e-12)


# ------------------------------------------------------ #5 non-finite activations (probe)
def _probe_data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    x = np.stack([y + rng.normal(0, 0.7, n), rng.normal(0, 1, n), y + rng.normal(0, 0.7, n)], 1)
    return x, y[:, None], torch.arange(n) // 3


def _sklearn_accuracy(x, y, rec, cols, l2=1e-3):
    """Held-out accuracy of sklearn's binomial logistic regression on standardised ``cols``,
    the probe's split and penalty (C = 2 / (n_train l2))."""
    te = test_split_mask(rec.numpy(), 0, 0.2)
    xtr, xte = x[~te][:, cols], x[te][:, cols]
    mu, sd = xtr.mean(0), xtr.std(0)
    clf = LogisticRegression(C=2 / (len(xtr) * l2), tol=1e-10, max_iter=10_000)
    clf.fit((xtr - mu) / sd, y[~te, 0])
    return float((clf.predict((xte - mu) / sd) == y[te, 0]).mean()), int(te.sum())


def test_probe_leaves_out_units_with_nan_or_inf_activations():
    x, y, rec = _probe_data()
    bad = x.copy()
    bad[5, 1] = np.nan                    # unit 1: one NaN
    bad[7, 2] = np.inf                    # unit 2: one inf
    st = ProbeState(3, BIN, topk=(1, 3))
    st.update(torch.tensor(bad), torch.tensor(y), rec)
    t = st.finalize()
    # the probe of unit 0 alone, the only finite unit
    ref = ProbeState(1, BIN, topk=())
    ref.update(torch.tensor(x[:, :1]), torch.tensor(y), rec)
    r, rr = rows(t, "probe")[0], rows(ref.finalize(), "probe")[0]
    assert r["score"] == pytest.approx(rr["score"], abs=1e-12)
    for c in ("ci_low", "ci_high", "p_value", "macro_f1", "n_train", "n_test"):
        assert r[c] == pytest.approx(rr[c], abs=1e-12), c
    acc, n_test = _sklearn_accuracy(x, y, rec, [0])
    assert abs(r["score"] - acc) <= 1 / n_test + 1e-12          # a borderline row at most
    # the probe's weights: unit 0 carries all of it, the others are NULL (as corr's NaN units)
    w = {q["unit"]: q for q in rows(t, "probe_weight")}
    assert w[0]["score"] == pytest.approx(1.0) and w[0]["rank"] == 1
    for u in (1, 2):
        assert w[u]["score"] is None and w[u]["rank"] is None
    fits = st.fit()["fits"][0]["W"]
    assert bool((fits[1:] == 0).all())
    # top-k re-fits use finite units only: k = 1 and k = 3 both reproduce the unit-0 probe
    for q in rows(t, "probe_topk"):
        assert q["score"] == pytest.approx(rr["score"], abs=1e-12), q["k"]
    # the held-out loss of the model is defined
    loss = st.heldout_loss(st.probe_model())["h"]
    assert math.isfinite(loss)


def test_probe_nonfinite_units_streamed_and_merged():
    x, y, rec = _probe_data()
    bad = x.copy()
    bad[450, 2] = -np.inf                 # in the second state's rows only
    a = ProbeState(3, BIN, topk=())
    b = ProbeState(3, BIN, topk=())
    a.update(torch.tensor(bad[:300]), torch.tensor(y[:300]), rec[:300])
    b.update(torch.tensor(bad[300:]), torch.tensor(y[300:]), rec[300:])
    t = a.combine(b).finalize()
    ref = ProbeState(2, BIN, topk=())
    ref.update(torch.tensor(x[:, :2]), torch.tensor(y), rec)
    assert rows(t, "probe")[0]["score"] == pytest.approx(rows(ref.finalize(), "probe")[0]["score"], abs=1e-12)
    w = {q["unit"]: q for q in rows(t, "probe_weight")}
    assert w[2]["score"] is None and w[2]["rank"] is None
    assert sorted([w[0]["rank"], w[1]["rank"]]) == [1, 2]
    # a value beyond float32's range is infinite in the probe's float32 sample: left out too
    big = x.copy()
    big[3, 1] = 1e300
    st = ProbeState(3, BIN, topk=())
    st.update(torch.tensor(big, dtype=torch.float64), torch.tensor(y), rec)
    assert {q["unit"]: q["score"] for q in rows(st.finalize(), "probe_weight")}[1] is None


def test_probe_all_units_nonfinite_gives_null_scores():
    x, y, rec = _probe_data()
    x[0, :] = np.nan
    st = ProbeState(3, BIN, topk=(1,))
    st.update(torch.tensor(x), torch.tensor(y), rec)
    t = st.finalize()
    for r in rows(t, "probe") + rows(t, "probe_topk"):
        for c in ("score", "ci_low", "ci_high", "p_value", "macro_f1"):
            assert r[c] is None, (r["measure"], c)
    assert all(q["score"] is None for q in rows(t, "probe_weight"))


def test_probe_ridge_head_leaves_out_nonfinite_units():
    rng = np.random.default_rng(1)
    n = 500
    x = rng.normal(0, 1, (n, 3))
    yc = 2 * x[:, 0] - x[:, 2] + rng.normal(0, 0.5, n)
    bad = x.copy()
    bad[11, 1] = np.nan
    rec = torch.arange(n) // 2
    H = [{"name": "c", "kind": "continuous"}]
    for alpha in (0.0, 3.0):
        st = ProbeState(3, H, topk=(), ridge_alpha=alpha)
        st.update(torch.tensor(bad), torch.tensor(yc[:, None]), rec)
        r = rows(st.finalize(), "probe")[0]
        # sklearn's Ridge on the finite units 0 and 2, standardised by the train split
        te = test_split_mask(rec.numpy(), 0, 0.2)
        xtr, xte = x[~te][:, [0, 2]], x[te][:, [0, 2]]
        mu, sd = xtr.mean(0), xtr.std(0)
        m = Ridge(alpha=alpha).fit((xtr - mu) / sd, yc[~te])
        pred = m.predict((xte - mu) / sd)
        r2 = 1 - ((yc[te] - pred) ** 2).sum() / ((yc[te] - yc[te].mean()) ** 2).sum()
        assert r["score"] == pytest.approx(r2, abs=1e-6), alpha


# ------------------------------------------ #6 permutation p-values: probe, n_permutations
def test_permutation_p_values_refuses_group_level_measure():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (200, 3))
    y = (x[:, :1] > 0).astype(float)
    with pytest.raises(DeepBaseError, match=r"'probe'.*unit"):
        permutation_p_values(x, y, "probe", 5, hypotheses=BIN)
    with pytest.raises(DeepBaseError, match=r"'probe'.*unit"):
        measure_score_fn("probe", BIN)
    # unit-level measures still work
    p = permutation_p_values(x, y, "corr", 20, hypotheses=BIN)
    assert p.shape == (3, 1) and p[0, 0] == pytest.approx(1 / 21)


@pytest.mark.parametrize("bad", [1.7, "3", 0, -2, True, None, float("nan")])
def test_permutation_p_values_checks_n_permutations(bad):
    x = np.random.default_rng(0).normal(0, 1, (50, 2))
    y = (x[:, :1] > 0).astype(float)
    with pytest.raises(BadParameterError, match="n_permutations"):
        permutation_p_values(x, y, "corr", bad, hypotheses=BIN)


def test_permutation_p_values_whole_float_n_permutations():
    x = np.random.default_rng(0).normal(0, 1, (50, 2))
    y = (x[:, :1] > 0).astype(float)
    a = permutation_p_values(x, y, "corr", 3.0, hypotheses=BIN)
    b = permutation_p_values(x, y, "corr", 3, hypotheses=BIN)
    assert np.array_equal(a, b)


# --------------------------------------------------- #7 'unknown parameter' valid names
@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_unknown_parameter_lists_only_real_parameters(measure):
    cls = measure_class(measure)
    hyp = [{"name": "h", "kind": cls.accepts[0], "categories": ["a", "b"]}]
    with pytest.raises(DeepBaseError, match="unknown parameter") as e:
        cls(2, hyp, bogus=1)
    valid = re.search(r"valid: (.*)$", str(e.value)).group(1).split(", ")
    for fake in ("args", "kwargs", "params", "self", "width", "hypotheses", "device"):
        assert fake not in valid, (measure, valid)
    import inspect
    own = {p.name for c in cls.__mro__ if c is not object and "__init__" in vars(c)
           for p in inspect.signature(c.__init__).parameters.values()
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "width", "hypotheses", "device"}
    assert set(valid) == (own or {"(none)"})
    for name in valid:                   # each listed name is accepted as a keyword ...
        assert name in own
    with pytest.raises(DeepBaseError, match="unknown parameter"):   # ... and 'args' is not
        cls(2, hyp, args=1)


# ------------------------------------------------------------ #8 seeds above 2**32
def _keys_input():
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7 - 0.5
    y = torch.tensor([[0.], [1.], [float("nan")], [1.]])
    return x, y, torch.tensor([0, 0, 1, 2])


# row_keys of _keys_input() before seeds above 2**32 were mixed in: seeds in 0..2**32-1 keep them
# (stored samples depend on them)
_STORED_KEYS = {
    0: ([3982108093173644340, 9120302135377244520, 1785952381062637114, 6112883169893742344],
        [3090808961417023941, 1625196027447091300, 4445966187718693731, 1414895568363577910]),
    1: ([3717106687854308823, 3866581799659809475, 7631448971223663369, 6700835285241969219],
        [5591329721922338788, 8544296393750702002, 735787489654017780, 3916136883022109063]),
    12345: ([5923803327572997563, 7454630175734205243, 8665925703266006315, 8836522379198165032],
            [497618923127070835, 2701363119265453363, 1538872002288249795, 6887244539013710886]),
    2**32 - 1: ([4150110683683383999, 6494622339190313380, 2666333667698561709, 5681482975670968922],
                [2088810247784990163, 834819530896743167, 9197081893472494864, 2625688367913427433]),
}


def test_row_keys_unchanged_for_32_bit_seeds():
    x, y, rec = _keys_input()
    for seed, (with_rec, without) in _STORED_KEYS.items():
        assert row_keys(x, y, rec, seed).tolist() == with_rec, seed
        assert row_keys(x, y, None, seed).tolist() == without, seed


def test_row_keys_use_every_bit_of_the_seed():
    x, y, rec = _keys_input()
    seeds = [0, 1, 5, 2**32 - 1, 2**32, 2**32 + 1, 2**32 + 5, 2**33, 2**64, 2**64 + 5, 2**70 + 1]
    keys = {s: tuple(row_keys(x, y, rec, s).tolist()) for s in seeds}
    assert len(set(keys.values())) == len(seeds), keys
    with pytest.raises(BadParameterError, match="seed"):
        row_keys(x, y, rec, -1)


def test_spearman_and_ap_samples_differ_for_seeds_equal_mod_2_32():
    torch.manual_seed(0)
    x, y, rec = torch.randn(1000, 2), torch.randn(1000, 1), torch.arange(1000) // 10
    yb = (y > 0).to(torch.float64)
    for measure, lab, H in (("spearman", y, [{"name": "h", "kind": "continuous"}]), ("ap", yb, BIN)):
        kept = {}
        for seed in (0, 1, 2**32, 2**32 + 1):
            s = measure_class(measure)(2, H, max_rows=50, seed=seed)
            s.update(x, lab, rec)
            kept[seed] = sorted(s.sample.keys.tolist())
        assert kept[0] != kept[2**32] and kept[1] != kept[2**32 + 1] and kept[0] != kept[1], measure
    # the same seed still gives the same sample
    a, b = SpearmanState(2, [{"name": "h", "kind": "continuous"}], max_rows=50, seed=2**40), \
        SpearmanState(2, [{"name": "h", "kind": "continuous"}], max_rows=50, seed=2**40)
    a.update(x, y, rec)
    b.update(x[:500], y[:500], rec[:500])
    b.update(x[500:], y[500:], rec[500:])
    assert sorted(a.sample.keys.tolist()) == sorted(b.sample.keys.tolist())


# ------------------------------------------------------ #9 one-class probe hypotheses
@pytest.mark.parametrize("min_per_class", [5, 0])
def test_probe_binary_one_class_is_refused(min_per_class):
    x, rec = torch.randn(400, 3), torch.arange(400) // 4
    for value, cls_name in ((0.0, "0"), (1.0, "1")):
        st = ProbeState(3, BIN, topk=(), min_per_class=min_per_class)
        st.update(x, torch.full((400, 1), value, dtype=torch.float64), rec)
        with pytest.raises(DeepBaseError, match=rf"'h' has a single class {cls_name}\b.*needs two"):
            st.finalize()
    # the same message as a categorical hypothesis with one class
    st = ProbeState(3, [{"name": "c", "kind": "categorical", "categories": ["a", "b"]}], topk=(),
                    min_per_class=min_per_class)
    st.update(x, torch.zeros(400, 1, dtype=torch.float64), rec)
    with pytest.raises(DeepBaseError, match=r"'c' has a single class 'a'.*needs two"):
        st.finalize()


def test_probe_one_class_in_the_train_split_is_refused():
    n = 400
    x, rec = torch.randn(n, 3), torch.arange(n) // 4
    te = torch.as_tensor(test_split_mask(rec.numpy(), 0, 0.2))
    y = torch.zeros(n, 1, dtype=torch.float64)
    y[te.nonzero()[:5, 0], 0] = 1.0       # class 1 only in the test split
    st = ProbeState(3, BIN, topk=(), min_per_class=0)
    st.update(x, y, rec)
    with pytest.raises(DeepBaseError, match=r"'h'.*single class 0 in its training rows"):
        st.finalize()
    with pytest.raises(DeepBaseError, match=r"single class"):
        st.probe_model()


def test_probe_without_labels_is_refused_clearly():
    x, rec = torch.randn(100, 3), torch.arange(100)
    for H in (BIN, [{"name": "h", "kind": "categorical", "categories": ["a", "b"]}]):
        st = ProbeState(3, H, topk=(), min_per_class=0)
        st.update(x, torch.full((100, 1), float("nan"), dtype=torch.float64), rec)
        with pytest.raises(DeepBaseError, match=r"'h' has no labelled rows"):
            st.finalize()


def test_probe_two_classes_still_trained_with_min_per_class_zero():
    x, y, rec = _probe_data()
    st = ProbeState(3, BIN, topk=(), min_per_class=0)
    st.update(torch.tensor(x), torch.tensor(y), rec)
    r = rows(st.finalize(), "probe")[0]
    acc, n_test = _sklearn_accuracy(x, y, rec, [0, 1, 2])
    assert abs(r["score"] - acc) <= 1 / n_test + 1e-12


# ------------------------------------------------------------- #10 CKA widths
@pytest.mark.parametrize("wx, wy", [(2.5, 2), (2, 2.5), ("2", 2), (True, 2), (0, 2), (2, -1), (None, 2)])
def test_cka_refuses_non_integer_widths(wx, wy):
    with pytest.raises(DeepBaseError, match="cka: width_[xy]"):
        LinearCKAState(wx, wy)


def test_cka_whole_float_width_accepted():
    st = LinearCKAState(2.0, np.int64(3))
    assert (st.width_x, st.width_y) == (2, 3) and type(st.width_x) is int
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 2)), rng.normal(size=(40, 3))
    st.update(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    K, L = xc @ xc.T, yc @ yc.T                          # HSIC reference with linear kernels
    assert st.finalize() == pytest.approx((K * L).sum() / math.sqrt((K * K).sum() * (L * L).sum()), abs=1e-12)
