"""The core engine: what a scan keeping activations stores, stored records without symbols (empty
texts), and a binary hypothesis the store shows constant in a progressive scan.

Scores are checked against numpy over an independent forward pass per record (``_reference``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from conftest import TEXTS, per_char_labels, planted_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _store(texts):
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", list(texts))
    return con


def _ids(con) -> list[int]:
    return [r for (r,) in con.sql("SELECT record_id FROM records WHERE dataset = 'snippets' ORDER BY 1").fetchall()]


def _reference(texts, layer, hypothesis="digit"):
    """{record index: (activations, labels)} of ``layer`` from one forward pass per record."""
    from deepbase_duck.hypotheses import get_hypothesis
    adapter = planted_adapter()
    module = adapter.module.planted if layer == "planted" else adapter.module
    out = {}
    for i, text in enumerate(texts):
        with torch.no_grad():
            x = module(adapter.encode([text]).inputs)[0].numpy() if text else np.zeros((0, 5 if layer == "planted" else 4))
        out[i] = (x.astype(np.float64), per_char_labels(get_hypothesis(hypothesis), text))
    return out


def _corr(ref, records):
    x = np.concatenate([ref[i][0] for i in records])
    y = np.concatenate([ref[i][1] for i in records])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.array([np.corrcoef(x[:, u], y)[0, 1] if x[:, u].std() > 0 else np.nan for u in range(x.shape[1])])


def _scores(t) -> np.ndarray:
    return np.array(t.column("score").to_pylist(), dtype=np.float64)


# -- keep_activations stores what the model computed, never a float16 read ------------------------
def test_keep_activations_does_not_store_float16_reads_as_float32(con):
    """A float32 scan keeping its activations, where float16 activations of some records are
    stored, read those records from the float16 parts: they were written into the float32
    behavior too, rounded (2e-4 off the model), and later float32 queries (and extract) took them
    as the model's own float32 activations."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    ids = _ids(con)
    dbd.extract(con, "planted", ["mix"], "snippets", dtype="float16", record_ids=ids[:10])
    dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", keep_activations=True)
    view = con.sql("SELECT view_name FROM behaviors WHERE dtype = 'float32'").fetchall()[0][0]
    rows = con.sql(f"SELECT record_id, act FROM {view} ORDER BY record_id, pos").fetchall()
    ref = _reference(TEXTS, "mix")
    stored = sorted({r for r, _ in rows})
    assert stored == ids[10:]                  # the records the model ran for, only
    got = np.array([a for _, a in rows], np.float64)
    want = np.concatenate([ref[ids.index(r)][0] for r in stored])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)     # float32, as the model gave them
    # a later query reads the float32 parts (they hold more of the records) and runs the model for
    # the rest: float32 scores, none of them from rounded activations
    t = dbd.inspect(con, "planted", ["mix"], ["digit"], "snippets", reuse=False)
    np.testing.assert_allclose(_scores(t), _corr(ref, range(len(TEXTS))), atol=1e-6)


# -- records without symbols (empty texts) in stored parts ---------------------------------------
EMPTY_TEXTS = ["", "x = 12 + (3 * 4)\n", "def f(a, b):\n    return [a, (b, 7)]  # 99 bottles\n",
               "s = 'hello 42'\nprint(s)\n"]


def test_a_full_scan_of_stored_records_with_an_empty_one_reads_only_the_selected_rows():
    """A part holding records {empty, a, b}, read for {empty, a}: the part's record count (2 with
    rows) equalled the selection's (2), so b's rows were read too and the scan failed ('labels of
    shape (67, 1), expected (91, 1)')."""
    con = _store(EMPTY_TEXTS)
    try:
        ids = _ids(con)
        dbd.extract(con, "planted", ["planted"], "snippets", batch_size=100)      # one part
        t = dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", record_ids=ids[:3])
        assert con.sql("SELECT source FROM queries").fetchall()[-1][0] == "stored"
        ref = _reference(EMPTY_TEXTS, "planted")
        np.testing.assert_allclose(_scores(t), _corr(ref, [0, 1, 2]), atol=1e-9)
        assert set(t.column("n").to_pylist()) == {sum(len(x) for x in EMPTY_TEXTS[:3])}
    finally:
        dbd.close(con)


@pytest.mark.parametrize("stored,extract_batch", [("all", 16), ("some", 16), ("all", 1)])
def test_a_progressive_scan_reads_a_stored_window_of_empty_records(stored, extract_batch):
    """A progressive scan over stored activations whose window (batch_size=1) holds only a record
    without symbols failed: 'need at least one array to concatenate'; where such a record had a
    part of its own (extracted one record per batch), reading the part's row group without rows
    failed: 'index 0 is out of bounds'. Read to the end (a tiny max_error), it scores as numpy
    over every record."""
    texts = list(TEXTS[:8]) + ["", ""] + list(TEXTS[8:14])
    con = _store(texts)
    try:
        ids = _ids(con)
        dbd.extract(con, "planted", ["planted"], "snippets", record_ids=ids if stored == "all" else ids[:12],
                    batch_size=extract_batch)
        t = dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", max_error=1e-4, seed=1, batch_size=1)
        q = con.sql("SELECT source, n_records, params FROM queries").fetchall()[-1]
        assert q[0] == ("stored" if stored == "all" else "stored+model")
        assert q[1] == len(texts) and not json.loads(q[2])["stopped_early"]
        ref = _reference(texts, "planted")
        np.testing.assert_allclose(_scores(t), _corr(ref, range(len(texts))), atol=1e-9)
    finally:
        dbd.close(con)


# -- a binary hypothesis true on every character does not hold a progressive scan ------------------
@dbd.hypothesis("every_char_e17", kind="binary", description="every character (a class 0 the data lacks)")
def every_char_e17(text):
    return [(0, len(text))] if text else []


@dbd.hypothesis("all_but_last_e17", kind="binary", description="every character but a record's last")
def all_but_last_e17(text):
    return [(0, len(text) - 1)] if len(text) > 1 else []


@pytest.mark.parametrize("kw", [dict(max_error=0.3, seed=1, batch_size=2), dict(top_k=2, seed=1, batch_size=2)])
def test_a_binary_hypothesis_true_everywhere_in_the_store_does_not_hold_a_progressive_scan(con, kw):
    """The README: a hypothesis whose stored labels show it constant over the selected records
    does not hold a progressive scan. A binary one labelling every character 1 (its class 0 absent)
    is as constant as one labelling none, but only the latter was told: the scan read every record
    (24 instead of 10), its scores NULL all the way. One 0 symbol per record is not constant."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.annotate(con, ["every_char_e17", "all_but_last_e17"], "snippets")

    def run(hyps):
        t = dbd.inspect(con, "planted", ["planted"], hyps, "snippets", reuse=False, **kw)
        n, params = con.sql("SELECT n_records, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
        return t, n, json.loads(params)
    _, alone, _ = run(["digit"])
    assert alone < len(TEXTS)
    t, n, params = run(["digit", "every_char_e17"])
    assert params["constant_columns"] == ["every_char_e17"]
    assert n == alone and params["stopped_early"]
    rows = [r for r in t.to_pylist() if r["hypothesis"] == "every_char_e17"]
    assert rows and all(r["score"] is None for r in rows)          # constant: no score, however many read
    _, _, params = run(["digit", "all_but_last_e17"])
    assert params["constant_columns"] is None                      # a 0 symbol in every record


# -- keep_activations in a scan that stops before it runs the model --------------------------------
def test_a_progressive_scan_that_runs_the_model_on_nothing_leaves_no_empty_behavior(con):
    """Its first windows all stored (float32), a progressive scan keeping float16 activations
    stopped before it ran the model once: the float16 behavior it had opened stayed in the
    catalog with no part and no view, listed (and exported) as stored activations, as a failed
    extraction's is not."""
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    order = [r for (r,) in con.sql("SELECT record_id FROM seeded_order('snippets', seed := 1)").fetchall()]
    dbd.extract(con, "planted", ["planted"], "snippets", record_ids=order[:20])
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", max_error=0.9, seed=1, batch_size=1,
                keep_activations=True, dtype="float16")
    n, source = con.sql("SELECT n_records, source FROM queries").fetchall()[-1]
    assert n < 20 and source == "stored+model"         # stopped inside the stored records
    got = con.sql("SELECT b.dtype, count(p.part) FROM behaviors b LEFT JOIN behavior_parts p "
                  "USING (behavior_id) GROUP BY ALL ORDER BY 1").fetchall()
    assert got == [("float32", 2)]
    # read to the end, the same scan stores the float16 activations of the records the model ran for
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", max_error=1e-4, seed=1, batch_size=1,
                keep_activations=True, dtype="float16")
    assert con.sql("SELECT b.dtype, count(*) FROM behaviors b JOIN behavior_records r USING (behavior_id) "
                   "GROUP BY ALL ORDER BY 1").fetchall() == [("float16", 4), ("float32", 20)]


def test_mi_bins_from_stored_parts_of_empty_records_alone():
    """A full mi scan sets its bins from calibration records read from storage: a part holding
    only records without symbols (one record per extracted batch) failed to read ('index 0 is out
    of bounds'). Its scores equal those of the scan that runs the model."""
    texts = ["", "x = 12 + (3 * 4)\n", "", "s = 'hello 42'\nprint(s)\n", "for i in range(10):\n    total += i\n"]
    stored, fresh = _store(texts), _store(texts)
    try:
        dbd.extract(stored, "planted", ["planted"], "snippets", batch_size=1)
        got = dbd.inspect(stored, "planted", ["planted"], ["digit"], "snippets", measures=["mi"])
        assert stored.sql("SELECT source FROM queries").fetchall()[-1][0] == "stored"
        want = dbd.inspect(fresh, "planted", ["planted"], ["digit"], "snippets", measures=["mi"])
        np.testing.assert_allclose(_scores(got), _scores(want), rtol=0, atol=1e-12)
    finally:
        dbd.close(stored)
        dbd.close(fresh)
