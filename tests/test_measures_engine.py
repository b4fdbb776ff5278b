"""Every measure through the engine and the SQL surface, on the planted-unit model."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.hypotheses.core import Hypothesis, register
from deepbase_duck.inspectors import MEASURES

from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.models.charlstm import encode_chars

from conftest import DIGIT_IDS, TEXTS, planted_adapter

# unit 0 copies `digit` exactly; unit 1 is -digit + small noise; unit 2 is constant
SIGNED = {"corr", "spearman", "pointbiserial"}


@pytest.fixture
def many(con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS * 4)
    return con


@pytest.mark.parametrize("measure", ["corr", "spearman", "pointbiserial", "probeless", "mi", "ap"])
def test_planted_digit_unit_ranks_first(many, measure):
    t = dbd.inspect(many, "planted", ["planted"], ["digit"], "snippets", measures=[measure]).to_pylist()
    rows = [r for r in t if r["measure"] == measure and r["unit"] is not None and r["score"] is not None]
    best = max(rows, key=lambda r: abs(r["score"]))
    assert best["unit"] in (0, 1), (measure, best)
    assert all(r["unit"] != 2 for r in rows), "the constant unit has no score"


class Detector(torch.nn.Module):
    """unit 0: a detector that fires on digits with a varying strength (continuous, no ties),
    and is small noise elsewhere; units 1-3: noise."""

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], dtype=torch.float64)[None, :].expand(ids.shape)
        k = torch.arange(1, 5, dtype=torch.float64)
        # a deterministic pseudo-random value per (position, unit): independent of batching
        noise = (torch.frac(torch.sin(pos[..., None] * 12.9898 * k + 78.233 * k) * 43758.5453).abs() * 0.5).float()
        digit = DIGIT_IDS[ids]
        pos = pos.float()
        fire = digit * (2.0 + torch.sin(pos))
        return torch.cat([(fire + noise[..., 0] * (1 - digit))[..., None], noise[..., 1:]], -1)


def test_dissection_finds_a_thresholded_detector(con):
    """IoU at the top quantile: the unit that fires on digits is the detector; its IoU equals the
    direct numpy formula (numpy.quantile threshold, intersection over union)."""
    dbd.register_model(con, "detector", CharAdapter(torch.nn.Sequential(Detector()), encode_chars, "chars-test",
                                                        device="cpu"))
    texts = ["".join("7" if i % 150 == 0 else "a" for i in range(600)) + "\n"] * 6
    dbd.add_dataset(con, "sparse_digits", texts)
    t = dbd.inspect(con, "detector", ["0"], ["digit"], "sparse_digits",
                    measures=["iou", "precision", "recall", "f1"], iou={"quantile": 0.005}).to_pylist()
    iou = {r["unit"]: r for r in t if r["measure"] == "iou"}
    best = max(iou.values(), key=lambda r: r["score"] or 0)
    assert best["unit"] == 0
    assert all((r["score"] or 0) < 0.2 for u, r in iou.items() if u != 0)
    with torch.no_grad():
        x = torch.cat([Detector()(torch.tensor([encode_chars(t)]))[0] for t in texts]).numpy().astype(np.float64)
    digit = np.array([c.isdigit() for t in texts for c in t])
    for u in range(4):
        thr = np.quantile(x[:, u], 1 - 0.005)
        hit = x[:, u] > thr
        want = (hit & digit).sum() / (hit | digit).sum()
        assert iou[u]["score"] == pytest.approx(want, abs=1e-12)
        assert json.loads(iou[u]["detail"])["threshold"] == pytest.approx(thr, abs=1e-6)
    assert best["score"] == pytest.approx(18 / 24)          # 0.5% of 3606 symbols = 18 above threshold
    prec = {r["unit"]: r["score"] for r in t if r["measure"] == "precision"}
    assert prec[0] == pytest.approx(1.0)


def test_probe_through_engine_beats_majority(many):
    t = dbd.inspect(many, "planted", ["planted"], ["digit", "in_string"], "snippets", measures=["probe"]).to_pylist()
    probe = {r["hypothesis"]: r for r in t if r["measure"] == "probe"}
    for h, r in probe.items():
        d = json.loads(r["detail"])
        assert r["unit"] is None and r["score"] >= d["majority"], (h, r, d)
    assert probe["digit"]["score"] > 0.99
    weights = sorted((r for r in t if r["measure"] == "probe_weight" and r["hypothesis"] == "digit"),
                     key=lambda r: -r["score"])
    assert weights[0]["unit"] in (0, 1)


def test_categorical_hypothesis_goes_to_the_probe_whole(many):
    register(Hypothesis("kind3", lambda t: ["d" if c.isdigit() else "a" if c.isalpha() else "o" for c in t],
                        "categorical", categories=("d", "a", "o")))
    t = dbd.inspect(many, "planted", ["planted"], ["kind3"], "snippets", measures=["probe", "corr"]).to_pylist()
    assert {r["hypothesis"] for r in t if r["measure"] == "probe"} == {"kind3"}
    assert {r["hypothesis"] for r in t if r["measure"] == "corr"} == {"kind3=d", "kind3=a", "kind3=o"}


def test_sql_measures_and_params(many):
    rows = many.sql("""
        SELECT measure, count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets',
                                               measures := ['corr', 'mi', 'iou', 'probe'],
                                               params := '{"mi": {"bins": 4}, "probe": {"l2": 0.01}}')
        GROUP BY measure ORDER BY measure""").fetchall()
    got = dict(rows)
    assert set(got) >= {"corr", "mi", "iou", "probe", "probe_weight"}
    assert got["corr"] == 5 and got["mi"] == 5
    # bins: the effective number per unit (tied quantile edges merge), at most the 4 asked for
    bins = many.sql("SELECT max((detail->>'bins')::INT) FROM scores WHERE measure = 'mi'").fetchall()
    assert bins == [(4,)]


def test_measure_parameter_errors(many):
    with pytest.raises(DeepBaseError, match=r"measure 'mi': unknown parameter\(s\) binz; valid: .*bins"):
        dbd.inspect(many, "planted", ["planted"], ["digit"], "snippets", measures=["mi"], mi={"binz": 3})
    with pytest.raises(DeepBaseError, match="parameters given for measure 'probe', which the query does not compute"):
        dbd.inspect(many, "planted", ["planted"], ["digit"], "snippets", measures=["corr"], probe={"l1": 1})
    with pytest.raises(duckdb.Error, match="params is not valid JSON"):
        many.sql("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', params := '{oops')").fetchall()


def test_continuous_hypothesis_to_iou_is_refused(many):
    with pytest.raises(DeepBaseError, match=r"measure 'iou' does not take continuous hypotheses \(hypothesis "
                                            r"'bracket_depth'\)"):
        dbd.inspect(many, "planted", ["planted"], ["bracket_depth"], "snippets", measures=["iou"])


def test_every_registered_measure_runs_through_the_engine(many):
    for m in sorted(MEASURES):
        t = dbd.inspect(many, "planted", ["planted"], ["digit"], "snippets", measures=[m])
        assert t.num_rows > 0, m
        scores = np.array([s for s in t.column("score").to_pylist() if s is not None])
        assert np.isfinite(scores).all(), m


def test_q_values_are_benjamini_hochberg_over_the_query(many):
    from scipy.stats import false_discovery_control
    t = dbd.inspect(many, "planted", ["planted", "mix"], ["digit", "in_string", "bracket_depth"], "snippets",
                    measures=["corr", "spearman"]).to_pylist()
    for m in ("corr", "spearman"):
        rows = [r for r in t if r["measure"] == m and r["p_value"] is not None]
        want = false_discovery_control(np.array([r["p_value"] for r in rows]))
        np.testing.assert_allclose([r["q_value"] for r in rows], want, rtol=1e-12, atol=1e-15)
        assert all(r["q_value"] is None for r in t if r["measure"] == m and r["p_value"] is None)
    stored = many.sql("SELECT count(*) FROM scores WHERE q_value IS NOT NULL").fetchall()[0][0]
    assert stored == sum(r["q_value"] is not None for r in t)


def test_untrained_baseline_in_the_same_result(many):
    # the planted fixture itself is built under torch.manual_seed(0): seed 0 would rebuild it exactly
    t = dbd.inspect(many, "planted", ["planted", "mix"], ["digit"], "snippets", baseline=True,
                    baseline_seed=1).to_pylist()
    models = {r["model"] for r in t}
    assert models == {"planted", "planted~untrained"}
    by = {(r["model"], r["layer"], r["unit"]): r["score"] for r in t}
    # the `planted` layer has no trainable weights: identical scores; `mix` is re-initialised
    for u in range(5):
        assert by[("planted", "planted", u)] == by[("planted~untrained", "planted", u)]
    assert any(by[("planted", "mix", u)] != pytest.approx(by[("planted~untrained", "mix", u)]) for u in range(4))
    # seeded: the same baseline twice
    t2 = dbd.inspect(many, "planted", ["mix"], ["digit"], "snippets", baseline=True, baseline_seed=1).to_pylist()
    again = {r["unit"]: r["score"] for r in t2 if r["model"] == "planted~untrained"}
    assert all(again[u] == pytest.approx(by[("planted~untrained", "mix", u)], abs=1e-12) for u in range(4))
    sql = many.sql("SELECT DISTINCT model FROM inspect('planted', ['mix'], ['digit'], 'snippets', baseline := true) "
                   "ORDER BY model").fetchall()
    assert sql == [("planted",), ("planted~untrained",)]


def test_control_tasks_and_selectivity(many):
    from deepbase_duck.engine.inspect import block_labels, plan_inspect
    t = dbd.inspect(many, "planted", ["planted"], ["digit", "in_string"], "snippets", measures=["probe"],
                    control=True).to_pylist()
    acc = {r["hypothesis"]: r["score"] for r in t if r["measure"] == "probe"}
    sel = {r["hypothesis"]: r["score"] for r in t if r["measure"] == "selectivity"}
    assert set(acc) == {"digit", "in_string", "digit~control", "in_string~control"}
    for h in ("digit", "in_string"):
        assert sel[h] == pytest.approx(acc[h] - acc[f"{h}~control"], abs=1e-12)
    assert sel["digit"] > 0
    # a control label is a function of the word type (here: the character) alone
    session = dbd.catalog.session_of(many)
    plan = plan_inspect(session, "planted", ["planted"], ["digit"], "snippets", ["probe"], control=True)
    from deepbase_duck.engine.inspect import class_frequencies
    plan.control_freq = class_frequencies(session, plan, "chars-test")
    ids = np.arange(8, dtype=np.int64)
    counts = np.array([len(TEXTS[i]) for i in ids])
    y = block_labels(session, plan, "chars-test", ids, counts).numpy()
    j = [c["name"] for c in plan.label_columns].index("digit~control")
    chars = "".join(TEXTS[i] for i in ids)
    seen = {}
    for ch, v in zip(chars, y[:, j]):
        assert seen.setdefault(ch, v) == v
    assert len(set(seen.values())) == 2          # both classes occur across types
    with pytest.raises(DeepBaseError, match="control=True needs the 'probe' measure"):
        dbd.inspect(many, "planted", ["planted"], ["digit"], "snippets", measures=["corr"], control=True)


def test_permutation_p_values_on_request(many):
    t = dbd.inspect(many, "planted", ["planted"], ["digit"], "snippets", measures=["corr"],
                    permutations=99, permutation_rows=2000).to_pylist()
    d = {r["unit"]: json.loads(r["detail"]) for r in t}
    assert d[0]["perm_p_value"] == pytest.approx(1 / 100)        # nothing beats the copying unit
    assert d[2]["perm_p_value"] is None                          # the constant unit: undefined
    assert d[0]["perm_rows"] == 2000
    assert all(0 < x["perm_p_value"] <= 1 for u, x in d.items() if u != 2)


def test_compare_layers_linear_cka(many):
    from deepbase_duck.inspectors.cka import linear_cka
    t = dbd.compare_layers(many, ["planted:planted", "planted:mix", ("planted", "embed")], "snippets").to_pylist()
    assert len(t) == 3
    adapter = planted_adapter()
    with torch.no_grad():
        xs = {"planted": [], "mix": [], "embed": []}
        for text in TEXTS * 4:
            ids = adapter.encode([text]).inputs
            p = adapter.module.planted(ids)[0]
            e = adapter.module.embed(ids)[0]
            xs["planted"].append(p); xs["embed"].append(e)
            xs["mix"].append(adapter.module.mix(torch.cat([p, e], -1)))
    xs = {k: torch.cat(v).double().numpy() for k, v in xs.items()}
    for r in t:
        assert r["score"] == pytest.approx(linear_cka(xs[r["layer_a"]], xs[r["layer_b"]]), abs=1e-9)
        assert r["n"] == sum(len(x) for x in TEXTS * 4)
    # the same from SQL, and the results are stored
    sql = many.sql("SELECT layer_a, layer_b, score FROM compare_layers(['planted:planted', 'planted:mix'], "
                   "'snippets')").fetchall()
    assert sql[0][2] == pytest.approx(next(r["score"] for r in t if r["layer_b"] == "mix"), abs=1e-12)
    assert many.sql("SELECT count(*) FROM similarities").fetchall() == [(4,)]
    # stored activations are read, not the model run: the same CKA, source 'stored'
    dbd.extract(many, "planted", ["planted", "mix"], "snippets")
    calls = dbd.catalog.session_of(many).adapters["planted"].module.calls
    again = dbd.compare_layers(many, ["planted:planted", "planted:mix"], "snippets").to_pylist()
    assert dbd.catalog.session_of(many).adapters["planted"].module.calls == calls
    assert again[0]["score"] == pytest.approx(next(r["score"] for r in t if r["layer_b"] == "mix"), abs=1e-9)
    assert many.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("stored",)]
    # embed is not stored: the model runs (for both of its layers)
    mixed = dbd.compare_layers(many, ["planted:planted", ("planted", "embed")], "snippets").to_pylist()
    assert dbd.catalog.session_of(many).adapters["planted"].module.calls > calls
    assert mixed[0]["score"] == pytest.approx(next(r["score"] for r in t if r["layer_b"] == "embed"
                                                   and r["layer_a"] == "planted"), abs=1e-9)
    # one symbol: CKA is undefined, stored as NULL (as an undefined score is), not NaN
    dbd.add_dataset(many, "one", ["x"])
    t1 = dbd.compare_layers(many, ["planted:planted", "planted:mix"], "one").to_pylist()
    assert [r["score"] for r in t1] == [None] and t1[0]["n"] == 1
    assert many.sql("SELECT count(*) FROM similarities WHERE dataset = 'one' AND score IS NULL").fetchall() == [(1,)]
    with pytest.raises(DeepBaseError, match="needs at least two unit groups"):
        dbd.compare_layers(many, ["planted:planted"], "snippets")
    with pytest.raises(DeepBaseError, match="is not 'model:layer'"):
        dbd.compare_layers(many, ["planted", "planted:mix"], "snippets")


def test_compare_layers_reads_each_models_own_stored_activations(con):
    """Two models with different weights: the CKA of their layers is the same whether both
    run, one is stored (stored+model) or both are stored (each stream reads its own model)."""
    a, c = planted_adapter(), planted_adapter()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in c.module.mix.parameters():
            p.copy_(torch.randn_like(p))
    dbd.register_model(con, "a", a)
    dbd.register_model(con, "c", c)
    dbd.add_dataset(con, "d", TEXTS)
    groups = ["a:mix", "c:planted", "c:mix"]
    want = [r["score"] for r in dbd.compare_layers(con, groups, "d").to_pylist()]
    assert want[2] < 0.99                                      # the two mix layers differ
    for model, source in (("a", "stored+model"), ("c", "stored")):
        dbd.extract(con, model, ["planted", "mix"], "d")
        got = [r["score"] for r in dbd.compare_layers(con, groups, "d").to_pylist()]
        assert got == pytest.approx(want, abs=1e-9)
        assert con.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [(source,)]


def test_permutation_p_values_do_not_depend_on_the_batching(many):
    """The permutation sample (capped below the rows read) is taken in key order, so batches of
    4 or 16 records give the same p-values (the rows came in another order, and the seeded
    permutations shuffled that order)."""
    kw = {"measures": ["corr"], "permutations": 30, "permutation_rows": 300, "reuse": False}
    got = []
    for bs in (4, 16):
        t = dbd.inspect(many, "planted", ["mix"], ["digit", "in_string"], "snippets", batch_size=bs, **kw)
        got.append({(r["unit"], r["hypothesis"]): r["detail"] for r in t.to_pylist()})
    assert got[0] == got[1]
    assert any('"perm_rows": 300' in d for d in got[0].values() if d)
