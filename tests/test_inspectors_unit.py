"""Unit-level measures: spearman, pointbiserial, probeless, mi, iou/precision/recall/f1, ap, and
the significance helpers, checked against independent references (scipy, sklearn, numpy)."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import average_precision_score, mutual_info_score

from deepbase_duck.errors import DeepBaseError, HypothesisError
from deepbase_duck.inspectors import MEASURES, SCORE_SCHEMA, measure_class
from deepbase_duck.inspectors.dissection import quantile_positions
from deepbase_duck.inspectors.mutual_information import quantile_edges
from deepbase_duck.inspectors.significance import benjamini_hochberg, permutation_p_values
from deepbase_duck.inspectors.spearman import average_ranks, row_keys

TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- helpers
def grid(table, col="score"):
    """(W, H) array of a column of a finalize() table (NULL -> NaN), hypotheses in table order."""
    d = table.to_pydict()
    names = list(dict.fromkeys(d["hypothesis"]))
    W = max(d["unit"]) + 1
    out = np.full((W, len(names)), np.nan)
    for u, h, v in zip(d["unit"], d["hypothesis"], d[col]):
        out[u, names.index(h)] = np.nan if v is None else v
    return out


def run(measure, x, y, hyps, splits=None, **params):
    """One state fed in batches (``splits`` = batch boundaries) or one shot."""
    cls = measure_class(measure)
    st = cls(x.shape[1], hyps, **params)
    bounds = [0] + list(splits or []) + [len(x)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        st.update(torch.as_tensor(x[a:b]), torch.as_tensor(y[a:b]))
    return st


def run_merged(measure, x, y, hyps, parts, **params):
    """Several states over consecutive uneven slices (each streamed in two batches), combined."""
    cls = measure_class(measure)
    bounds = [0] + list(parts) + [len(x)]
    states = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        st = cls(x.shape[1], hyps, **params)
        mid = a + (b - a) // 3
        for s, e in ((a, mid), (mid, b)):
            st.update(torch.as_tensor(x[s:e]), torch.as_tensor(y[s:e]))
        states.append(st)
    first = states[0]
    for st in states[1:]:
        first.combine(st)
    return first


def assert_close(a, b, tol=TOL):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b)), (a, b)
    m = ~np.isnan(a)
    assert np.allclose(a[m], b[m], rtol=tol, atol=tol), np.abs(a[m] - b[m]).max()


def check_schema(table):
    assert table.schema.names[:len(SCORE_SCHEMA)] == SCORE_SCHEMA.names
    for f in SCORE_SCHEMA:
        assert table.schema.field(f.name).type == f.type


BIN = [dict(name="b1", kind="binary"), dict(name="b2", kind="binary")]
CONT = [dict(name="c1", kind="continuous"), dict(name="b1", kind="binary")]
CAT = [dict(name="cat", kind="categorical", categories=["a", "b", "c", "d"]), dict(name="b1", kind="binary")]


@pytest.fixture(scope="module")
def data():
    """Random activations with a planted unit 0 per hypothesis family, a constant unit 2, a unit 3
    with heavy ties, and NaN labels."""
    rng = np.random.default_rng(7)
    n, W = 4000, 6
    x = rng.normal(size=(n, W)).astype(np.float32)
    b1 = (rng.random(n) < 0.2).astype(np.float64)
    b2 = (rng.random(n) < 0.4).astype(np.float64)
    c1 = rng.normal(size=n)
    cat = rng.integers(0, 3, n).astype(np.float64)           # category 'd' (3) never occurs
    x[:, 2] = 0.5                                            # constant unit
    x[:, 3] = np.round(x[:, 3])                              # heavy ties
    x[:, 0] = (np.tanh(c1) + 2.5 * b1 + 0.3 * rng.normal(size=n)).astype(np.float32)
    b2[rng.random(n) < 0.15] = np.nan
    c1[rng.random(n) < 0.1] = np.nan
    cat[rng.random(n) < 0.1] = np.nan
    return dict(x=x, b=np.stack([b1, b2], 1), cont=np.stack([c1, b1], 1), cat=np.stack([cat, b1], 1))


def test_measures_registered():
    for name in ("spearman", "pointbiserial", "probeless", "mi", "iou", "precision", "recall", "f1", "ap"):
        assert name in MEASURES and MEASURES[name].measure == name


# ------------------------------------------------------------------------------- spearman
def test_spearman_matches_scipy(data):
    x, y = data["x"], data["cont"]
    st = run("spearman", x, y, CONT, splits=[700, 2500])
    t = st.finalize()
    check_schema(t)
    r, p, n = grid(t), grid(t, "p_value"), grid(t, "n")
    for w in range(x.shape[1]):
        for h in range(y.shape[1]):
            m = ~np.isnan(y[:, h])
            assert n[w, h] == m.sum()                                        # NaN labels excluded
            if w == 2:
                assert np.isnan(r[w, h]) and np.isnan(p[w, h])              # constant unit -> NULL
                continue
            ref = stats.spearmanr(x[m, w], y[m, h])
            assert abs(r[w, h] - ref.statistic) < 1e-9
            assert abs(p[w, h] - ref.pvalue) < 1e-9
    # CI: Fisher z with the Bonett-Wright variance
    lo, hi = grid(t, "ci_low"), grid(t, "ci_high")
    z = stats.norm.ppf(0.975)
    se = np.sqrt((1 + r[0, 0] ** 2 / 2) / (n[0, 0] - 3))
    assert abs(lo[0, 0] - np.tanh(np.arctanh(r[0, 0]) - z * se)) < 1e-12
    assert abs(hi[0, 0] - np.tanh(np.arctanh(r[0, 0]) + z * se)) < 1e-12
    assert 0 < st.max_error() < 0.1
    # planted: unit 0 (monotone in c1 up to noise) ranks first on c1
    assert np.nanargmax(np.abs(r[:, 0])) == 0


def test_average_ranks_matches_scipy():
    rng = np.random.default_rng(1)
    v = rng.integers(0, 5, size=(50, 3)).astype(np.float64)
    ours = average_ranks(torch.as_tensor(v)).numpy()
    assert np.array_equal(ours, stats.rankdata(v, axis=0))


def test_row_keys():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(3000, 5)).astype(np.float32))
    y = torch.as_tensor(np.where(rng.random((3000, 2)) < 0.1, np.nan, rng.integers(0, 2, (3000, 2))))
    rec = torch.arange(3000) // 7
    k = row_keys(x, y, rec, seed=1)
    cuts = ((0, 5), (5, 1234), (1234, 3000))
    parts = torch.cat([row_keys(x[a:b], y[a:b], rec[a:b], seed=1) for a, b in cuts])
    assert torch.equal(k, parts)                                  # a function of the row alone
    assert len(set(k.tolist())) == 3000 and int(k.min()) >= 0
    assert not torch.equal(k, row_keys(x, y, rec, seed=2))
    same = torch.zeros(4, 5)                                      # identical rows, different records
    ks = row_keys(same, torch.zeros(4, 1, dtype=torch.float64), torch.arange(4))
    assert len(set(ks.tolist())) == 4
    counts = np.histogram(k.numpy() / 2.0 ** 63, bins=10, range=(0, 1))[0]
    assert stats.chisquare(counts).pvalue > 1e-4                  # uniform


def test_spearman_merge_and_subsample(data):
    x, y = data["x"], data["cont"]
    one = grid(run("spearman", x, y, CONT).finalize())
    merged = grid(run_merged("spearman", x, y, CONT, parts=[300, 1900, 2100]).finalize())
    assert_close(merged, one, 1e-12)
    # a sample smaller than the stream: the same rows are kept however the stream is split
    small = dict(max_rows=1500, seed=3)
    st_one = run("spearman", x, y, CONT, **small)
    st_m = run_merged("spearman", x, y, CONT, parts=[1000, 1700], **small)
    assert not st_one.exact and len(st_one.sample) == 1500
    assert torch.equal(torch.sort(st_one.sample.keys).values, torch.sort(st_m.sample.keys).values)
    t1, tm = st_one.finalize(), st_m.finalize()
    assert_close(grid(tm), grid(t1), 1e-12)
    # ... and it is the bottom-1500 keys: exact Spearman on exactly those rows
    keys = row_keys(torch.as_tensor(x), torch.as_tensor(y), None, seed=3).numpy()
    rows = np.argsort(keys, kind="stable")[:1500]
    m = ~np.isnan(y[rows, 0])
    ref = stats.spearmanr(x[rows][m, 0], y[rows][m, 0]).statistic
    assert abs(grid(t1)[0, 0] - ref) < 1e-9
    assert grid(t1, "n_sample")[0, 0] == m.sum() and grid(t1, "n")[0, 0] == (~np.isnan(y[:, 0])).sum()
    # the full-stream value lies in the sample's interval
    lo, hi = grid(t1, "ci_low")[0, 0], grid(t1, "ci_high")[0, 0]
    assert lo <= one[0, 0] <= hi


def test_spearman_interval_holds_a_perfect_rho():
    """At rho = +-1 the Fisher interval's outer end rounds to just inside +-1: it must still hold
    the score (the outer end is the score), the inner end is the Bonett-Wright formula."""
    x = np.arange(100, dtype=np.float32)[:, None]
    z, se = stats.norm.ppf(0.975), math.sqrt(1.5 / 97)
    for sign in (1, -1):
        t = run("spearman", x, sign * np.arange(100.0)[:, None], CONT[:1]).finalize().to_pylist()[0]
        assert t["score"] == sign
        assert t["ci_low"] <= t["score"] <= t["ci_high"]
        outer, inner = (t["ci_high"], t["ci_low"]) if sign > 0 else (t["ci_low"], t["ci_high"])
        assert outer == sign
        assert inner == pytest.approx(sign * math.tanh(math.atanh(1 - 1e-15) - z * se), abs=1e-12)


@pytest.mark.parametrize("measure,hyps,key", [("spearman", CONT, "cont"), ("ap", BIN, "b")])
def test_sampled_measures_null_a_unit_with_nonfinite_activations_as_corr(data, measure, hyps, key):
    """A NaN or infinite activation anywhere in the stream (in the row sample or not, in any state
    of a merge) makes that unit NULL, as corr does; the other units are unchanged."""
    x, y = data["x"].copy(), data[key]
    clean = grid(run(measure, x, y, hyps).finalize())
    x[17, 1], x[3000, 4] = np.nan, np.inf
    corr = grid(run("corr", x, y, hyps).finalize())
    for st in (run(measure, x, y, hyps, splits=[1000]), run_merged(measure, x, y, hyps, parts=[2000, 2500])):
        t = st.finalize()
        for col in ("score", "ci_low", "ci_high", "p_value"):
            assert np.isnan(grid(t, col)[[1, 4]]).all(), col
        assert np.array_equal(np.isnan(grid(t)), np.isnan(corr) | np.isnan(clean))
        assert_close(grid(t)[[0, 3, 5]], clean[[0, 3, 5]], 1e-12)
    # a row sample that leaves the NaN row out still knows of it
    keys = row_keys(torch.as_tensor(x), torch.as_tensor(y), None, seed=1).numpy()
    assert np.argsort(np.argsort(keys))[17] >= 500              # row 17 is not among the 500 kept
    small = run(measure, x, y, hyps, max_rows=500, seed=1).finalize()
    assert np.isnan(grid(small)[1]).all() and not np.isnan(grid(small)[0]).any()
    if measure == "spearman":                                    # scipy on the clean rows
        m = ~np.isnan(y[:, 0])
        assert abs(grid(t)[3, 0] - stats.spearmanr(x[m, 3], y[m, 0]).statistic) < 1e-9


# --------------------------------------------------------------------------- pointbiserial
def test_pointbiserial_matches_scipy(data):
    x, y = data["x"], data["b"]
    t = run("pointbiserial", x, y, BIN, splits=[1234]).finalize()
    check_schema(t)
    r, p = grid(t), grid(t, "p_value")
    m1, m0 = grid(t, "mean_1"), grid(t, "mean_0")
    for w in range(x.shape[1]):
        for h in range(2):
            m = ~np.isnan(y[:, h])
            xs, ys = x[m, w].astype(np.float64), y[m, h]
            assert abs(m1[w, h] - xs[ys == 1].mean()) < 1e-9 and abs(m0[w, h] - xs[ys == 0].mean()) < 1e-9
            if w == 2:
                assert np.isnan(r[w, h])
                continue
            ref = stats.pointbiserialr(ys, xs)
            assert abs(r[w, h] - ref.statistic) < 1e-9
            assert abs(p[w, h] - ref.pvalue) < 1e-9 * max(1.0, ref.pvalue) or p[w, h] < 1e-300
    assert np.nanargmax(np.abs(r[:, 0])) == 0
    assert np.array_equal(grid(t, "n")[0], [len(x), (~np.isnan(y[:, 1])).sum()])


def test_pointbiserial_merge(data):
    x, y = data["x"], data["b"]
    one = run("pointbiserial", x, y, BIN).finalize()
    merged = run_merged("pointbiserial", x, y, BIN, parts=[50, 2000, 2001]).finalize()
    for col in ("score", "p_value", "ci_low", "ci_high", "mean_1", "mean_0"):
        assert_close(grid(merged, col), grid(one, col), 1e-9)


def test_pointbiserial_rejects_categorical():
    with pytest.raises(DeepBaseError, match="pointbiserial.*'cat'"):
        measure_class("pointbiserial")(3, CAT)


# ------------------------------------------------------------------------------- probeless
def test_probeless_matches_direct_formula(data):
    x, y = data["x"], data["cat"]
    st = run("probeless", x, y, CAT, splits=[999, 3000])
    t = st.finalize()
    check_schema(t)
    s, p, rank = grid(t), grid(t, "p_value"), grid(t, "rank")
    means = t.column("class_means").to_pylist()
    for w in range(x.shape[1]):
        for h, K in ((0, 4), (1, 2)):
            m = ~np.isnan(y[:, h])
            xs, ys = x[m, w].astype(np.float64), y[m, h]
            cls = [c for c in range(K) if (ys == c).any()]
            mu = [xs[ys == c].mean() for c in cls]
            row = means[w * 2 + h]
            assert len(row) == K
            if h == 0:
                assert row[3] is None                               # empty category 'd'
            assert np.allclose([row[c] for c in cls], mu, atol=1e-9)
            if w == 2:
                assert np.isnan(s[w, h]) and np.isnan(rank[w, h])
                continue
            ref = sum(abs(a - b) for a, b in itertools.combinations(mu, 2))
            assert abs(s[w, h] - ref) < 1e-9
            fo = stats.f_oneway(*[xs[ys == c] for c in cls]).pvalue
            assert abs(p[w, h] - fo) < 1e-9
            assert grid(t, "ci_low")[w, h] <= s[w, h] <= grid(t, "ci_high")[w, h]
    # planted: unit 0's class means differ on b1
    assert np.nanargmax(s[:, 1]) == 0 and rank[0, 1] == 1
    assert 0 < st.max_error() < math.inf


def test_probeless_planted_categorical_and_merge(data):
    rng = np.random.default_rng(3)
    x = data["x"].copy()
    y = data["cat"]
    x[:, 4] = np.where(np.isnan(y[:, 0]), 0, y[:, 0]) * 1.5 + rng.normal(size=len(x)) * 0.5
    one = run("probeless", x, y, CAT).finalize()
    assert np.nanargmax(grid(one)[:, 0]) == 4
    merged = run_merged("probeless", x, y, CAT, parts=[10, 1111, 3999]).finalize()
    for col in ("score", "p_value", "ci_low", "ci_high"):
        assert_close(grid(merged, col), grid(one, col), 1e-9)
    def cm(t):
        rows = t.column("class_means").to_pylist()
        return np.array([np.nan if v is None else v for row in rows for v in row])

    assert_close(cm(merged), cm(one), 1e-9)


def test_probeless_rejects_bad_code_and_continuous():
    st = measure_class("probeless")(2, CAT)
    with pytest.raises(HypothesisError, match="'cat'"):
        st.update(torch.zeros(3, 2), torch.tensor([[0.0, 1.0], [4.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    with pytest.raises(DeepBaseError, match="probeless.*'c1'"):
        measure_class("probeless")(2, CONT)


# ------------------------------------------------------------------------------------ mi
def test_mi_matches_sklearn(data):
    x, y = data["x"], data["cat"]
    st = run("mi", x, y, CAT, splits=[600, 1700], calibration_rows=2500)
    t = st.finalize()
    check_schema(t)
    edges = st.bin_edges()
    # edges: the deciles of the first 2500 rows (numpy 'linear' quantiles)
    ref_edges = np.quantile(x[:2500].astype(np.float64), np.arange(1, 10) / 10, axis=0).T
    assert np.allclose(edges, ref_edges, rtol=0, atol=1e-12)
    mi, n, mm = grid(t), grid(t, "n"), grid(t, "mi_miller_madow")
    for w in range(x.shape[1]):
        b = np.searchsorted(edges[w], x[:, w].astype(np.float64), side="right")
        for h in range(2):
            m = ~np.isnan(y[:, h])
            assert n[w, h] == m.sum()
            if w == 2:
                assert np.isnan(mi[w, h])                            # constant unit: one bin
                continue
            ref = mutual_info_score(y[m, h], b[m])
            assert abs(mi[w, h] - ref) < 1e-9
            assert mm[w, h] <= mi[w, h]
    assert set(t.column("bin_rule").to_pylist()) == {"quantile (10 bins) of the first 2500 rows"}
    assert grid(t, "bins")[3, 0] < 10                               # tied edges of the rounded unit
    assert np.nanargmax(mi[:, 1]) == 0
    # p-value: Pearson's chi-square test of independence on the bins x classes table
    w = 1
    b = np.searchsorted(edges[w], x[:, w].astype(np.float64), side="right")
    m = ~np.isnan(y[:, 0])
    g = stats.chi2_contingency(stats.contingency.crosstab(y[m, 0], b[m]).count, correction=False)
    assert abs(grid(t, "p_value")[w, 0] - g.pvalue) < 1e-9
    assert 0 < st.max_error() < 0.2


def test_mi_planted_categorical_unit(data):
    x, y = data["x"].copy(), data["cat"].copy()
    # unit 5's quantile bins determine the label: label = bin // 4 (3 classes)
    e = quantile_edges(torch.as_tensor(x[:, 5:6]), 10).numpy()[0]
    binned = np.searchsorted(e, x[:, 5].astype(np.float64), side="right")
    y[:, 0] = np.where(np.isnan(y[:, 0]), np.nan, binned // 4)
    t = run("mi", x, y, CAT, calibration_rows=len(x)).finalize()
    mi = grid(t)[:, 0]
    assert np.nanargmax(mi) == 5
    m = ~np.isnan(y[:, 0])
    pk = np.bincount(y[m, 0].astype(int)) / m.sum()
    assert abs(mi[5] - (-(pk * np.log(pk)).sum())) < 1e-9          # MI = H(label)


def test_mi_merge(data):
    x, y = data["x"], data["cat"]
    kw = dict(calibration_rows=1500)
    one = run("mi", x, y, CAT, **kw)
    # a calibrated state, a state sharing its edges, an uncalibrated tail state
    a = run("mi", x[:1700], y[:1700], CAT, splits=[500], **kw)
    b = a.empty_like()
    b.update(torch.as_tensor(x[1700:3100]), torch.as_tensor(y[1700:3100]))
    c = run("mi", x[3100:], y[3100:], CAT, **kw)
    assert c.edges is None
    merged = a.combine(b).combine(c)
    for col in ("score", "p_value", "ci_low", "ci_high", "n"):
        assert_close(grid(merged.finalize(), col), grid(one.finalize(), col), 1e-9)
    # two uncalibrated states: buffers joined, calibrated on the first rows of the union
    kw2 = dict(calibration_rows=3000)
    u1 = run("mi", x[:1200], y[:1200], CAT, **kw2)
    u2 = run("mi", x[1200:2500], y[1200:2500], CAT, **kw2)
    u3 = run("mi", x[2500:], y[2500:], CAT, **kw2)
    merged2 = u1.combine(u2).combine(u3)
    assert_close(grid(merged2.finalize()), grid(run("mi", x, y, CAT, **kw2).finalize()), 1e-9)
    # differently calibrated states: approximate merge, flagged, close to the one-shot score
    p = run("mi", x[:2000], y[:2000], CAT, **kw)
    q = run("mi", x[2000:], y[2000:], CAT, **kw)
    tp = p.combine(q).finalize()
    assert "approximate merge of 2000 rows" in tp.column("bin_rule")[0].as_py()
    assert np.array_equal(grid(tp, "n"), grid(one.finalize(), "n"))
    assert abs(grid(tp)[0, 1] - grid(one.finalize())[0, 1]) < 0.02


def test_mi_calibration_records_fix_the_edges_whatever_the_order(data):
    """With calibration_records the edges are the quantiles of those records' rows, whatever
    the record order and batching of the stream (the engines scan them first)."""
    x, y = data["x"], data["cat"]
    rec = np.arange(len(x)) // 37
    cal = [3, 50, 77, 101]
    need = int(np.isin(rec, cal).sum())
    kw = dict(calibration_rows=need, calibration_records=cal)
    order = np.concatenate([np.flatnonzero(rec == r) for r in np.random.default_rng(1).permutation(rec.max() + 1)])
    tables = []
    for idx, step in ((np.arange(len(x)), 500), (order, 128)):
        st = measure_class("mi")(x.shape[1], CAT, **kw)
        for a in range(0, len(idx), step):
            i = idx[a:a + step]
            st.update(torch.as_tensor(x[i]), torch.as_tensor(y[i]), torch.as_tensor(rec[i]))
        assert st.edges is not None
        ref = np.quantile(x[np.isin(rec, cal)].astype(np.float64), np.arange(1, 10) / 10, axis=0).T
        e = st.bin_edges()
        ok = np.diff(ref, axis=1) > 0                      # (tied edges move to the next float)
        assert np.allclose(e[:, 1:][ok], ref[:, 1:][ok], rtol=0, atol=1e-12)
        assert "148 rows of 4 calibration records" in st.finalize().column("bin_rule")[0].as_py()
        tables.append(st.finalize())
    for c in ("score", "ci_low", "ci_high", "p_value"):
        assert_close(grid(tables[0], c), grid(tables[1], c), 1e-12)
    with pytest.raises(DeepBaseError, match="record ids"):
        measure_class("mi")(x.shape[1], CAT, **kw).update(torch.as_tensor(x[:5]), torch.as_tensor(y[:5]))


def test_mi_short_stream_and_fixed_edges(data):
    x, y = data["x"][:300], data["cat"][:300]
    st = run("mi", x, y, CAT)                                      # fewer rows than calibration_rows
    assert st.edges is None and st.max_error() == math.inf
    t = st.finalize()
    assert st.edges is None                                        # finalize does not calibrate the state
    e = st.bin_edges()
    b = np.searchsorted(e[1], x[:, 1].astype(np.float64), side="right")
    m = ~np.isnan(y[:, 0])
    assert abs(grid(t)[1, 0] - mutual_info_score(y[m, 0], b[m])) < 1e-9
    fixed = run("mi", x, y, CAT, bins=3, edges=np.tile([-0.5, 0.5], (x.shape[1], 1)))
    tf = fixed.finalize()
    b = np.searchsorted([-0.5, 0.5], x[:, 1].astype(np.float64), side="right")
    assert abs(grid(tf)[1, 0] - mutual_info_score(y[m, 0], b[m])) < 1e-9
    assert tf.column("bin_rule")[0].as_py().startswith("fixed edges")
    with pytest.raises(DeepBaseError, match="mi.*'c1'"):
        measure_class("mi")(3, CONT)


# ----------------------------------------------------------------------------- dissection
def dissection_reference(x, y, q):
    """Direct numpy IoU / precision / recall / f1 at numpy.quantile(x, 1 - q)."""
    W, H = x.shape[1], y.shape[1]
    out = {k: np.full((W, H), np.nan) for k in ("iou", "precision", "recall", "f1", "I", "U", "T")}
    for w in range(W):
        T = np.quantile(x[:, w].astype(np.float64), 1 - q)
        for h in range(H):
            m = ~np.isnan(y[:, h])
            f, lab = x[m, w] > T, y[m, h] != 0
            I, U, A, L = (f & lab).sum(), (f | lab).sum(), f.sum(), lab.sum()
            out["I"][w, h], out["U"][w, h], out["T"][w, h] = I, U, T
            out["iou"][w, h] = I / U if U else np.nan
            out["precision"][w, h] = I / A if A else np.nan
            out["recall"][w, h] = I / L if L else np.nan
            out["f1"][w, h] = 2 * I / (A + L) if A + L else np.nan
    return out


@pytest.fixture(scope="module")
def detector_data(data):
    rng = np.random.default_rng(11)
    x, y = data["x"].copy(), data["b"].copy()
    n = len(x)
    y[:, 0] = (rng.random(n) < 0.02).astype(float)
    # unit 1: a thresholded detector copying b1, plus a little noise
    x[:, 1] = np.where(y[:, 0] == 1, 5 + rng.random(n), rng.normal(size=n)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("measure", ["iou", "precision", "recall", "f1"])
def test_dissection_matches_numpy(measure, detector_data):
    x, y = detector_data
    q = 0.02
    ref = dissection_reference(x, y, q)
    st = run(measure, x, y, BIN, splits=[100, 2900], quantile=q)
    t = st.finalize()
    check_schema(t)
    s = grid(t)
    T = grid(t, "threshold")
    assert np.allclose(T[[0, 1, 3, 4, 5]], ref["T"][[0, 1, 3, 4, 5]], rtol=0, atol=1e-12)
    assert np.array_equal(grid(t, "intersection")[[0, 1, 3, 4, 5]], ref["I"][[0, 1, 3, 4, 5]])
    assert np.array_equal(grid(t, "union")[[0, 1, 3, 4, 5]], ref["U"][[0, 1, 3, 4, 5]])
    expected = ref[measure].copy()
    expected[2] = np.nan                                         # constant unit -> NULL
    assert_close(s, expected, 1e-12)
    assert np.nanargmax(s[:, 0]) == 1                            # the planted detector ranks first
    assert grid(t, "p_value")[1, 0] < 1e-50
    lo, hi = grid(t, "ci_low"), grid(t, "ci_high")
    ok = ~np.isnan(s)
    assert (lo[ok] <= s[ok] + 1e-12).all() and (s[ok] <= hi[ok] + 1e-12).all()
    assert 0 < st.max_error() < 0.5
    assert (grid(t, "sample_rate") == 1).all()


def test_dissection_merge(detector_data):
    x, y = detector_data
    one = run("iou", x, y, BIN, quantile=0.01).finalize()
    merged = run_merged("iou", x, y, BIN, parts=[5, 1500, 1600], quantile=0.01).finalize()
    for col in ("score", "threshold", "intersection", "union", "p_value", "ci_low", "ci_high"):
        assert_close(grid(merged, col), grid(one, col), 1e-12)


def test_dissection_beyond_max_rows(detector_data):
    """A stream longer than max_rows: thinned to a hashed Bernoulli sample, still mergeable and
    exact for that sample."""
    x, y = detector_data
    q, max_rows = 0.02, 600
    st = run("iou", x, y, BIN, quantile=q, max_rows=max_rows, seed=5)
    assert st.j > 0
    merged = run_merged("iou", x, y, BIN, parts=[700, 2222], quantile=q, max_rows=max_rows, seed=5)
    t, tm = st.finalize(), merged.finalize()
    for col in ("score", "threshold", "intersection", "union"):
        assert_close(grid(tm, col), grid(t, col), 1e-12)
    # exactly the reference formula on the sampled rows (key below 2^(63 - j))
    keys = row_keys(torch.as_tensor(x), torch.as_tensor(y), None, seed=5).numpy()
    rows = keys < (1 << (63 - st.j))
    ref = dissection_reference(x[rows], y[rows], q)
    scale = 2.0 ** st.j
    assert np.allclose(grid(t, "threshold")[[0, 1, 3]], ref["T"][[0, 1, 3]], atol=1e-12, rtol=0)
    assert_close(grid(t)[[0, 1, 3]], ref["iou"][[0, 1, 3]], 1e-12)
    assert np.array_equal(grid(t, "intersection")[[0, 1]], np.round(ref["I"][[0, 1]] * scale))
    assert (grid(t, "sample_rate") == 1 / scale).all()
    # documented error: the threshold's exceedance fraction in the full stream ~ q +- sqrt(q / n_s)
    n_s = rows.sum()
    for w in (0, 1, 3, 4, 5):
        frac = (x[:, w] > grid(t, "threshold")[w, 0]).mean()
        assert abs(frac - q) < 5 * math.sqrt(q / n_s)
    assert np.nanargmax(grid(t)[:, 0]) == 1


def test_dissection_order_independent_or_null(detector_data):
    """Thinned states give the same result for any row order, except that a stream sorted by
    decreasing activation (whose early top values were dropped before the rate fell) gives NULL
    for that unit rather than a wrong value."""
    x, y = detector_data
    kw = dict(quantile=0.02, max_rows=600, seed=5)
    base = run("iou", x, y, BIN, splits=list(range(500, 4000, 500)), **kw).finalize()
    up = np.argsort(x[:, 0], kind="stable")
    asc = run("iou", x[up], y[up], BIN, splits=list(range(500, 4000, 500)), **kw).finalize()
    for col in ("score", "threshold", "intersection", "union"):
        assert_close(grid(asc, col), grid(base, col), 1e-12)
    down = up[::-1]
    desc = run("iou", x[down], y[down], BIN, splits=list(range(500, 4000, 500)), **kw).finalize()
    assert np.isnan(grid(desc)[0]).all() and np.isnan(grid(desc, "threshold")[0]).all()
    assert_close(grid(desc)[[1, 3, 4, 5]], grid(base)[[1, 3, 4, 5]], 1e-12)


def test_dissection_thinned_iid_stream_any_batch_size():
    """An unordered stream 10x longer than max_rows, in batches of any size or merged from
    states: the same non-NULL thresholds and scores as one batch, equal to the reference formula
    on the sampled rows. (Rows dropped before the rate fell that have since left the sample must
    not hold the floor up: with batches of 500 this unit came out NULL.)"""
    rng = np.random.RandomState(6)
    n, q = 20000, 0.01
    x = rng.randn(n, 3).astype(np.float32)
    y = (rng.rand(n, 1) < 0.1).astype(float)
    rid = np.arange(n) // 20
    kw = dict(quantile=q, max_rows=2000)
    hyp = BIN[:1]

    def feed(bounds, st=None):
        st = st or measure_class("iou")(3, hyp, **kw)
        for a, b in zip(bounds[:-1], bounds[1:]):
            st.update(torch.as_tensor(x[a:b]), torch.as_tensor(y[a:b]), torch.as_tensor(rid[a:b]))
        return st

    states = [feed([0, n])] + [feed(list(range(0, n, bs)) + [n]) for bs in (500, 1234, 3000)]
    merged = feed([0, 500, 7000])
    merged.combine(feed([7000, 7100, 15000])).combine(feed([15000, n]))
    states.append(merged)
    one = states[0]
    assert one.j > 0
    keys = row_keys(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(rid), seed=0)
    rows = (keys < (1 << (63 - one.j))).numpy()
    ref = dissection_reference(x[rows], y[rows], q)
    t1 = one.finalize()
    assert np.allclose(grid(t1, "threshold")[:, 0], ref["T"][:, 0], atol=1e-12, rtol=0)
    assert_close(grid(t1), ref["iou"], 1e-12)
    for st in states[1:]:
        assert st.j == one.j
        t = st.finalize()
        assert not np.isnan(grid(t)).any()
        for col in ("score", "threshold", "intersection", "union", "ci_low", "ci_high", "p_value"):
            assert_close(grid(t, col), grid(t1, col), 1e-12)
        # the floor is right: every sampled row above it is kept
        lev = st._levels(keys).numpy()
        for u in range(3):
            kept = set(st.keys[u].tolist())
            above = rows & (lev >= st.j) & (x[:, u] > float(st.floor()[u]))
            assert set(keys[torch.as_tensor(above)].tolist()) <= kept


def test_dissection_floor_ignores_rows_thinned_out():
    """Rows dropped from the buffer and later thinned out of the sample do not hold its floor up.
    Phase 1 overfills the buffer with rows of key level 0 only (values 5-6: the lowest are
    dropped); phase 2, many rows at -100, drops the rate to 1/2 (level-0 rows leave the sample);
    phase 3 brings level >= 1 rows at 1-2, which hold the sample's threshold: below the dropped
    level-0 values, yet every sampled row above it is kept, so it is exact, not NULL."""
    rng = np.random.default_rng(0)
    q, hyp = 0.01, BIN[:1]
    st = measure_class("iou")(2, hyp, quantile=q, max_rows=1000)

    def phase(values, want, start):
        """Rows with these unit-0 values (record ids from start), only those of the wanted key
        levels ('0' or '>=1')."""
        x = np.stack([values, rng.normal(size=len(values))], 1).astype(np.float32)
        y = (rng.random((len(values), 1)) < 0.3).astype(float)
        rid = np.arange(start, start + len(values))
        lev = st._levels(row_keys(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(rid), 0)).numpy()
        keep = {"0": lev == 0, ">=1": lev >= 1, "any": lev >= 0}[want]
        return x[keep], y[keep], rid[keep]

    p1 = [a[:st.capacity + 10] for a in phase(5 + rng.random(400), "0", 0)]
    p2 = phase(-100 - rng.random(1100), "any", 1000)
    p3 = [a[:40] for a in phase(1 + rng.random(200), ">=1", 5000)]
    for x, y, rid in (p1, p2, p3):
        st.update(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(rid))
    assert st.j == 1
    x, y, rid = (np.concatenate(a) for a in zip(p1, p2, p3))
    keys = row_keys(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(rid), 0).numpy()
    rows = keys < (1 << 62)                                       # the rate-1/2 sample
    ref = dissection_reference(x[rows], y[rows], q)
    t = st.finalize()
    T = grid(t, "threshold")[0, 0]
    assert 1 < T < 2 and T == pytest.approx(ref["T"][0, 0], abs=1e-12)
    assert float(st.floor_level[0, 0]) > 5 > T                    # a dropped level-0 row lies above T
    assert grid(t)[0, 0] == pytest.approx(ref["iou"][0, 0], abs=1e-12)
    assert grid(t, "intersection")[0, 0] == ref["I"][0, 0] * 2


@pytest.mark.parametrize("intervals", ["symbols", "records"])
def test_dissection_interval_holds_scores_of_0_and_1(intervals):
    """A perfect detector (score 1 over 30 positives) and a unit blind to a label (score 0 over 3
    positives): Wilson's ends round to 1 - 1e-16 and 7e-18 there; the interval must hold the score."""
    n = 3000
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.stack([(torch.arange(n) >= n - 30).double(), (torch.arange(n) < 3).double()], 1)
    hyps = [dict(name="top", kind="binary"), dict(name="bottom", kind="binary")]
    for measure in ("iou", "precision", "recall", "f1"):
        st = measure_class(measure)(1, hyps, quantile=0.01, intervals=intervals)
        st.update(x, y, torch.arange(n) // 10)
        t = st.finalize()
        s, lo, hi = grid(t)[0], grid(t, "ci_low")[0], grid(t, "ci_high")[0]
        assert list(s) == [1.0, 0.0], measure
        assert hi[0] == 1.0 and lo[1] == 0.0, measure
        assert 0.5 < lo[0] < 1 and 0 < hi[1] < 0.6, measure
    # symbols: the other ends are Wilson's (scipy's)
    if intervals == "symbols":
        st = measure_class("recall")(1, hyps, quantile=0.01, intervals=intervals)
        st.update(x, y)
        t = st.finalize()
        assert grid(t, "ci_low")[0, 0] == pytest.approx(
            stats.binomtest(30, 30).proportion_ci(0.95, method="wilson").low, abs=1e-12)
        assert grid(t, "ci_high")[0, 1] == pytest.approx(
            stats.binomtest(0, 3).proportion_ci(0.95, method="wilson").high, abs=1e-12)


def test_dissection_nonfinite_activation_nulls_the_unit(detector_data):
    x, y = detector_data
    x = x.copy()
    x[5, 0], x[99, 3] = np.nan, -np.inf
    t = run("iou", x, y, BIN, splits=[1000], quantile=0.02).finalize()
    assert np.isnan(grid(t)[[0, 3]]).all() and np.isnan(grid(t, "threshold")[[0, 3]]).all()
    assert not np.isnan(grid(t)[[1, 4, 5]]).any()


def test_quantile_positions_match_numpy():
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 17, 200, 1001):
        v = np.sort(rng.normal(size=n))
        for lvl in (0.5, 0.9, 0.995, 0.999):
            prev, nxt, g = quantile_positions(n, lvl)
            a, b = v[prev], v[nxt]
            got = b - (b - a) * (1 - g) if g >= 0.5 else a + (b - a) * g
            assert got == np.quantile(v, lvl)


def test_dissection_rejects_continuous():
    for measure in ("iou", "precision", "recall", "f1", "ap"):
        with pytest.raises(DeepBaseError, match=f"{measure!r}.*'c1'"):
            measure_class(measure)(4, CONT)


# ------------------------------------------------------------------------------------ ap
def test_ap_matches_sklearn_and_merges(detector_data):
    x, y = detector_data
    st = run("ap", x, y, BIN, splits=[333])
    t = st.finalize()
    check_schema(t)
    ap = grid(t)
    for w in range(x.shape[1]):
        for h in range(2):
            m = ~np.isnan(y[:, h])
            if w == 2:
                assert np.isnan(ap[w, h])
                continue
            assert abs(ap[w, h] - average_precision_score(y[m, h], x[m, w])) < 1e-9
    assert np.nanargmax(ap[:, 0]) == 1
    assert 0 < st.max_error() < 0.5
    merged = run_merged("ap", x, y, BIN, parts=[1, 2000, 3500]).finalize()
    assert_close(grid(merged), ap, 1e-12)
    # bounded sample: merge equals one shot, and equals sklearn on the sampled rows
    small = dict(max_rows=1000, seed=9)
    t1 = run("ap", x, y, BIN, **small).finalize()
    tm = run_merged("ap", x, y, BIN, parts=[900, 2500], **small).finalize()
    assert_close(grid(tm), grid(t1), 1e-12)
    keys = row_keys(torch.as_tensor(x), torch.as_tensor(y), None, seed=9).numpy()
    rows = np.argsort(keys, kind="stable")[:1000]
    m = ~np.isnan(y[rows, 1])
    assert abs(grid(t1)[4, 1] - average_precision_score(y[rows][m, 1], x[rows][m, 4])) < 1e-9


def test_ap_interval_holds_a_perfect_detector():
    """AP = 1 over 60 positives: Wilson's upper end rounds to 1 - 1e-16; it must be 1, and the
    lower end is Wilson's (scipy's) at 60 of 60."""
    x = np.arange(612, dtype=np.float32)[:, None]
    y = (np.arange(612) >= 552).astype(float)[:, None]
    t = run("ap", x, y, BIN[:1]).finalize().to_pylist()[0]
    assert t["score"] == 1.0 and t["ci_high"] == 1.0
    assert t["ci_low"] == pytest.approx(stats.binomtest(60, 60).proportion_ci(0.95, method="wilson").low,
                                        abs=1e-12)


def test_ap_ties_and_nan_rows():
    # heavy ties and NaN labels on tied rows: sklearn's one-threshold-per-value convention
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=(500, 3)).astype(np.float32)
    y = (rng.random((500, 1)) < 0.3).astype(float)
    y[rng.random(500) < 0.2, 0] = np.nan
    t = run("ap", x, y, BIN[:1]).finalize()
    m = ~np.isnan(y[:, 0])
    for w in range(3):
        assert abs(grid(t)[w, 0] - average_precision_score(y[m, 0], x[m, w])) < 1e-12


# --------------------------------------------------------------------------- significance
def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.random(200), rng.random(30) * 1e-4, [0.5, 0.5, 0.0, 1.0]])
    assert np.allclose(benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"), atol=1e-15)
    grid_p = p[:200].reshape(20, 10)
    assert benjamini_hochberg(grid_p).shape == (20, 10)
    # NaN-aware: NaNs stay NaN and do not count in m
    pn = p.copy()
    pn[[3, 50, 77]] = np.nan
    q = benjamini_hochberg(pn)
    ok = ~np.isnan(pn)
    assert np.isnan(q[~ok]).all()
    assert np.allclose(q[ok], stats.false_discovery_control(pn[ok], method="bh"), atol=1e-15)
    assert benjamini_hochberg([]).size == 0
    with pytest.raises(DeepBaseError):
        benjamini_hochberg([0.2, 1.5])


def test_permutation_p_values(detector_data):
    x, y = detector_data
    xs, ys = x[:600], y[:600]

    def corr_fn(a, lab):
        out = np.full((a.shape[1], lab.shape[1]), np.nan)
        for h in range(lab.shape[1]):
            m = ~np.isnan(lab[:, h])
            ac = a[m] - a[m].mean(0)
            yc = lab[m, h] - lab[m, h].mean()
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, h] = ac.T @ yc / np.sqrt((ac * ac).sum(0) * (yc * yc).sum())
        return out

    p = permutation_p_values(xs, ys, corr_fn, n_permutations=199, seed=0)
    assert p.shape == (x.shape[1], 2)
    assert p[1, 0] == pytest.approx(1 / 200)                     # the planted detector
    assert np.isnan(p[2]).all()                                   # constant unit: undefined
    assert (p[~np.isnan(p)] >= 1 / 200).all() and (p[[3, 4, 5]] > 0.01).all()
    again = permutation_p_values(xs, ys, corr_fn, n_permutations=199, seed=0)
    assert np.array_equal(p, again, equal_nan=True)
    # a registered measure by name
    pm = permutation_p_values(xs, ys, "pointbiserial", n_permutations=49, seed=1, hypotheses=BIN)
    assert pm[1, 0] == pytest.approx(1 / 50) and np.isnan(pm[2, 0])
    # p-values under the null are roughly uniform
    rng = np.random.default_rng(8)
    null = permutation_p_values(rng.normal(size=(200, 40)), rng.normal(size=(200, 1)), corr_fn,
                                n_permutations=99, seed=2)
    assert 0.3 < np.mean(null) < 0.7


def test_mi_gives_a_point_mass_its_own_bin():
    """A sparse unit copying a binary label (0 on 92% of the rows): its quantile edges all tie at
    0; the point mass gets a bin of its own, so MI is the label's entropy (mutual_info_score),
    not NULL (all rows in one bin)."""
    rng = np.random.default_rng(4)
    y = (rng.random(5000) < 0.08).astype(np.float64)
    x = np.stack([y, y * rng.random(5000) * 3, rng.normal(size=5000)], 1).astype(np.float32)
    s = grid(run("mi", x, y[:, None], BIN, splits=[1000]).finalize())
    assert s[0, 0] == pytest.approx(mutual_info_score(y, y), rel=1e-9)
    assert s[1, 0] == pytest.approx(mutual_info_score(y, y), rel=1e-9)   # 0 vs anything above it
    assert s[2, 0] < 0.01
