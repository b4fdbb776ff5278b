"""Caching with provenance: a repeated query reuses its scores, stored activations are read and
only missing records run through the model, and every query says what it reused."""
from __future__ import annotations

import json

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.hypotheses.core import get_hypothesis, hypothesis, register

from conftest import TEXTS, per_char_labels

HYPS = ["digit", "in_string"]


def module_of(con):
    return dbd.catalog.session_of(con).adapters["planted"].module


def last_query(con):
    qid, source, params = con.sql("SELECT query_id, source, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return qid, source, json.loads(params)


def by_key(table):
    return {(r["layer"], r["unit"], r["hypothesis"], r["measure"]): r["score"] for r in table.to_pylist()}


def test_identical_query_reuses_scores_and_does_not_run_the_model(planted):
    first = dbd.inspect(planted, "planted", ["planted", "mix"], HYPS, "snippets", measures=["corr", "pointbiserial"])
    q1, source, params = last_query(planted)
    assert source == "model" and params["reused"]["scores_of_query"] is None
    assert params["reused"]["activation_records_computed"] == len(TEXTS)
    assert params["reused"]["label_pairs_computed"] == len(TEXTS) * len(HYPS)
    calls = module_of(planted).calls
    second = dbd.inspect(planted, "planted", ["planted", "mix"], HYPS, "snippets", measures=["corr", "pointbiserial"])
    assert module_of(planted).calls == calls                       # the model did not run
    q2, source, params = last_query(planted)
    assert q2 == q1 + 1 and source == "cache" and params["reused"]["scores_of_query"] == q1
    assert set(second.column("query_id").to_pylist()) == {q2}
    assert by_key(first) == by_key(second)
    assert planted.sql("SELECT count(*) FROM scores WHERE query_id = ?", params=[q2]).fetchall() == [(first.num_rows,)]
    # reuse=False scans again, finding the labels stored by the first query
    third = dbd.inspect(planted, "planted", ["planted", "mix"], HYPS, "snippets", measures=["corr", "pointbiserial"], reuse=False)
    assert module_of(planted).calls > calls
    _, source, params = last_query(planted)
    assert source == "model" and params["reused"]["label_pairs_found"] == len(TEXTS) * len(HYPS)
    assert params["reused"]["label_pairs_computed"] == 0
    for k, v in by_key(first).items():
        assert (v is None and by_key(third)[k] is None) or v == pytest.approx(by_key(third)[k], abs=1e-12)


@pytest.mark.parametrize("change", ["measure", "records", "hypothesis_version", "weights"])
def test_a_different_query_is_not_served_from_the_cache(planted, change):
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    calls = module_of(planted).calls
    if change == "measure":
        dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", measures=["pointbiserial"])
    elif change == "records":
        dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets", limit=5)
    elif change == "hypothesis_version":
        original = get_hypothesis("digit")

        @hypothesis("digit", kind="binary", description="digits, redefined (a new version)")
        def digit_again(text):
            return [c.isdigit() and c != "0" for c in text]
        try:
            dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
        finally:
            register(original)
    else:
        import torch
        from conftest import planted_adapter
        other = planted_adapter()
        with torch.no_grad():
            other.module.embed.weight.add_(1.0)
        dbd.register_model(planted, "planted", other)
        calls = other.module.calls
        dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
        assert other.module.calls > calls
        assert last_query(planted)[1] == "model"
        return
    assert module_of(planted).calls > calls
    assert last_query(planted)[1] == "model"


def test_only_missing_records_run_through_the_model(planted):
    n = len(TEXTS)
    dbd.extract(planted, "planted", ["planted"], "snippets", record_ids=list(range(10)))
    module = module_of(planted)
    seen = []
    hook = module.planted.register_forward_hook(lambda m, i, o: seen.append(int(i[0].shape[0])))
    try:
        res = dbd.inspect(planted, "planted", ["planted"], HYPS, "snippets", keep_activations=True)
    finally:
        hook.remove()
    assert sum(seen) == n - 10                                     # only the missing records ran
    _, source, params = last_query(planted)
    assert source == "stored+model"
    assert params["reused"]["activation_records_read"] == 10
    assert params["reused"]["activation_records_computed"] == n - 10
    # the scores equal an independent numpy computation over every record
    acts = np.concatenate([module.planted(dbd.catalog.session_of(planted).adapters["planted"].encode([t]).inputs)[0]
                           .detach().numpy() for t in TEXTS])
    for name in HYPS:
        y = np.concatenate([per_char_labels(get_hypothesis(name), t) for t in TEXTS])
        ok = ~np.isnan(y)
        got = {r["unit"]: r["score"] for r in res.to_pylist() if r["hypothesis"] == name}
        for u in (0, 1, 3, 4):
            assert got[u] == pytest.approx(np.corrcoef(acts[ok, u], y[ok])[0, 1], abs=1e-5)
    # everything is stored now: the next scan reads it all and the model does not run
    seen.clear()
    hook = module.planted.register_forward_hook(lambda m, i, o: seen.append(int(i[0].shape[0])))
    try:
        dbd.inspect(planted, "planted", ["planted"], HYPS, "snippets", reuse=False)
    finally:
        hook.remove()
    assert seen == [] and last_query(planted)[1] == "stored"
    assert last_query(planted)[2]["reused"]["activation_records_read"] == n
