"""A progressive query over several models, or with its untrained twin (baseline=True), stops every
model at the same window: the scan goes on until every model's stop rule holds (or the records
run out), so that all models are scored on the same records (compare_scores compares like with
like) and the one ``queries`` row (records used, symbols, stop rule, bound) is true of each."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import planted_adapter

import deepbase_duck as dbd
from deepbase_duck.engine import LocalEngine

pytestmark = pytest.mark.usefixtures("one_thread")
HYPS = ["digit", "in_string"]
TESTS = str(Path(__file__).resolve().parent)


def _texts():
    rng = random.Random(0)
    return ["".join(rng.choice("abc 0123456789()'#\n") for _ in range(rng.randint(5, 60))) for _ in range(300)]


def _other_weights():
    """The planted model with other embedding weights: its scores settle at another window."""
    adapter = planted_adapter()
    with torch.no_grad():
        adapter.module.embed.weight.copy_(
            torch.randn(adapter.module.embed.weight.shape, generator=torch.Generator().manual_seed(7)) * 3)
    adapter._checksum = None
    return adapter


@pytest.fixture(scope="module")
def two():
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "m1", planted_adapter())
    dbd.register_model(con, "m2", _other_weights())
    dbd.add_dataset(con, "snippets", _texts())
    yield con
    dbd.close(con)


def _last(con):
    qid, params, n_records, n_symbols = con.sql("SELECT query_id, params, n_records, n_symbols FROM queries "
                                                "ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return qid, json.loads(params), n_records, n_symbols


def _per_model(con, qid):
    """{model: (largest n, the windows in the batch-means interval)} of a query's scores."""
    rows = con.sql(f"SELECT model, max(n), list(DISTINCT detail->>'interval') FROM scores WHERE query_id = {qid} "
                   f"GROUP BY model ORDER BY model").fetchall()
    return {m: (n, tuple(sorted(w))) for m, n, w in rows}


def _scores(t):
    return {(r["model"], r["layer"], r["unit"], r["hypothesis"], r["measure"]):
            (r["score"], r["n"], r["ci_low"], r["ci_high"], r["p_value"]) for r in t.to_pylist()}


def _same(x, y, tol=0.0) -> bool:
    """Equal scores (within ``tol``), both NULL, or both NaN."""
    if x is None or y is None:
        return x is None and y is None
    return abs(x - y) <= tol or (x != x and y != y)


def _alone(con, model, **kw):
    dbd.inspect(con, model, ["embed"], HYPS, "snippets", **kw)
    return _last(con)[1]["records_used"]


@pytest.mark.parametrize("order", [["m1", "m2"], ["m2", "m1"]])
def test_models_of_one_progressive_query_stop_at_the_same_window(two, order):
    """Alone, m1 and m2 stop after different numbers of records; queried together each is scored
    on the same records, at least as many as either needs alone, and the queries row's records,
    symbols, rule and bound hold for both (before: m2's own stop appeared nowhere)."""
    kw = {"max_error": 0.03, "seed": 2}
    alone = {m: _alone(two, m, **kw) for m in ("m1", "m2")}
    assert alone["m1"] != alone["m2"]                  # the case: the models settle at other windows
    t = dbd.inspect(two, order, ["embed"], HYPS, "snippets", **kw)
    qid, p, n_records, n_symbols = _last(two)
    per = _per_model(two, qid)
    assert len({v for v in per.values()}) == 1       # the same symbols and windows for each model
    assert [n for n, _ in per.values()] == [n_symbols, n_symbols]
    assert p["records_used"] == n_records >= max(alone.values()) and "per_model" not in p
    assert p["stopped_early"] and p["stop_rule"] == "max_error" and p["bound_reached"] <= 0.03
    assert n_records < 300
    # each model's scores are those of its own scan held to that window: the same as scoring it
    # on the records used, as a query that reads exactly those (max_error tiny: every window of them)
    used = [r for (r,) in two.sql(f"SELECT record_id FROM seeded_order('snippets', seed := 2) "
                                  f"LIMIT {n_records}").fetchall()]
    for m in ("m1", "m2"):
        ref = dbd.inspect(two, m, ["embed"], HYPS, "snippets", record_ids=used, max_error=1e-9, seed=2)
        got = {k: v for k, v in _scores(t).items() if k[0] == m}
        want = _scores(ref)
        assert got.keys() == want.keys()
        for k in got:
            assert got[k][1] == want[k][1] and _same(got[k][0], want[k][0], 1e-12), (k, got[k], want[k])


def test_the_stop_window_does_not_depend_on_the_models_order(two):
    kw = {"max_error": 0.03, "seed": 2, "reuse": False}
    a = dbd.inspect(two, ["m1", "m2"], ["embed"], HYPS, "snippets", **kw)
    pa_ = _last(two)
    b = dbd.inspect(two, ["m2", "m1"], ["embed"], HYPS, "snippets", **kw)
    pb = _last(two)
    assert pa_[2:] == pb[2:] and pa_[1]["bound_reached"] == pytest.approx(pb[1]["bound_reached"], abs=1e-12)
    sa, sb = _scores(a), _scores(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert all(_same(x, y) for x, y in zip(sa[k], sb[k])), (k, sa[k], sb[k])


class RestartingEngine:
    """An engine without ``resume``: a run that must go on is scanned again from the start."""

    name = "restarting"
    mixes_stored = True

    def __init__(self):
        self.runs = []

    def run(self, session, plan, progress=None):
        self.runs.append((plan.model, plan.min_windows))
        return LocalEngine().run(session, plan, progress)


def test_baseline_twin_stops_with_its_model_and_a_resumed_scan_equals_a_restarted_one(two, monkeypatch):
    """With baseline=True the model and its untrained twin stop at the same window (before: each at
    its own, the queries row telling the model's only), whether the engine resumes the run that
    stopped first (LocalEngine) or scans it again (an engine without resume): the same scores."""
    kw = {"max_error": 0.05, "seed": 2}
    resumed = []
    real = LocalEngine.run

    def spy(self, session, plan, progress=None, resume=None):
        resumed.append(resume is not None)
        return real(self, session, plan, progress, **({"resume": resume} if resume is not None else {}))
    monkeypatch.setattr(LocalEngine, "run", spy)
    t = dbd.inspect(two, "m2", ["embed"], HYPS, "snippets", baseline=True, **kw)
    qid, p, n_records, n_symbols = _last(two)
    assert any(resumed)                                # m2 stopped before its twin and went on
    per = _per_model(two, qid)
    assert set(per) == {"m2", "m2~untrained"} and len(set(per.values())) == 1
    assert per["m2"][0] == n_symbols and p["records_used"] == n_records
    monkeypatch.setattr(LocalEngine, "run", real)
    alone = {m: _alone(two, m, **kw) for m in ("m2", "m2~untrained")}
    assert alone["m2"] != alone["m2~untrained"] and n_records >= max(alone.values())
    engine = RestartingEngine()
    again = dbd.inspect(two, "m2", ["embed"], HYPS, "snippets", baseline=True, engine=engine, reuse=False, **kw)
    assert len(engine.runs) == 3 and engine.runs[-1][1] > 0        # m2 scanned again, held to the twin's window
    assert _last(two)[2:] == (n_records, n_symbols)
    a, b = _scores(t), _scores(again)
    assert a.keys() == b.keys()
    for k in a:
        assert all(_same(x, y) for x, y in zip(a[k], b[k])), (k, a[k], b[k])


def test_ranking_and_bound_rules_together_over_two_models(two):
    """top_k with max_error: both models stop at one window; stop_rule names each model's rule
    where they differ."""
    dbd.inspect(two, ["m1", "m2"], ["embed"], HYPS, "snippets", max_error=0.03, top_k=1, seed=2)
    qid, p, n_records, n_symbols = _last(two)
    per = _per_model(two, qid)
    assert len(set(per.values())) == 1 and per["m1"][0] == n_symbols
    assert p["stop_rule"] in ("max_error", "top_k") or p["stop_rule"].startswith("m1: ")


def test_ray_engine_stops_the_models_together_as_the_local_engine(tmp_path, monkeypatch):
    """The Ray engine resumes its runs the same way: the same records and scores as the local
    engine for a progressive query over two models (the first stops earlier than the second)."""
    ray = pytest.importorskip("ray")
    weights = tmp_path / "m2.pt"
    torch.save(_other_weights().module.state_dict(), weights)
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "m1", "ray_models:planted")
    dbd.register_model(con, "m2", "ray_models:from_file", {"path": str(weights)})
    dbd.add_dataset(con, "snippets", _texts()[:200])
    kw = {"max_error": 0.04, "seed": 2}
    alone = {m: _alone(con, m, **kw) for m in ("m2", "m1")}
    order = sorted(alone, key=alone.get)               # the first stops first alone: it must go on
    assert alone[order[0]] < alone[order[1]]
    local = dbd.inspect(con, order, ["embed"], HYPS, "snippets", **kw)
    lp = _last(con)
    from deepbase_duck.engine.ray_engine import RayEngine
    resumed, real = [], RayEngine._scan

    def spy(self, *args):
        resumed.append(args[-1] is not None)
        return real(self, *args)
    monkeypatch.setattr(RayEngine, "_scan", spy)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, runtime_env={"env_vars": {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}},
                 log_to_driver=False, logging_level="ERROR", include_dashboard=False)
    try:
        remote = dbd.inspect(con, order, ["embed"], HYPS, "snippets", engine="ray", reuse=False,
                             ray_options={"num_workers": 1, "keep_workers": False}, **kw)
    finally:
        if started:
            ray.shutdown()
    rp = _last(con)
    assert resumed == [False, False, True]             # the first model's run went on, on Ray
    assert rp[1]["engine"] == "ray" and rp[2:] == lp[2:] and rp[2] >= alone[order[1]]
    per = _per_model(con, rp[0])
    assert len(set(per.values())) == 1
    a, b = _scores(local), _scores(remote)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][1] == b[k][1] and _same(a[k][0], b[k][0], 1e-9), (k, a[k], b[k])
    dbd.close(con)
