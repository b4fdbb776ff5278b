"""Dissection, rank and mutual-information inspectors against independent references (hunt 19):
mi merges of states that share edges stay exact when a unit's edges are NaN, mi states that
would calibrate on different records are refused by name, and refusals say which parameter
differs or what would fit."""
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import f1_score, jaccard_score, mutual_info_score, precision_score, recall_score

from deepbase_duck.errors import DeepBaseError
from deepbase_duck.inspectors import measure_class

BIN = [{"name": "b", "kind": "binary"}]


def _column(table, name):
    return np.array([np.nan if v is None else v for v in table.column(name).to_pylist()], dtype=float)


def _fed(measure, hyps, x, y, rec, batch, **params):
    st = measure_class(measure)(x.shape[1], hyps, **params)
    for a in range(0, len(x), batch):
        st.update(torch.tensor(x[a:a + batch]), torch.tensor(y[a:a + batch]), torch.as_tensor(rec[a:a + batch]))
    return st


def test_mi_states_sharing_edges_with_a_nan_unit_merge_exactly():
    """A unit NaN on every calibration row has NaN edges (and scores NULL); two workers built with
    empty_like() share those edges, but torch.equal's NaN != NaN took them for different edges:
    the merge was flagged 'approximate merge of 1000 rows' and redistributed, for every unit."""
    rng = np.random.default_rng(4)
    n = 2000
    x = rng.normal(size=(n, 3))
    x[:, 2] = np.nan
    y = ((x[:, :1] + rng.normal(size=(n, 1))) > 0).astype(float)
    rec = np.arange(n) // 4
    base = _fed("mi", BIN, x[:500], y[:500], rec[:500], 500, calibration_rows=500)
    edges = base.bin_edges()
    assert np.isnan(edges[2]).all() and np.isfinite(edges[:2]).all()
    a, b = base.empty_like(), base.empty_like()
    for st, lo, hi in ((a, 0, 1000), (b, 1000, n)):
        st.update(torch.tensor(x[lo:hi]), torch.tensor(y[lo:hi]), torch.as_tensor(rec[lo:hi]))
    t = a.combine(b).finalize()
    assert a.approx_rows == 0
    assert "approximate" not in t.column("bin_rule")[0].as_py()
    # the plug-in MI of the shared bins over all rows (sklearn), the NaN unit NULL
    ref = [mutual_info_score(y[:, 0], np.searchsorted(edges[u], x[:, u], side="right")) for u in range(2)]
    np.testing.assert_allclose(_column(t, "score")[:2], ref, rtol=1e-12)
    assert np.isnan(_column(t, "score")[2])


def test_mi_states_buffering_for_different_calibration_records_are_refused():
    """Two states not yet calibrated, one on calibration_records and one not (or on another set):
    the merged buffer was calibrated on one set with the other's rows marked against its own
    (a state without calibration_records: finalize failed on a torch RuntimeError, 'Tensors must
    have same number of dimensions'; two sets: edges from rows of both, a set neither asked for).
    Refused by name now, before either state changes; the same set still merges."""
    rng = np.random.default_rng(5)
    n = 400
    x = rng.normal(size=(n, 2))
    y = (rng.random((n, 1)) < 0.4).astype(float)
    rec = np.arange(n) // 4
    evens, odds = list(range(0, 100, 2)), list(range(1, 100, 2))
    for mine, theirs in ((evens, None), (None, evens), (evens, odds)):
        a = _fed("mi", BIN, x[:100], y[:100], rec[:100], 100, calibration_rows=1000, calibration_records=mine)
        b = _fed("mi", BIN, x[100:], y[100:], rec[100:], 300, calibration_rows=1000, calibration_records=theirs)
        with pytest.raises(DeepBaseError, match="calibration_records"):
            a.combine(b)
        assert a.rows == 100 and a.buffered == 100            # refused before the state changed
    # the same records: merged, and the bins are the quantiles of those records' rows
    a = _fed("mi", BIN, x[:100], y[:100], rec[:100], 100, calibration_rows=1000, calibration_records=evens)
    b = _fed("mi", BIN, x[100:], y[100:], rec[100:], 300, calibration_rows=1000, calibration_records=evens)
    t = a.combine(b).finalize()
    rows = np.isin(rec, evens)
    edges = np.quantile(x[rows], np.arange(1, 10) / 10, axis=0).T
    np.testing.assert_allclose(a.bin_edges(), edges, rtol=1e-12)
    ref = [mutual_info_score(y[:, 0], np.searchsorted(edges[u], x[:, u], side="right")) for u in range(2)]
    np.testing.assert_allclose(_column(t, "score"), ref, rtol=1e-12)


@pytest.mark.parametrize("measure", ["iou", "precision", "recall", "f1"])
def test_dissection_combine_refusal_names_the_parameter_that_differs(measure):
    """'cannot combine states with different quantile, max_rows or seed' said neither which nor
    what to do."""
    x = torch.randn(50, 2)
    y = (torch.rand(50, 1) < 0.3).double()
    for mine, theirs, said in (({"quantile": 0.01}, {"quantile": 0.02}, "quantile 0.01 and 0.02"),
                               ({"seed": 0}, {"seed": 3}, "seed 0 and 3"),
                               ({"max_rows": 1000}, {"max_rows": 100_000}, "max_rows 1000 and 100000")):
        a, b = measure_class(measure)(2, BIN, **mine), measure_class(measure)(2, BIN, **theirs)
        a.update(x, y, torch.arange(50))
        b.update(x, y, torch.arange(50))
        with pytest.raises(DeepBaseError, match=said) as err:
            a.combine(b)
        assert "give every state the same" in str(err.value)


def test_mi_edges_refusals_say_what_would_fit():
    """Edges of 5 bins with bins left at 10 were refused as 'edges must have shape (3, 9)', with no
    word of bins=; decreasing edges did not name the unit."""
    with pytest.raises(DeepBaseError, match=r"edges of 5 bins: pass bins=5"):
        measure_class("mi")(3, BIN, edges=np.tile([-1.0, 0.0, 1.0, 2.0], (3, 1)))
    with pytest.raises(DeepBaseError, match=r"np\.tile\(edges, \(width, 1\)\) and bins=5"):
        measure_class("mi")(3, BIN, edges=[-1.0, 0.0, 1.0, 2.0])
    with pytest.raises(DeepBaseError, match=r"unit 1 has \[0\.0, 2\.0, 1\.0\]"):
        measure_class("mi")(3, BIN, bins=4, edges=[[0, 1, 2], [0, 2, 1], [0, 1, 2]])
    st = measure_class("mi")(3, BIN, bins=5, edges=np.tile([-1.0, 0.0, 1.0, 2.0], (3, 1)))   # what fits
    assert st.bin_edges().shape == (3, 4)


CAT = [{"name": "c", "kind": "categorical", "categories": ["a", "b", "c"]}]


def test_mi_refuses_a_bad_categorical_code_in_the_batch_that_has_it():
    """The counts read the codes only once the bins are set, so a batch with code 7 of a
    3-category hypothesis was buffered; the HypothesisError came with the next, good batch (the
    one that calibrated), leaving the bins set and the buffer uncounted: finalize then gave every
    score n = 0 and NULL, the rows lost. With fixed edges it was refused after the rows were
    counted in ``rows``. Now refused in its own batch, nothing taken; the stream goes on."""
    from deepbase_duck.errors import HypothesisError
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 2))
    y = rng.integers(0, 3, (200, 1)).astype(float)
    y[x[:, :1] > 0.5] = 2.0
    bad = y[:100].copy()
    bad[3] = 7.0
    rec = np.arange(200)
    for params in ({"calibration_rows": 150}, {"bins": 3, "edges": [[-0.5, 0.5], [-0.5, 0.5]]}):
        st = measure_class("mi")(2, CAT, **params)
        with pytest.raises(HypothesisError, match="'c' has label 7.0"):
            st.update(torch.tensor(x[:100]), torch.tensor(bad), torch.as_tensor(rec[:100]))
        assert st.rows == 0 and st.buffered == 0
        for a in (0, 100):
            st.update(torch.tensor(x[a:a + 100]), torch.tensor(y[a:a + 100]), torch.as_tensor(rec[a:a + 100]))
        t = st.finalize()
        edges = st.bin_edges()
        ref = [mutual_info_score(y[:, 0], np.searchsorted(edges[u], x[:, u], side="right")) for u in range(2)]
        assert _column(t, "n").tolist() == [200, 200]
        np.testing.assert_allclose(_column(t, "score"), ref, rtol=1e-12)


def test_probeless_refused_float32_batch_leaves_the_rounding_rule_alone():
    """A float32 batch refused for a bad categorical code still set the float32 rounding rule
    (exact64 False) before the refusal: the float64 units 1e8 + N(0, 1) that followed had a spread
    below float32 resolution of 1e8 and scored NULL."""
    import itertools
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 3, (n, 1)).astype(float)
    z = rng.normal(size=(n, 1)) + 0.5 * y
    st = measure_class("probeless")(1, CAT)
    bad = y[:10].copy()
    bad[0] = 5.0
    with pytest.raises(DeepBaseError, match="label 5.0"):
        st.update(torch.tensor(1e8 + z[:10], dtype=torch.float32), torch.tensor(bad), torch.arange(10))
    st.update(torch.tensor(1e8 + z), torch.tensor(y), torch.arange(n))
    means = [z[y[:, 0] == c, 0].mean() for c in range(3)]
    ref = sum(abs(a - b) for a, b in itertools.combinations(means, 2))
    np.testing.assert_allclose(_column(st.finalize(), "score"), [ref], rtol=1e-6)


@pytest.mark.parametrize("measure", ["spearman", "ap"])
def test_sampled_states_of_different_max_rows_are_refused_before_the_counts_change(measure):
    """The row samples' merge refused them ('cannot combine row samples of max_rows 500 and
    1000', no measure named), but only after self.n and self.rows had taken the other state's
    rows: a caller going on after the error reported n = 200 for 100 labelled rows."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 2))
    y = (x[:, :1] + rng.normal(size=(200, 1)) > 0).astype(float)
    rec = np.arange(200)
    a = _fed(measure, BIN, x[:100], y[:100], rec[:100], 100, max_rows=1000)
    b = _fed(measure, BIN, x[100:], y[100:], rec[100:], 100, max_rows=500)
    with pytest.raises(DeepBaseError, match=f"{measure}: cannot combine states of max_rows 500 and 1000"):
        a.combine(b)
    t = a.finalize()
    assert _column(t, "n").tolist() == [100, 100] and a.rows == 100
    if measure == "spearman":
        ref = [stats.spearmanr(x[:100, u], y[:100, 0])[0] for u in range(2)]
    else:
        from sklearn.metrics import average_precision_score
        ref = [average_precision_score(y[:100, 0], x[:100, u]) for u in range(2)]
    np.testing.assert_allclose(_column(t, "score"), ref, rtol=1e-10)


# -- references (pure additions: these held before this hunt) ----------------------------------

def test_dissection_scores_with_ties_at_the_threshold_streamed_and_merged_equal_sklearn():
    """Rounded activations put ties at the top quantile; labels missing on some symbols; a
    constant unit and a hypothesis without positives: iou / precision / recall / f1 equal
    sklearn's jaccard / precision / recall / f1 of (activation > numpy.quantile(1 - q)) over the
    labelled rows, one-shot, streamed and merged alike."""
    rng = np.random.default_rng(7)
    n, q = 600, 0.05
    x = np.round(rng.normal(size=(n, 3)) * 2)
    x[:, 2] = 1.5
    y = (rng.random((n, 2)) < 0.3).astype(float)
    y[:, 1] = 0.0
    y[rng.random((n, 2)) < 0.2] = np.nan
    rec = np.arange(n) // 6
    hyps = [{"name": "a", "kind": "binary"}, {"name": "none", "kind": "binary"}]
    refs = {"iou": jaccard_score, "precision": precision_score, "recall": recall_score, "f1": f1_score}
    for measure, fn in refs.items():
        ref = np.full((3, 2), np.nan)
        for u in range(2):
            fires = x[:, u] > np.quantile(x[:, u], 1 - q)
            for h in range(2):
                lab = ~np.isnan(y[:, h])
                # (jaccard's union is never 0 here: something fires; its zero_division takes no NaN)
                zero = 0.0 if fn is jaccard_score else np.nan
                ref[u, h] = fn(y[lab, h].astype(int), fires[lab].astype(int), zero_division=zero)
        one = _fed(measure, hyps, x, y, rec, n, quantile=q)
        streamed = _fed(measure, hyps, x, y, rec, 37, quantile=q)
        merged = _fed(measure, hyps, x[:250], y[:250], rec[:250], 50, quantile=q).combine(
            _fed(measure, hyps, x[250:], y[250:], rec[250:], 90, quantile=q))
        for st in (one, streamed, merged):
            np.testing.assert_allclose(_column(st.finalize(), "score").reshape(3, 2), ref, rtol=1e-12,
                                       err_msg=measure)


def test_spearman_and_pointbiserial_with_ties_nan_labels_and_constant_units_equal_scipy():
    rng = np.random.default_rng(3)
    n = 300
    x = np.round(rng.normal(size=(n, 3)) * 1.5)
    x[:, 2] = 2.0
    y = (rng.random((n, 1)) < 0.4).astype(float)
    y[:5] = np.nan
    rec = np.arange(n) // 3
    lab = ~np.isnan(y[:, 0])
    for measure, fn in (("spearman", stats.spearmanr), ("pointbiserial", stats.pointbiserialr)):
        ref = [fn(x[lab, u], y[lab, 0]) for u in range(2)]
        for batch in (n, 31):
            t = _fed(measure, BIN, x, y, rec, batch, intervals="symbols").finalize()
            np.testing.assert_allclose(_column(t, "score")[:2], [r[0] for r in ref], rtol=1e-10)
            np.testing.assert_allclose(_column(t, "p_value")[:2], [r[1] for r in ref], rtol=1e-8)
            assert np.isnan(_column(t, "score")[2])               # constant unit: NULL
