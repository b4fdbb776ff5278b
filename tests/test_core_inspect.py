"""The core query: correlations of every unit with every hypothesis, against numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.hypotheses import get_hypothesis

from conftest import TEXTS, per_char_labels, planted_adapter

HYPS = ["digit", "bracket_depth", "in_string", "in_comment", "position_in_line"]


def reference_scores(layer_fn):
    """{(unit, hypothesis): r} from a direct per-record forward pass and numpy corrcoef."""
    adapter = planted_adapter()
    acts, labels = [], {h: [] for h in HYPS}
    for text in TEXTS:
        enc = adapter.encode([text])
        with torch.no_grad():
            acts.append(layer_fn(adapter.module, enc.inputs)[0].double().numpy())
        for h in HYPS:
            labels[h].append(per_char_labels(get_hypothesis(h), text))
    x = np.concatenate(acts)
    out = {}
    for h in HYPS:
        y = np.concatenate(labels[h])
        m = ~np.isnan(y)
        for u in range(x.shape[1]):
            xu, yu = x[m, u], y[m]
            if xu.std() == 0 or yu.std() == 0:
                out[(u, h)] = None
            else:
                out[(u, h)] = float(np.corrcoef(xu, yu)[0, 1])
    return out, x.shape[0]


@pytest.mark.parametrize("layer,fn", [
    ("planted", lambda m, ids: m.planted(ids)),
    ("mix", lambda m, ids: m.mix(torch.cat([m.planted(ids), m.embed(ids)], -1))),
])
def test_scores_equal_numpy_reference(planted, layer, fn):
    ref, n = reference_scores(fn)
    t = dbd.inspect(planted, "planted", [layer], HYPS, "snippets", batch_size=3)
    rows = t.to_pylist()
    assert len(rows) == len(ref)
    for r in rows:
        want = ref[(r["unit"], r["hypothesis"])]
        if want is None:
            assert r["score"] is None, r
        else:
            assert r["score"] == pytest.approx(want, abs=1e-5), r
            assert r["ci_low"] <= r["score"] <= r["ci_high"]
            assert 0.0 <= r["p_value"] <= 1.0
    assert {r["n"] for r in rows if r["hypothesis"] == "digit"} == {n}


def test_planted_units_are_found(planted):
    t = dbd.inspect(planted, "planted", ["planted"], ["digit", "bracket_depth"], "snippets")
    planted.register("t", t)
    best = dict(planted.sql("SELECT hypothesis, arg_max(unit, abs(score)) FROM t WHERE score IS NOT NULL "
                            "GROUP BY hypothesis").fetchall())
    assert best["digit"] in (0, 1)
    assert best["bracket_depth"] == 4
    by_unit = {r["unit"]: r for r in t.to_pylist() if r["hypothesis"] == "digit"}
    assert by_unit[0]["score"] == pytest.approx(1.0, abs=1e-9)
    assert by_unit[1]["score"] < -0.99                      # the anti-correlated unit
    assert by_unit[2]["score"] is None                      # the constant unit: NULL, not an error
    assert by_unit[2]["p_value"] is None and by_unit[2]["ci_low"] is None
    assert by_unit[0]["p_value"] < 1e-10


def test_scores_table_and_catalog_join(planted):
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    rows = planted.sql("""
        SELECT s.layer, l.width, count(*) FROM scores s JOIN layers l ON s.model = l.model AND s.layer = l.layer
        GROUP BY ALL""").fetchall()
    assert rows == [("planted", 5, 5)]
    q = planted.sql("SELECT source, n_records, n_symbols FROM queries").fetchall()
    assert q == [("model", len(TEXTS), sum(len(t) for t in TEXTS))]


def test_sql_surface_matches_python(planted):
    py = dbd.inspect(planted, "planted", ["planted", "mix"], ["digit", "in_string"], "snippets").to_pylist()
    sql = planted.sql("SELECT * FROM inspect('planted', ['planted', 'mix'], ['digit', 'in_string'], 'snippets') "
                      "ORDER BY layer, unit, hypothesis").fetchall()
    cols = [d[0] for d in planted.sql("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets')").description]
    assert cols[:11] == ["query_id", "model", "layer", "unit", "hypothesis", "measure", "score", "n", "ci_low",
                         "ci_high", "p_value"]
    key = lambda r: (r["layer"], r["unit"], r["hypothesis"])
    py_sorted = sorted(py, key=key)
    assert len(sql) == len(py_sorted)
    for a, b in zip(sql, py_sorted):
        assert a[2:6] == (b["layer"], b["unit"], b["hypothesis"], b["measure"])
        if b["score"] is None:
            assert a[6] is None
        else:
            assert a[6] == pytest.approx(b["score"], abs=1e-12)


def test_categorical_hypothesis_expands_to_indicators(planted):
    from deepbase_duck.hypotheses.core import Hypothesis, register

    def kind_of_char(text):
        return ["digit" if c.isdigit() else "alpha" if c.isalpha() else "other" for c in text]

    register(Hypothesis("char_kind", kind_of_char, "categorical", categories=("digit", "alpha", "other")))
    t = dbd.inspect(planted, "planted", ["planted"], ["char_kind"], "snippets")
    names = sorted({r["hypothesis"] for r in t.to_pylist()})
    assert names == ["char_kind=alpha", "char_kind=digit", "char_kind=other"]
    r = [x for x in t.to_pylist() if x["hypothesis"] == "char_kind=digit" and x["unit"] == 0][0]
    assert r["score"] == pytest.approx(1.0, abs=1e-9)


def test_inspect_streams_blocks_in_bounded_memory(planted):
    """The engine never holds more than one block: states see batches of at most batch_size records."""
    from deepbase_duck.inspectors.correlation import PearsonState
    seen = []
    orig = PearsonState.update

    def spy(self, acts, labels, record_ids=None):
        seen.append(len(torch.unique(record_ids)))
        return orig(self, acts, labels, record_ids)

    PearsonState.update = spy
    try:
        dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", batch_size=4)
    finally:
        PearsonState.update = orig
    assert max(seen) <= 4 and len(seen) == int(np.ceil(len(TEXTS) / 4))


def test_correlation_state_on_random_data_against_scipy():
    """Streaming over uneven batches plus combine equals scipy.stats.pearsonr (r, p, CI) to 1e-9,
    with NaN labels excluded per hypothesis, a constant unit and a constant label giving NULL."""
    from scipy import stats
    from deepbase_duck.inspectors.correlation import PearsonState
    rng = np.random.default_rng(7)
    n, w = 3000, 6
    x = rng.normal(size=(n, w)).astype(np.float32) * 3 + 40        # a large mean: cancellation risk
    y = np.stack([rng.integers(0, 2, n), rng.normal(size=n) * 50 + 1e3, np.zeros(n)], 1).astype(np.float64)
    x[:, 0] = y[:, 0] + rng.normal(size=n).astype(np.float32) * 0.1
    x[:, 2] = 5.0                                                   # constant unit
    y[::5, 1] = np.nan                                              # missing labels
    hyps = [{"name": "b", "kind": "binary"}, {"name": "c", "kind": "continuous"}, {"name": "z", "kind": "binary"}]
    state = PearsonState(w, hyps)
    cuts = [0, 1, 17, 600, 601, 2000, n]
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = PearsonState(w, hyps)
        part.update(torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b]))
        state.combine(part)
    rows = {(r["unit"], r["hypothesis"]): r for r in state.finalize().to_pylist()}
    for u in range(w):
        for j, h in enumerate("bcz"):
            r = rows[(u, h)]
            if u == 2 or h == "z":
                assert r["score"] is None and r["p_value"] is None
                continue
            m = ~np.isnan(y[:, j])
            ref = stats.pearsonr(x[m, u].astype(np.float64), y[m, j])
            ci = ref.confidence_interval(0.95)
            assert r["n"] == m.sum()
            assert r["score"] == pytest.approx(ref.statistic, abs=1e-9)
            assert r["p_value"] == pytest.approx(ref.pvalue, abs=1e-9)
            assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_correlation_state_one_large_block_against_scipy():
    """A block of thousands of symbols, every one labelled (the update's fast path), then a
    second with missing labels: r equals scipy.stats.pearsonr to 1e-9."""
    from scipy import stats
    from deepbase_duck.inspectors.correlation import PearsonState
    rng = np.random.default_rng(11)
    n, w = 6000, 40
    y = np.stack([rng.integers(0, 2, n), rng.normal(size=n) * 5 + 20], 1).astype(np.float64)
    x = rng.normal(size=(n, w)) + 100
    x[:, 0] += 0.3 * y[:, 0]                                        # a planted unit
    x = x.astype(np.float32)
    hyps = [{"name": "b", "kind": "binary"}, {"name": "c", "kind": "continuous"}]
    state = PearsonState(w, hyps)
    state.update(torch.from_numpy(x[:4700]), torch.from_numpy(y[:4700]))      # all labelled
    y2 = y.copy()
    y2[4700::3, 1] = np.nan
    state.update(torch.from_numpy(x[4700:]), torch.from_numpy(y2[4700:]))     # some missing
    r = state.correlations()
    for j in range(2):
        m = ~np.isnan(y2[:, j])
        for u in range(w):
            ref = stats.pearsonr(x[m, u].astype(np.float64), y2[m, j]).statistic
            assert r[u, j] == pytest.approx(ref, abs=1e-9)
    assert abs(r[0, 0]) > 0.1 > np.abs(r[1:, 0]).max()              # the planted unit stands out


def test_constant_label_gives_null(planted):
    from deepbase_duck.hypotheses.core import Hypothesis, register
    register(Hypothesis("never", lambda t: [], "binary"))
    rows = dbd.inspect(planted, "planted", ["planted"], ["never"], "snippets").to_pylist()
    assert len(rows) == 5 and all(r["score"] is None and r["p_value"] is None for r in rows)


def test_scores_with_partly_stored_labels_read_ahead_in_chunks(planted, monkeypatch):
    """Half the records' labels stored beforehand (read ahead, 4 records per query), the others
    computed in the scan: the scores still equal numpy's, and every label pair is stored after."""
    import deepbase_duck.engine.labels as labels_module
    monkeypatch.setattr(labels_module, "CHUNK", 4)
    ref, _ = reference_scores(lambda m, ids: m.planted(ids))
    dbd.annotate(planted, HYPS, "snippets", record_ids=list(range(0, len(TEXTS), 2)))
    t = dbd.inspect(planted, "planted", ["planted"], HYPS, "snippets", batch_size=3)
    for r in t.to_pylist():
        want = ref[(r["unit"], r["hypothesis"])]
        assert (r["score"] is None) if want is None else r["score"] == pytest.approx(want, abs=1e-5), r
    assert planted.sql("SELECT count(*) FROM labeled_records WHERE dataset = 'snippets'").fetchall()[0][0] \
        == len(TEXTS) * len(HYPS)


def test_layers_stored_in_different_parts_read_one_layer_at_a_time(planted):
    """Layers extracted with different batch sizes have parts holding different records, so the
    scan reads them one layer at a time and meets every record once per layer; labels computed on
    the first meeting must serve the second (none of them stored before the scan)."""
    ref_planted, _ = reference_scores(lambda m, ids: m.planted(ids))
    ref_mix, _ = reference_scores(lambda m, ids: m.mix(torch.cat([m.planted(ids), m.embed(ids)], -1)))
    dbd.extract(planted, "planted", ["planted"], "snippets", batch_size=3)
    dbd.extract(planted, "planted", ["mix"], "snippets", batch_size=4)
    assert planted.sql("SELECT count(*) FROM labeled_records").fetchall()[0][0] == 0
    t = dbd.inspect(planted, "planted", ["planted", "mix"], HYPS, "snippets")
    assert planted.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0] == "stored"
    for r in t.to_pylist():
        want = (ref_planted if r["layer"] == "planted" else ref_mix)[(r["unit"], r["hypothesis"])]
        assert (r["score"] is None) if want is None else r["score"] == pytest.approx(want, abs=1e-5), r


def test_query_params_say_where_it_ran(planted):
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", device="cpu")
    params = json.loads(planted.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["device"] == "cpu" and params["model_devices"] == {"planted": "cpu"}
    assert "tf32" not in params                        # only reported for models on CUDA
    planted.sql("SELECT * FROM inspect('planted', ['planted'], ['in_string'], 'snippets', device := 'cpu')").fetchall()
    params = json.loads(planted.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])
    assert params["device"] == "cpu"


def test_tf32_mode_sets_and_restores_torch_switches():
    from deepbase_duck.extraction.adapters import tf32_mode
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with tf32_mode(False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(ZeroDivisionError):
            with tf32_mode(False):
                1 / 0
        assert torch.backends.cudnn.allow_tf32                 # restored after a failure too
        with tf32_mode(None):                                  # None: left alone
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
