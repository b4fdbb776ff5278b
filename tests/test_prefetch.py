"""engine/prefetch.py: forward passes one batch ahead in a background thread (the local engine's
pipeline, on by default where the model runs on CUDA; forced on here, on the CPU)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.engine.inspect import LocalEngine
from deepbase_duck.engine.prefetch import prefetched
from deepbase_duck.errors import ActivationError

from conftest import TEXTS, planted_adapter


# -- the helper ---------------------------------------------------------------------------------

def counting(n, log, fail_at=None):
    """A generator of 0..n-1 that records what it produced, where it ran and that it was closed."""
    def gen():
        try:
            for i in range(n):
                if i == fail_at:
                    raise KeyError(f"item {i} failed")
                log["made"] = i + 1
                log["threads"].add(threading.current_thread().name)
                yield i
        finally:
            log["closed_in"] = threading.current_thread().name
    return gen


def new_log():
    return {"made": 0, "threads": set(), "closed_in": None}


def test_items_arrive_in_order_from_another_thread():
    log = new_log()
    assert list(prefetched(counting(50, log))) == list(range(50))
    assert log["threads"] == {"deepbase-prefetch"}
    assert log["closed_in"] == "deepbase-prefetch"
    assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [1, 3])
def test_the_producer_runs_at_most_depth_items_ahead(depth):
    log = new_log()
    ahead = []
    gen = prefetched(counting(40, log), depth=depth)
    for i in gen:
        threading.Event().wait(0.002)          # let the producer run as far as it may
        ahead.append(log["made"] - (i + 1))
    # depth items wait in the queue, one more is being made (and waits to be put)
    assert max(ahead) <= depth + 1
    assert max(ahead) >= 1                     # it does run ahead


def test_stopping_early_closes_the_producer_in_its_thread():
    log = new_log()
    gen = prefetched(counting(10_000, log))
    got = [next(gen) for _ in range(5)]
    gen.close()
    assert got == [0, 1, 2, 3, 4]
    assert log["closed_in"] == "deepbase-prefetch"
    assert log["made"] <= 5 + 2                # the stop is seen within the bounded lookahead
    assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())


def test_a_producer_error_is_raised_in_the_consumer_after_the_items_before_it():
    log = new_log()
    got = []
    with pytest.raises(KeyError, match="item 7 failed"):
        for i in prefetched(counting(20, log, fail_at=7)):
            got.append(i)
    assert got == list(range(7))
    assert log["closed_in"] == "deepbase-prefetch"


def test_a_consumer_error_stops_the_producer():
    log = new_log()
    with pytest.raises(ZeroDivisionError):
        for i in prefetched(counting(10_000, log)):
            if i == 3:
                1 / 0
    assert log["closed_in"] == "deepbase-prefetch" and log["made"] <= 6
    assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="prefetch depth must be at least 1, got 0"):
        next(prefetched(lambda: iter([1]), depth=0))


# -- the local engine with its pipeline forced on ----------------------------------------------

HYPS = ["digit", "in_string", "in_comment"]


def two_stores():
    cons = []
    for _ in range(2):
        c = dbd.connect(None, progress=False)
        dbd.register_model(c, "planted", planted_adapter())
        dbd.add_dataset(c, "snippets", TEXTS)
        cons.append(c)
    return cons


def scores(t):
    rows = sorted((r["layer"], r["measure"], r["unit"] if r["unit"] is not None else -1, r["hypothesis"],
                   np.nan if r["score"] is None else r["score"]) for r in t.to_pylist())
    return [r[:4] for r in rows], np.array([r[4] for r in rows], float)


LABELS = "SELECT hypothesis, record_id, start_char, end_char, value FROM labels ORDER BY ALL"


def assert_same_stored_rows(serial, piped):
    """Both stores hold the same symbols, tokenised records, behavior records and activation rows
    (every symbol of TEXTS in each behavior), and no prefetch thread is left running."""
    for q in ("SELECT * FROM symbols ORDER BY ALL", "SELECT * FROM tokenized_records ORDER BY ALL",
              "SELECT layer, record_id FROM behavior_records JOIN behaviors USING (behavior_id) ORDER BY ALL"):
        assert serial.sql(q).fetchall() == piped.sql(q).fetchall(), q
    views = "SELECT layer, view_name FROM behaviors ORDER BY layer"
    assert serial.sql(views).fetchall() == piped.sql(views).fetchall()
    for _, view in serial.sql(views).fetchall():
        x = serial.sql(f"SELECT * FROM {view} ORDER BY ALL").fetchall()
        assert len(x) == sum(map(len, TEXTS)) and x == piped.sql(f"SELECT * FROM {view} ORDER BY ALL").fetchall()
    assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())


def test_a_pipelined_scan_gives_the_serial_scores_and_stores_the_same_rows():
    serial, piped = two_stores()
    try:
        kw = dict(measures=["corr", "mi", "iou"], batch_size=3, keep_activations=True)
        a = dbd.inspect(serial, "planted", ["planted", "mix"], HYPS, "snippets", engine=LocalEngine(pipeline=False),
                        **kw)
        b = dbd.inspect(piped, "planted", ["planted", "mix"], HYPS, "snippets", engine=LocalEngine(pipeline=True),
                        **kw)
        ka, va = scores(a)
        kb, vb = scores(b)
        assert ka == kb
        np.testing.assert_allclose(vb, va, rtol=0, atol=1e-12, equal_nan=True)
        assert serial.sql(LABELS).fetchall() == piped.sql(LABELS).fetchall()
        assert_same_stored_rows(serial, piped)
    finally:
        dbd.close(serial)
        dbd.close(piped)


def test_a_pipelined_progressive_scan_reads_the_same_records():
    serial, piped = two_stores()
    try:
        kw = dict(measures=["corr"], batch_size=2, max_error=0.5, seed=3)
        a = dbd.inspect(serial, "planted", ["planted"], HYPS, "snippets", engine=LocalEngine(pipeline=False), **kw)
        b = dbd.inspect(piped, "planted", ["planted"], HYPS, "snippets", engine=LocalEngine(pipeline=True), **kw)
        q = ("SELECT n_records, params->>'records_used', params->>'stopped_early', params->>'bound_reached' "
             "FROM queries")
        qa, qb = serial.sql(q).fetchall(), piped.sql(q).fetchall()
        assert qa == qb and qa[0][2] == "true" and qa[0][0] < len(TEXTS)
        np.testing.assert_allclose(scores(b)[1], scores(a)[1], atol=1e-12, equal_nan=True)
        # only the records the scan read were tokenised, as without the pipeline
        assert (serial.sql("SELECT record_id FROM tokenized_records ORDER BY 1").fetchall()
                == piped.sql("SELECT record_id FROM tokenized_records ORDER BY 1").fetchall())
    finally:
        dbd.close(serial)
        dbd.close(piped)


def test_a_model_error_in_the_thread_is_raised_and_the_store_stays_consistent(con):
    dbd.register_model(con, "nanny", planted_adapter(nan_on_tilde=True))
    dbd.add_dataset(con, "tilde", ["abc 1\n", "x = 2\n", "ok ~ bad\n", "fine 3\n"] * 3)
    with pytest.raises(ActivationError, match=r"produced NaN or infinite activations on record 2 of dataset 'tilde'"):
        dbd.inspect(con, "nanny", ["planted"], ["digit"], "tilde", batch_size=1, engine=LocalEngine(pipeline=True),
                    keep_activations=True)
    assert con.sql("SELECT count(*) FROM scores").fetchall() == [(0,)]
    # every stored activation row has its symbols; the bad record's activations are not stored
    assert con.sql("SELECT count(*) FROM behavior_records b ANTI JOIN tokenized_records t "
                   "USING (record_id)").fetchall() == [(0,)]
    assert (2,) not in con.sql("SELECT record_id FROM behavior_records").fetchall()
    assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())
    # the store is usable afterwards: a scan of the good records runs
    t = dbd.inspect(con, "nanny", ["planted"], ["digit"], "tilde", record_ids=[0, 1, 3],
                    engine=LocalEngine(pipeline=True))
    assert t.num_rows > 0


def test_the_pipeline_is_on_by_default_only_on_cuda_without_tf32():
    eng = LocalEngine()
    cpu = planted_adapter()
    assert eng.pipelined(cpu) is False                            # a CPU model
    assert LocalEngine(pipeline=True).pipelined(cpu) is True
    # the decision reads the adapter's device and TF32 choice (no CUDA needed to check it)
    fake = type("FakeCuda", (), {"device": torch.device("cuda", 0), "tf32": False})()
    assert eng.pipelined(fake) is True
    fake.tf32 = True                                              # process-wide TF32 switches: serial
    assert eng.pipelined(fake) is False
    fake.tf32 = None                                              # torch's switches left alone
    assert eng.pipelined(fake) is True
    assert LocalEngine(pipeline=False).pipelined(fake) is False


# -- several models in one scan (run_stacked), pipelined ----------------------------------------

def test_a_pipelined_stacked_scan_gives_the_serial_scores_and_stores_the_same_rows():
    from test_stacking import variant
    serial, piped = two_stores()
    try:
        for c in (serial, piped):
            for k in (1, 2):
                dbd.register_model(c, f"v{k}", variant(k))
        names = ["planted", "v1", "v2"]
        kw = dict(measures=["corr", "iou"], batch_size=3)
        a = dbd.inspect(serial, names, ["planted", "mix"], HYPS, "snippets", engine=LocalEngine(pipeline=False), **kw)
        b = dbd.inspect(piped, names, ["planted", "mix"], HYPS, "snippets", engine=LocalEngine(pipeline=True), **kw)
        q = "SELECT params->>'scan', params->>'forward', n_records, n_symbols FROM queries"
        assert serial.sql(q).fetchall() == piped.sql(q).fetchall() == [("together", "vmap", len(TEXTS),
                                                                         sum(map(len, TEXTS)))]
        ka, va = scores(a)
        kb, vb = scores(b)
        assert ka == kb and len(ka) == 3 * (5 + 4) * len(HYPS) * 2
        np.testing.assert_allclose(vb, va, rtol=0, atol=1e-12, equal_nan=True)
        for q in ("SELECT * FROM symbols ORDER BY ALL", "SELECT * FROM tokenized_records ORDER BY ALL",
                  "SELECT hypothesis, record_id, start_char, end_char, value FROM labels ORDER BY ALL"):
            assert serial.sql(q).fetchall() == piped.sql(q).fetchall(), q
        assert piped.sql("SELECT count(*) FROM tokenized_records").fetchall() == [(len(TEXTS),)]
        assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())
    finally:
        dbd.close(serial)
        dbd.close(piped)


def test_a_model_error_in_a_pipelined_stacked_scan_is_raised_and_no_scores_are_written(con):
    dbd.register_model(con, "good", planted_adapter())
    dbd.register_model(con, "nanny", planted_adapter(nan_on_tilde=True))
    dbd.add_dataset(con, "tilde", ["abc 1\n", "x = 2\n", "ok ~ bad\n", "fine 3\n"] * 3)
    with pytest.raises(ActivationError, match=r"model 'nanny'.*record 2 of dataset 'tilde'"):
        dbd.inspect(con, ["good", "nanny"], ["planted"], ["digit"], "tilde", batch_size=1,
                    engine=LocalEngine(pipeline=True))
    assert con.sql("SELECT count(*) FROM scores").fetchall() == [(0,)]
    assert con.sql("SELECT count(*) FROM symbols s ANTI JOIN tokenized_records t USING (record_id)").fetchall() \
        == [(0,)]
    assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())


# -- extract, pipelined -------------------------------------------------------------------------

def test_a_pipelined_extraction_stores_the_serial_rows():
    serial, piped = two_stores()
    try:
        a = dbd.extract(serial, "planted", ["planted", "mix"], "snippets", batch_size=3, pipeline=False)
        b = dbd.extract(piped, "planted", ["planted", "mix"], "snippets", batch_size=3, pipeline=True)
        assert [(r["layer"], r["extracted"], r["reused"]) for r in a] == \
            [(r["layer"], r["extracted"], r["reused"]) for r in b] == [("planted", len(TEXTS), 0), ("mix", len(TEXTS), 0)]
        assert_same_stored_rows(serial, piped)
    finally:
        dbd.close(serial)
        dbd.close(piped)


def test_a_model_error_in_a_pipelined_extraction_keeps_the_batches_before_it_and_resumes(con):
    dbd.register_model(con, "nanny", planted_adapter(nan_on_tilde=True))
    texts = ["abc 1\n", "x = 2\n", "ok ~ bad\n", "fine 3\n"]
    dbd.add_dataset(con, "tilde", texts)
    with pytest.raises(ActivationError, match=r"record 2 of dataset 'tilde'"):
        dbd.extract(con, "nanny", ["planted"], "tilde", batch_size=1, pipeline=True)
    assert not any(t.name == "deepbase-prefetch" for t in threading.enumerate())
    done = {r for (r,) in con.sql("SELECT record_id FROM behavior_records").fetchall()}
    assert 2 not in done                                          # the bad record's rows are not stored
    assert con.sql("SELECT count(*) FROM behavior_records b ANTI JOIN tokenized_records t "
                   "USING (record_id)").fetchall() == [(0,)]      # every stored row has its symbols
    # the good records resume: what was stored is reused, the rest extracted
    r = dbd.extract(con, "nanny", ["planted"], "tilde", record_ids=[0, 1, 3], pipeline=True)[0]
    assert r["reused"] == len(done) and r["extracted"] == 3 - len(done)
