"""Query engine core, hunt 16b: settings the rest of a query would ignore (seed, dtype,
baseline_seed) refused by the library and the SQL macro; the cache served stored scores exactly
when a fresh scan gives the same ones: a scan over partly stored float16 activations, the
scoring revisions of probe and progressive queries, constant labels learnt from the store, mi
bins set by the rows met first (batch_size, window_split), measure parameters with their
defaults and as whole arrays, and lists given in another order."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

import deepbase_duck as dbd
engine_inspect = importlib.import_module("deepbase_duck.engine.inspect")   # the module, not the function
from conftest import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def last(con):
    source, params = con.sql("SELECT source, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return source, json.loads(params)


def by_key(t):
    return {(r["layer"], r["unit"], r["hypothesis"], r["measure"]): r["score"] for r in t.to_pylist()}


@pytest.mark.parametrize("kw, word", [(dict(seed=3), "seed=3"), (dict(dtype="float16"), "dtype='float16'"),
                                      (dict(baseline_seed=2), "baseline_seed=2")])
def test_a_setting_the_query_would_ignore_is_refused_by_python_and_sql(planted, kw, word):
    """seed orders a progressive scan's records, dtype is the type keep_activations stores and
    baseline_seed seeds baseline's untrained copy: alone they changed nothing, silently.
    Refused (nothing written); their defaults, which the SQL macro always passes, and each with
    its companion still run."""
    before = snapshot(planted)
    pattern = word.replace("'", ".")
    with pytest.raises(dbd.DeepBaseError, match=pattern):
        dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", **kw)
    (name, value), = kw.items()
    sql_value = value if isinstance(value, int) else f"'{value}'"
    with pytest.raises(Exception, match=f"DeepBaseError: {pattern}"):
        planted.sql(f"SELECT * FROM inspect('planted', ['mix'], ['digit'], 'snippets', "
                    f"{name} := {sql_value})").fetchall()
    assert snapshot(planted) == before
    # the defaults alone, as the macro passes them
    n = planted.sql("SELECT count(*) FROM inspect('planted', ['mix'], ['digit'], 'snippets')").fetchall()[0][0]
    assert n == 4
    dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", seed=0, dtype="float32")
    companion = {"seed": dict(max_error=0.5), "dtype": dict(keep_activations=True),
                 "baseline_seed": dict(baseline=True)}[name]
    dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", **kw, **companion)
    if name == "dtype":
        assert planted.sql("SELECT dtype FROM behaviors").fetchall() == [("float16",)]


def test_more_float16_records_stored_since_a_query_are_not_served_its_scores(planted):
    """A full scan read float16 parts for 6 of 24 records and ran the model for the rest; once
    every record is stored in float16, the same query reads 24 float16 records: other scores,
    yet the cache key (the layers read as float16) was the same and the old scores were served."""
    ids = [r for (r,) in planted.sql("SELECT record_id FROM records ORDER BY 1").fetchall()]
    dbd.extract(planted, "planted", ["mix"], "snippets", dtype="float16", record_ids=ids[:6])
    part = by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets"))
    assert last(planted)[0] == "stored+model"
    dbd.extract(planted, "planted", ["mix"], "snippets", dtype="float16")
    now = by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets"))
    assert last(planted)[0] == "stored"
    fresh = by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", reuse=False))
    assert now == fresh
    assert any(v is not None and abs(v - part[k]) > 1e-7 for k, v in fresh.items())
    # the same (whole) coverage again: served
    again = by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets"))
    assert last(planted)[0] == "cache" and again == fresh


@pytest.mark.parametrize("kw, served", [(dict(measures=["probe"]), False),
                                        (dict(measures=["corr"], max_error=0.5, batch_size=2), False),
                                        (dict(measures=["corr", "mi"]), True)])
def test_scores_of_an_older_scoring_are_not_served_where_it_changed(planted, monkeypatch, kw, served):
    """Probe scores and progressive scans changed after SCORING_VERSION 5 (probe heads fit about
    the labels' mean, stop rules) without a new version: a store scored before served the old
    scores. Their fingerprints now carry a revision; other queries keep theirs (and are served)."""
    monkeypatch.setattr(engine_inspect, "SCORING_REVISIONS", {}, raising=False)   # the code before
    dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", **kw)
    old = last(planted)[1]["fingerprint"]
    planted.execute("UPDATE scores SET score = 0.125 WHERE score IS NOT NULL")     # the older scoring's
    monkeypatch.undo()
    t = dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", **kw)
    source, params = last(planted)
    assert (source == "cache") == served and (params["fingerprint"] == old) == served
    assert all(s == 0.125 for s in t.column("score").to_pylist() if s is not None) == served


def test_a_progressive_query_is_not_served_a_scan_that_did_not_know_a_constant_label(con):
    """A hypothesis the dataset never holds does not keep a progressive scan reading once its
    stored labels show it constant; the first scan, before they were stored, read every record.
    The same query again was served those scores (240 records) where a fresh scan reads 40."""
    from conftest import TEXTS, planted_adapter
    rng = np.random.default_rng(3)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "many", ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(240)])

    @dbd.hypothesis("tilde_hunt16b", kind="binary")
    def tilde(text):
        return [(i, i + 1) for i, c in enumerate(text) if c == "~"]

    def run(**kw):
        t = dbd.inspect(con, "planted", ["mix"], ["digit", "tilde_hunt16b"], "many", batch_size=8, seed=2,
                        max_error=0.9, **kw)
        source, params = last(con)
        return by_key(t), source, params["records_used"]
    first, source, used = run()
    assert (source, used) == ("model", 240)
    second, source, used = run()
    fresh, _, fresh_used = run(reuse=False)
    assert fresh_used < 240 and (source, used) == ("model", fresh_used) and second == fresh
    assert run()[1:] == ("cache", fresh_used)


def test_the_same_query_with_its_lists_in_another_order_is_served_from_the_cache(planted):
    """Layers, hypotheses and measures given in another order change no score, yet missed the
    cache; a store whose queries carry the fingerprint of the order given (earlier versions)
    is still served."""
    a = dict(layers=["mix", "planted"], hypotheses=["in_string", "digit"], measures=["pointbiserial", "corr"])
    b = dict(layers=["planted", "mix"], hypotheses=["digit", "in_string"], measures=["corr", "pointbiserial"])
    first = by_key(dbd.inspect(planted, "planted", dataset="snippets", **a))
    qid = planted.sql("SELECT max(query_id) FROM queries").fetchall()[0][0]
    second = by_key(dbd.inspect(planted, "planted", dataset="snippets", **b))
    source, params = last(planted)
    assert source == "cache" and params["reused"]["scores_of_query"] == qid and second == first
    fresh = by_key(dbd.inspect(planted, "planted", dataset="snippets", reuse=False, **b))
    assert fresh.keys() == first.keys()
    for k, v in first.items():
        assert (v is None and fresh[k] is None) or fresh[k] == pytest.approx(v, abs=1e-12), k
    # a query stored by an earlier version, under the fingerprint of the order it was given in
    from deepbase_duck.engine.inspect import plan_inspect, query_fingerprints
    s = dbd.session_of(planted)
    plans = [plan_inspect(s, "planted", a["layers"], a["hypotheses"], "snippets", a["measures"])]
    canonical, as_given = query_fingerprints(s, plans, False, 0)
    assert canonical != as_given and params["fingerprint"] == canonical
    planted.execute("DELETE FROM scores WHERE query_id <> ?", [qid])
    planted.execute("UPDATE queries SET params = json_merge_patch(params, json_object('fingerprint', ?)) "
                    "WHERE query_id = ?", [as_given, qid])
    dbd.inspect(planted, "planted", dataset="snippets", **a)
    source, params = last(planted)
    assert source == "cache" and params["reused"]["scores_of_query"] == qid


def test_mi_bins_set_by_the_rows_met_first_key_the_cache_by_their_order(planted):
    """mi's states given calibration_records (a full scan) or in a progressive scan set their
    bins from the first calibration_rows rows they meet: batch_size (and within a window the
    model's window_split) changes the scores. A full scan's batch_size was not in the cache key:
    the scores of batch_size=2 were served to batch_size=16."""
    ids = [r for (r,) in planted.sql("SELECT record_id FROM records ORDER BY 1").fetchall()]
    prm = {"calibration_records": ids, "calibration_rows": 100}

    def run(bs, **kw):
        return by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", measures=["mi"],
                                  batch_size=bs, **kw)), last(planted)[0]
    two, _ = run(2, mi=prm)
    sixteen, source = run(16, mi=prm)
    fresh, _ = run(16, mi=prm, reuse=False)
    assert source == "model" and sixteen == fresh and sixteen != two
    # the engine's own calibration (no calibration_records) does not depend on batch_size: served
    run(2, mi={"calibration_rows": 100})
    assert run(16, mi={"calibration_rows": 100})[1] == "cache"


def test_a_progressive_mi_scan_is_keyed_by_the_models_window_split(con):
    """The same weights registered again with another window_split (a window's forward batches)
    give a progressive mi scan other bins: not served the scores of the other split."""
    from conftest import TEXTS, planted_adapter
    dbd.add_dataset(con, "snippets", TEXTS)
    kw = dict(measures=["mi"], batch_size=8, max_error=0.5, seed=1, mi={"calibration_rows": 60})
    got = []
    for split in (1, 2, 2):
        adapter = planted_adapter()
        adapter.window_split = split
        dbd.register_model(con, "planted", adapter)
        got.append((by_key(dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", **kw)), last(con)[0]))
    fresh = by_key(dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", reuse=False, **kw))
    assert [s for _, s in got] == ["model", "model", "cache"]
    assert got[1][0] == fresh == got[2][0] and got[0][0] != fresh


def test_measure_parameters_are_keyed_by_the_values_the_states_run_with(planted, monkeypatch):
    """A default given explicitly is the same query (it missed the cache); a default changed
    (a later version) is another query (it was served the scores of the old default)."""
    from deepbase_duck.inspectors.mutual_information import MutualInformationState as MI

    def run(**kw):
        return by_key(dbd.inspect(planted, "planted", ["mix"], ["digit"], "snippets", measures=["mi", "corr"],
                                  **kw)), last(planted)[0]
    plain, _ = run()
    explicit, source = run(mi={"bins": 10, "calibration_rows": 10_000}, corr={"confidence": 0.95})
    assert source == "cache" and explicit == plain
    defaults = list(MI.__init__.__defaults__)
    assert defaults[1] == 10                                  # (device, bins, ...)
    defaults[1] = 4
    monkeypatch.setattr(MI.__init__, "__defaults__", tuple(defaults))
    four, source = run()
    fresh, _ = run(reuse=False)
    assert source == "model" and four == fresh and four != plain
    assert json.loads(planted.sql("SELECT detail FROM scores WHERE measure = 'mi' AND unit = 0 "
                                  "ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])["bins"] == 4


def test_array_parameters_are_keyed_by_every_value(con):
    """Two calibration_records arrays of over 1000 ids that differ inside print alike
    (numpy elides the middle): the key held that text, and the second query was served the
    first one's scores."""
    import random
    rng = random.Random(0)
    from conftest import planted_adapter
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "d", ["".join(rng.choice("ab 0123456789()'#") for _ in range(rng.randint(5, 40)))
                               for _ in range(1200)])
    ids = np.array([r for (r,) in con.sql("SELECT record_id FROM records ORDER BY 1").fetchall()])
    a, b = ids[ids % 7 != 3], ids[ids % 7 != 4]
    assert str(a) == str(b)

    def run(cal, **kw):
        return by_key(dbd.inspect(con, "planted", ["mix"], ["digit"], "d", measures=["mi"],
                                  mi={"calibration_records": cal, "calibration_rows": 40}, **kw)), last(con)[0]
    first, _ = run(a)
    second, source = run(b)
    fresh, _ = run(b, reuse=False)
    assert source == "model" and second == fresh != first
    assert run(b.copy())[1] == "cache"


@pytest.mark.parametrize("bad, shown", [([1.5], "1.5"), ([True], "True"), ([0, 2.5], "2.5"), (["1"], "'1'")])
def test_record_ids_that_are_not_whole_numbers_are_refused_not_cast(bad, shown):
    """record_ids went through a cast to int64: 1.5 read as record 1 and True as record 1, so a
    query silently read a record nobody asked for. Whole numbers of any numeric type still pass."""
    con = dbd.connect(None, progress=False)
    try:
        dbd.add_dataset(con, "d", ["a", "b", "c"])
        session = dbd.session_of(con)
        with pytest.raises(dbd.DeepBaseError, match=rf"record_ids must be .*got .*{shown}"):
            session.select_records("d", bad)
        assert session.select_records("d", [2.0, 0]).tolist() == [2, 0]
        assert session.select_records("d", np.array([1, 1, 0], np.int32)).tolist() == [1, 0]
    finally:
        dbd.close(con)
