"""Caching with provenance: a repeated query reuses its scores, stored activations are read and
only missing records run through the model, and every query says what it reused."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.hypotheses.core import get_hypothesis, hypothesis, register

from conftest import TEXTS, per_char_labels, planted_adapter

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


# -- a model's identity: weights, module classes, variant ------------------------------------------

def _ablated_adapter():
    """The planted model's weights with its `planted` submodule in a subclass whose forward
    zeroes unit 0 (an ablation written as code): the same weights, another model."""
    import torch
    from conftest import Planted, PlantedModel, planted_adapter
    from deepbase_duck.extraction.adapters import CharAdapter
    from deepbase_duck.models.charlstm import encode_chars

    class ZeroUnit0(Planted):
        def forward(self, ids):
            return super().forward(ids) * torch.tensor([0.0, 1, 1, 1, 1])

    m = PlantedModel()
    m.planted = ZeroUnit0()
    m.load_state_dict(planted_adapter().module.state_dict())
    return CharAdapter(m, encode_chars, "chars-test", device="cpu")


def test_the_same_weights_in_another_class_or_variant_are_another_model(planted):
    from conftest import planted_adapter
    from deepbase_duck.extraction.adapters import weights_checksum
    ablated, base = _ablated_adapter(), planted_adapter()
    assert weights_checksum(ablated.module) == weights_checksum(base.module)
    assert ablated.checksum != base.checksum
    tagged = planted_adapter()
    tagged.variant = "hook: zero unit 3"
    assert tagged.checksum != base.checksum and planted_adapter().checksum == base.checksum
    # activations stored from the base model are not read for the ablated one, nor its scores reused
    dbd.extract(planted, "planted", ["planted", "mix"], "snippets")
    dbd.register_model(planted, "ablated", ablated)
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    assert last_query(planted)[1] == "stored"
    t = dbd.inspect(planted, "ablated", ["planted"], ["digit"], "snippets")
    _, source, params = last_query(planted)
    assert source == "model" and params["reused"]["activation_records_read"] == 0
    score = {r["unit"]: r["score"] for r in t.to_pylist()}
    assert score[0] is None                                         # the ablated unit is constant
    assert score[1] == pytest.approx(-1.0, abs=0.01)                # the others as in the base model


def test_a_store_keyed_by_weights_alone_is_adopted_on_load(tmp_path):
    """Stores written before identities covered module classes hold the weights' checksum: a
    loader-registered model there is recognised by its weights, its row and its behaviors move to
    the new checksum, and its stored activations are read, not recomputed."""
    import sys
    from pathlib import Path
    from deepbase_duck.extraction.adapters import weights_checksum
    sys.path.insert(0, str(Path(__file__).parent))                 # tests/ray_models.py: a loader spec
    path = str(tmp_path / "old.duckdb")
    con = dbd.connect(path, progress=False)
    dbd.register_model(con, "p", "ray_models:planted")
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "p", ["planted"], "snippets")
    new = con.sql("SELECT checksum FROM models").fetchall()[0][0]
    old = weights_checksum(dbd.catalog.session_of(con).adapter("p").module)
    con.execute("UPDATE models SET checksum = ?, identity = NULL", [old])     # as the earlier code wrote them
    con.execute("UPDATE behaviors SET model_checksum = ?", [old])
    dbd.close(con)
    con = dbd.connect(path, progress=False)
    try:
        t = dbd.inspect(con, "p", ["planted"], ["digit"], "snippets")
        _, source, params = last_query(con)
        assert source == "stored" and params["reused"]["activation_records_read"] == len(TEXTS)
        assert con.sql("SELECT checksum FROM models").fetchall() == [(new,)]
        assert con.sql("SELECT DISTINCT model_checksum FROM behaviors").fetchall() == [(new,)]
        assert {r["unit"]: r["score"] for r in t.to_pylist()}[0] == pytest.approx(1.0)
    finally:
        dbd.close(con)


def test_registering_a_hooked_model_without_a_variant_warns(planted):
    from conftest import planted_adapter
    ad = planted_adapter()
    ad.module.mix.register_forward_hook(lambda m, i, o: o * 0)
    with pytest.warns(UserWarning, match=r"modules mix carry forward hooks.*set adapter.variant"):
        dbd.register_model(planted, "hooked", ad)
    named = planted_adapter()
    named.module.mix.register_forward_hook(lambda m, i, o: o * 0)
    named.variant = "mix zeroed"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dbd.register_model(planted, "hooked_named", named)
    rows = dict(planted.sql("SELECT name, checksum FROM models").fetchall())
    assert rows["hooked"] == rows["planted"] != rows["hooked_named"]     # the hook alone is invisible


def test_an_earlier_store_whose_model_cannot_load_still_reads_its_activations(tmp_path):
    """A weights-keyed row whose loader fails here (a package missing on this machine): queries
    that only read stored activations still run, under the store's own keys."""
    import sys
    from pathlib import Path
    from deepbase_duck.extraction.adapters import weights_checksum
    sys.path.insert(0, str(Path(__file__).parent))
    path = str(tmp_path / "old.duckdb")
    con = dbd.connect(path, progress=False)
    dbd.register_model(con, "p", "ray_models:planted")
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "p", ["planted"], "snippets")
    old = weights_checksum(dbd.catalog.session_of(con).adapter("p").module)
    con.execute("UPDATE models SET checksum = ?, identity = NULL, loader = 'no_such_package.zoo:model'", [old])
    con.execute("UPDATE behaviors SET model_checksum = ?", [old])
    dbd.close(con)
    con = dbd.connect(path, progress=False)
    try:
        t = dbd.inspect(con, "p", ["planted"], ["digit"], "snippets")
        assert last_query(con)[1] == "stored"
        assert {r["unit"]: r["score"] for r in t.to_pylist()}[0] == pytest.approx(1.0)
        assert con.sql("SELECT checksum, identity FROM models").fetchall() == [(old, None)]
        with pytest.raises(Exception, match="no_such_package"):
            dbd.inspect(con, "p", ["mix"], ["digit"], "snippets")          # this one needs the model
    finally:
        dbd.close(con)


def test_library_output_capturing_hooks_are_not_user_hooks():
    """transformers keeps output-capturing hooks on a model once hidden states were asked for:
    they change nothing, so they neither warn nor stop fusion; a user's hook does."""
    import torch
    from deepbase_duck.extraction.hooks import user_hooks
    from deepbase_duck.models.zoo import minilm
    ad = minilm()
    with torch.inference_mode():
        ad.module(**ad.tokenizer(["a short sentence"], return_tensors="pt"), output_hidden_states=True)
    assert user_hooks(ad.module) == []
    ad.module.encoder.layer[1].register_forward_hook(lambda m, i, o: o)
    assert user_hooks(ad.module) == ["encoder.layer.1"]


# -- a live model edited between two queries --------------------------------------------------------

def _mix_outputs(con, texts):
    """The `mix` layer's activations computed directly from the module (no engine)."""
    import torch
    adapter = dbd.catalog.session_of(con).adapters["planted"]
    with torch.no_grad():
        return np.concatenate([adapter.module(adapter.encode([t]).inputs)[0].numpy() for t in texts])


def test_a_live_model_edited_in_place_is_another_model(planted):
    """An ablation done in place (a weight zeroed under no_grad) between two queries: the second
    query runs the edited model (neither the first query's scores nor its stored activations are
    reused), its scores are the edited model's (numpy reference), the catalog keys it by the new
    checksum; restoring the weights makes the first query's scores valid again."""
    import torch
    from deepbase_duck.extraction.adapters import model_checksum
    module = module_of(planted)
    kw = {"measures": ["corr"], "keep_activations": True}
    first = dbd.inspect(planted, "planted", ["mix"], HYPS, "snippets", **kw)
    q1, source, _ = last_query(planted)
    assert source == "model"
    saved = module.mix[0].weight.detach().clone()
    with torch.no_grad():
        module.mix[0].weight[:, 0] = 0.0            # unit 0 of `planted` no longer reaches `mix`
    second = dbd.inspect(planted, "planted", ["mix"], HYPS, "snippets", **kw)
    _, source, params = last_query(planted)
    assert source == "model" and params["reused"]["scores_of_query"] is None
    assert params["reused"]["activation_records_read"] == 0
    (checksum, loader), = planted.sql("SELECT checksum, loader FROM models WHERE name = 'planted'").fetchall()
    assert checksum == model_checksum(module) and loader is None
    acts = _mix_outputs(planted, TEXTS)
    y = np.concatenate([per_char_labels(get_hypothesis("digit"), t) for t in TEXTS])
    got = {r["unit"]: r["score"] for r in second.to_pylist() if r["hypothesis"] == "digit"}
    for u in range(4):
        assert got[u] == pytest.approx(np.corrcoef(acts[:, u], y)[0, 1], abs=1e-5)
    assert max(abs(by_key(first)[k] - by_key(second)[k]) for k in by_key(first)) > 1e-3
    # the original weights back: the first model's key again, its stored activations read (the
    # model does not run) and, without keep_activations, its scores served from the cache
    with torch.no_grad():
        module.mix[0].weight.copy_(saved)
    calls = module.calls
    third = dbd.inspect(planted, "planted", ["mix"], HYPS, "snippets", **kw)
    _, source, params = last_query(planted)
    assert source == "stored" and params["reused"]["activation_records_read"] == len(TEXTS)
    assert module.calls == calls
    assert all(v == pytest.approx(by_key(third)[k], abs=1e-12) for k, v in by_key(first).items())
    dbd.inspect(planted, "planted", ["mix"], HYPS, "snippets", measures=["corr"])
    _, source, params = last_query(planted)
    assert source == "cache" and params["reused"]["scores_of_query"] in (q1, q1 + 2)


def test_writes_through_data_and_swapped_submodules_are_seen(planted):
    """PyTorch's version counter misses writes through `.data`; the fingerprint's sampled values
    see a whole-tensor one. A swapped submodule is another tensor object. An unchanged model is
    not hashed again (the checksum is computed once)."""
    import torch
    from deepbase_duck.extraction import adapters
    adapter = dbd.catalog.session_of(planted).adapters["planted"]
    before = adapter.checksum
    calls = []
    real = adapters.model_checksum
    adapters.model_checksum = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert adapter.checksum == before and calls == []          # unchanged: not hashed again
        adapter.module.mix[0].bias.data.copy_(torch.tensor([0.5, -0.5, 0.25, 2.0]))
        after_data = adapter.checksum
        assert after_data != before and len(calls) == 1
        torch.manual_seed(1)
        adapter.module.embed = torch.nn.Embedding(adapter.module.embed.num_embeddings, 3)
        assert adapter.checksum not in (before, after_data) and len(calls) == 2
        swapped = adapter.checksum
        adapter.module.embed.weight.data[5] = 0                       # one unit's row, between the probes
        assert adapter.checksum not in (before, after_data, swapped) and len(calls) == 3
    finally:
        adapters.model_checksum = real
    assert adapter.checksum == real(adapter.module)
    dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets")
    assert planted.sql("SELECT checksum FROM models WHERE name = 'planted'").fetchall() == [(adapter.checksum,)]


def test_a_loaded_model_edited_in_place_is_registered_as_live(con):
    """A model registered by loader spec and then edited in place is no longer what the loader
    yields: its row becomes a live registration (no loader), keyed by the edited checksum."""
    import torch
    dbd.register_model(con, "lstm", "deepbase_duck.models.zoo:charlstm", {"checkpoint": "final"})
    dbd.add_dataset(con, "few", TEXTS[:4])
    dbd.inspect(con, "lstm", ["lstm0"], ["digit"], "few")
    (c0, loader), = con.sql("SELECT checksum, loader FROM models WHERE name = 'lstm'").fetchall()
    assert loader == "deepbase_duck.models.zoo:charlstm"
    adapter = dbd.catalog.session_of(con).adapter("lstm")
    with torch.no_grad():
        adapter.module.lstm0.weight_hh_l0.mul_(0.5)
    dbd.inspect(con, "lstm", ["lstm0"], ["digit"], "few")
    assert last_query(con)[1] == "model"
    (c1, loader), = con.sql("SELECT checksum, loader FROM models WHERE name = 'lstm'").fetchall()
    assert c1 != c0 and c1 == adapter.checksum and loader is None


def test_replacing_a_dataset_drops_its_stored_activations(planted):
    """add_dataset(..., replace=True) with other texts under the same name: the activations stored
    for the old records (catalog rows, view, Parquet folder) go with them, and the next query runs
    the model on the new texts (its scores equal a fresh store's), instead of reading the old
    records' activations by record id."""
    session = dbd.catalog.session_of(planted)
    out = dbd.extract(planted, "planted", ["planted", "mix"], "snippets")
    views = [r["view"] for r in out]
    folders = [session.act_root / d for (d,) in planted.sql("SELECT directory FROM behaviors").fetchall()]
    assert len(folders) == 2 and all(f.is_dir() for f in folders)
    new_texts = ["x = 7 + 'a' * 3\n", "print([1, 2], 'z9')\n", "no digits\n"]
    dbd.add_dataset(planted, "snippets", new_texts, replace=True)
    assert planted.sql("SELECT count(*) FROM behaviors").fetchall() == [(0,)]
    assert planted.sql("SELECT count(*) FROM behavior_records").fetchall() == [(0,)]
    assert not any(f.exists() for f in folders)
    for v in views:
        with pytest.raises(Exception, match=v):
            planted.sql(f"SELECT count(*) FROM {v}").fetchall()
    got = dbd.inspect(planted, "planted", ["planted", "mix"], HYPS, "snippets")
    _, source, params = last_query(planted)
    assert source == "model" and params["reused"]["activation_records_read"] == 0
    fresh = dbd.connect(None, progress=False)
    try:
        from conftest import planted_adapter
        dbd.register_model(fresh, "planted", planted_adapter())
        dbd.add_dataset(fresh, "snippets", new_texts)
        want = by_key(dbd.inspect(fresh, "planted", ["planted", "mix"], HYPS, "snippets"))
    finally:
        dbd.close(fresh)
    assert by_key(got).keys() == want.keys()
    for k, v in want.items():
        assert (v is None and by_key(got)[k] is None) or by_key(got)[k] == pytest.approx(v, abs=1e-12)
    assert by_key(got)[("planted", 0, "digit", "corr")] == pytest.approx(1.0)   # the planted digit unit


def test_a_dataset_extended_by_new_records_keeps_what_was_stored(planted):
    """add_dataset with the stored texts followed by new ones appends the new records (no
    replace needed): the stored activations of the old ones are read, only the new ones run
    through the model, and the scores equal a fresh store's. The same texts again, even with
    replace=True, drop nothing; new sources for them are stored, the activations kept."""
    dbd.extract(planted, "planted", ["planted", "mix"], "snippets")
    more = ["q = 5 * (6 + 7)\n", "text = 'no 8'\n", "pass\n"]
    assert dbd.add_dataset(planted, "snippets", TEXTS + more) == len(TEXTS) + len(more)
    assert planted.sql("SELECT count(*) FROM behavior_records").fetchall() == [(2 * len(TEXTS),)]
    got = dbd.inspect(planted, "planted", ["planted", "mix"], HYPS, "snippets")
    _, source, params = last_query(planted)
    assert source == "stored+model"
    assert params["reused"]["activation_records_read"] == len(TEXTS)
    assert params["reused"]["activation_records_computed"] == len(more)
    fresh = dbd.connect(None, progress=False)
    try:
        from conftest import planted_adapter
        dbd.register_model(fresh, "planted", planted_adapter())
        dbd.add_dataset(fresh, "snippets", TEXTS + more)
        want = by_key(dbd.inspect(fresh, "planted", ["planted", "mix"], HYPS, "snippets"))
    finally:
        dbd.close(fresh)
    for k, v in want.items():
        assert (v is None and by_key(got)[k] is None) or by_key(got)[k] == pytest.approx(v, abs=1e-12)
    # the same texts: nothing dropped, with replace=True too; new sources are taken
    dbd.extract(planted, "planted", ["planted", "mix"], "snippets")
    stored = planted.sql("SELECT count(*) FROM behavior_records").fetchall()
    recs = [{"text": t, "source": f"file.py:{i}"} for i, t in enumerate(TEXTS + more)]
    dbd.add_dataset(planted, "snippets", recs, replace=True)
    assert planted.sql("SELECT count(*) FROM behavior_records").fetchall() == stored
    assert planted.sql("SELECT source FROM records WHERE dataset = 'snippets' AND record_id = 3").fetchall() == \
        [("file.py:3",)]
    dbd.inspect(planted, "planted", ["planted", "mix"], HYPS, "snippets", reuse=False)
    assert last_query(planted)[1] == "stored"
    with pytest.raises(dbd.DeepBaseError, match="already exists with different records"):
        dbd.add_dataset(planted, "snippets", more + TEXTS)           # not an extension: refused


def test_a_record_edited_in_place_with_sql_is_computed_again(planted):
    """UPDATE records SET text = ... behind the library's back: the next query notices (text_md5),
    warns naming the record, drops its symbols and labels and the activation parts holding it,
    and scores the edited texts (equal to a fresh store's); the other parts are still read."""
    dbd.extract(planted, "planted", ["planted"], "snippets", batch_size=8)      # parts of 8 records
    dbd.annotate(planted, HYPS, "snippets")
    planted.execute("UPDATE records SET text = 'k = [9, 9]  # 99\\n' WHERE dataset = 'snippets' AND record_id = 3")
    texts = [t for (t,) in planted.sql("SELECT text FROM records WHERE dataset = 'snippets' ORDER BY record_id"
                                       ).fetchall()]
    with pytest.warns(UserWarning, match=r"dataset 'snippets': the text of 1 record\(s\) \(3\) changed"):
        got = dbd.inspect(planted, "planted", ["planted"], HYPS, "snippets")
    _, source, params = last_query(planted)
    assert source == "stored+model"
    assert params["reused"]["activation_records_computed"] == 8                 # the part holding record 3
    assert params["reused"]["activation_records_read"] == len(TEXTS) - 8
    assert params["reused"]["label_pairs_computed"] == len(HYPS)                 # record 3's labels only
    assert planted.sql("SELECT count(*) FROM symbols WHERE dataset = 'snippets' AND record_id = 3").fetchall() == \
        [(len(texts[3]),)]
    fresh = dbd.connect(None, progress=False)
    try:
        from conftest import planted_adapter
        dbd.register_model(fresh, "planted", planted_adapter())
        dbd.add_dataset(fresh, "snippets", texts)
        want = by_key(dbd.inspect(fresh, "planted", ["planted"], HYPS, "snippets"))
    finally:
        dbd.close(fresh)
    for k, v in want.items():
        assert (v is None and by_key(got)[k] is None) or by_key(got)[k] == pytest.approx(v, abs=1e-12)
    # nothing changed since: no warning, and a new extraction stores the dropped part's records again
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dbd.extract(planted, "planted", ["planted"], "snippets")
    assert res[0]["extracted"] == 8
    assert planted.sql(f"SELECT count(*) FROM {res[0]['view']}").fetchall() == [(sum(map(len, texts)),)]


def test_drop_dataset_removes_what_was_stored_from_it_and_keeps_results(planted):
    session = dbd.catalog.session_of(planted)
    dbd.inspect(planted, "planted", ["planted"], HYPS, "snippets", keep_activations=True)
    folder = session.act_root / planted.sql("SELECT directory FROM behaviors").fetchall()[0][0]
    n_scores = planted.sql("SELECT count(*) FROM scores").fetchall()[0][0]
    assert dbd.drop_dataset(planted, "snippets") == {"dataset": "snippets", "records": len(TEXTS), "behaviors": 1}
    for table in ("datasets", "records", "symbols", "tokenized_records", "labels", "labeled_records", "behaviors",
                  "behavior_parts", "behavior_records"):
        assert planted.sql(f"SELECT count(*) FROM {table}").fetchall() == [(0,)], table
    assert not folder.exists()
    assert planted.sql("SELECT count(*) FROM scores").fetchall() == [(n_scores,)]     # results stay
    with pytest.raises(dbd.UnknownNameError, match="snippets"):
        dbd.drop_dataset(planted, "snippets")


def test_the_same_weights_under_another_name_share_scores_not_the_name(planted):
    """A cache hit for another name of the same weights is relabelled: its rows, its twin's
    (baseline) rows and its params name the model queried, so compare_scores pairs them."""
    from conftest import planted_adapter
    dbd.register_model(planted, "copy", planted_adapter())
    first = dbd.inspect(planted, "planted", ["planted"], HYPS, "snippets", baseline=True)
    second = dbd.inspect(planted, "copy", ["planted"], HYPS, "snippets", baseline=True)
    _, source, params = last_query(planted)
    assert source == "cache" and params["models"] == ["copy"]
    assert set(second.column("model").to_pylist()) == {"copy", "copy~untrained"}
    assert set(first.column("model").to_pylist()) == {"planted", "planted~untrained"}
    assert {k: v for k, v in by_key(second).items()} == by_key(first)
    n = planted.sql("SELECT count(*) FROM compare_scores('planted', 'copy')").fetchall()[0][0]
    assert n == len([r for r in first.to_pylist() if r["model"] == "planted" and r["unit"] is not None])


def test_another_tokenisation_of_the_same_weights_is_not_served_from_the_cache(planted):
    from conftest import PlantedModel, planted_adapter
    from deepbase_duck.extraction.adapters import CharAdapter
    from deepbase_duck.models.charlstm import encode_chars
    other = CharAdapter(PlantedModel(), encode_chars, "chars-other", device="cpu")
    other.module.load_state_dict(planted_adapter().module.state_dict())
    dbd.register_model(planted, "other", other)
    dbd.inspect(planted, "planted", ["planted"], ["digit"], "snippets")
    dbd.inspect(planted, "other", ["planted"], ["digit"], "snippets")
    assert last_query(planted)[1] == "model"


def test_the_stored_dtype_read_is_part_of_the_cache_key(planted):
    """Scores read from float16 activations are not served once float32 ones are stored (the
    scan now reads those); the dtype asked for without keep_activations, which would change
    nothing, is refused."""
    dbd.extract(planted, "planted", ["mix"], "snippets", dtype="float16")
    half = by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets"))
    assert last_query(planted)[1] == "stored"
    with pytest.raises(dbd.DeepBaseError, match="dtype"):
        dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", dtype="float16")
    dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets")
    assert last_query(planted)[1] == "cache"
    dbd.extract(planted, "planted", ["mix"], "snippets", dtype="float32")
    full = by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets"))
    assert last_query(planted)[1] == "stored"
    fresh = by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", reuse=False))
    assert full == pytest.approx(fresh, abs=1e-12) and any(
        a is not None and abs(a - half[k]) > 1e-6 for k, a in full.items())
    with pytest.raises(dbd.DeepBaseError, match="dtype must be one of float32, float16"):
        dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", dtype="float64")


def test_an_early_stopped_scan_over_stored_activations_reports_the_records_it_read(con):
    from conftest import planted_adapter
    rng = np.random.default_rng(3)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "many", ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(120)])
    dbd.extract(con, "planted", ["mix"], "many")
    dbd.inspect(con, "planted", ["mix"], ["digit"], "many", max_error=0.3, batch_size=4, seed=1)
    _, source, params = last_query(con)
    assert source == "stored" and params["records_used"] < 120
    assert params["reused"]["activation_records_read"] == params["records_used"]


def test_a_hypothesis_known_only_by_its_labels_names_the_records_it_cannot_label(planted):
    from deepbase_duck.errors import HypothesisError
    from deepbase_duck.hypotheses.core import _REGISTRY

    @hypothesis("only_stored")
    def only_stored(text):
        return [(0, 1)]
    dbd.inspect(planted, "planted", ["planted"], ["only_stored"], "snippets")
    dbd.add_dataset(planted, "snippets", TEXTS + ["z = 3\n"])            # one record appended
    del _REGISTRY["only_stored"]                                        # as in a later process
    before = planted.sql("SELECT count(*) FROM behaviors").fetchall()
    with pytest.raises(HypothesisError, match=r"known to this store only by its stored labels, and 1 selected"):
        dbd.inspect(planted, "planted", ["planted"], ["only_stored"], "snippets", keep_activations=True)
    assert planted.sql("SELECT count(*) FROM behaviors").fetchall() == before


def test_a_hypothesis_known_only_by_its_stored_labels_scores_the_records_it_labelled(con, monkeypatch):
    """A store read in a process without the hypothesis' code (another session, the shell): its
    stored labels serve the records they cover, with the scores of the session that had the code;
    records without labels are an error saying so (a scan crashed on the missing code instead)."""
    from deepbase_duck.hypotheses import core
    from deepbase_duck.errors import HypothesisError
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.add_dataset(con, "more", TEXTS[:3])
    h = core.Hypothesis("vowel_only_stored", lambda t: [float(c in "aeiou") for c in t], "binary")
    core.register(h)
    want = dbd.inspect(con, "planted", ["planted"], ["vowel_only_stored"], "snippets")
    monkeypatch.delitem(core._REGISTRY, "vowel_only_stored")          # as in a process without its code
    got = dbd.inspect(con, "planted", ["planted"], ["vowel_only_stored"], "snippets", reuse=False)
    assert got.column("score").to_pylist() == pytest.approx(want.column("score").to_pylist(), abs=1e-12)
    with pytest.raises(HypothesisError, match="known to this store only by its stored labels"):
        dbd.inspect(con, "planted", ["planted"], ["vowel_only_stored"], "more")


@pytest.mark.parametrize("pipeline", [False, True])
def test_an_early_stopped_scan_over_partly_stored_activations_runs_only_the_rest(con, pipeline):
    """A progressive scan of a dataset whose activations are stored for some records only (a
    dataset grown since its extraction) reads those and runs the model on the others, batch by
    batch: the same records used and the same scores as a scan over the model alone."""
    from conftest import planted_adapter
    rng = np.random.default_rng(3)
    texts = ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(120)]
    adapter = planted_adapter()
    rows = []
    adapter.module.planted.register_forward_hook(lambda m, i, o: rows.append(int(i[0].shape[0])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # (the counting hook changes nothing)
        dbd.register_model(con, "planted", adapter)
    dbd.add_dataset(con, "many", texts)
    from deepbase_duck.engine.inspect import LocalEngine
    kw = dict(max_error=0.3, batch_size=4, seed=1, reuse=False, engine=LocalEngine(pipeline=pipeline))
    alone = dbd.inspect(con, "planted", ["mix"], ["digit"], "many", **kw)
    _, source, params_alone = last_query(con)
    assert source == "model" and params_alone["records_used"] < 120
    dbd.extract(con, "planted", ["mix"], "many", record_ids=list(range(0, 120, 2)))
    rows.clear()
    mixed = dbd.inspect(con, "planted", ["mix"], ["digit"], "many", **kw)
    _, source, params = last_query(con)
    used = params["records_used"]
    assert source == "stored+model" and used == params_alone["records_used"]
    read, computed = params["reused"]["activation_records_read"], params["reused"]["activation_records_computed"]
    assert read > 0 and computed > 0 and read + computed == used
    # the model ran on the records not stored only (a prefetching pipeline runs a batch or two ahead)
    assert sum(rows) == computed if not pipeline else computed <= sum(rows) < computed + 3 * 4
    want = {(r["unit"], r["hypothesis"]): r for r in alone.to_pylist()}
    for r in mixed.to_pylist():
        w = want[(r["unit"], r["hypothesis"])]
        for col in ("score", "ci_low", "ci_high"):
            assert (r[col] is None) == (w[col] is None)
            if w[col] is not None:
                assert r[col] == pytest.approx(w[col], abs=1e-6)
