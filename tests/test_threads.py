"""Threads over one store (dbd.cursor): queries and catalog changes run one at a time
(store.one_writer), so concurrent queries give the scores of serial ones with distinct query
ids; and two Retains on one model take turns (hooks.ModelLock), so no pass is seen by another
thread's hooks."""
import threading
import time

import numpy as np
import torch

import deepbase_duck as dbd
from conftest import TEXTS, planted_adapter
from deepbase_duck.extraction.hooks import Retain


def on_cursors(con, job, n: int) -> list[str]:
    """Run ``job(cursor, i)`` for i < n, each in its own thread with its own dbd.cursor; returns
    the errors raised (repr)."""
    errors = []

    def work(i):
        cur = dbd.cursor(con)
        try:
            job(cur, i)
        except Exception as exc:          # noqa: BLE001  (returned)
            errors.append(repr(exc))
        finally:
            dbd.close(cur)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_queries_on_cursors_equal_serial_ones(con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    jobs = [(["digit"], ["corr"], 2), (["digit", "in_string"], ["corr", "pointbiserial"], 3),
            (["in_string"], ["pointbiserial"], 5)]
    serial = [dbd.inspect(con, "planted", ["planted"], h, "snippets", measures=m, batch_size=b, reuse=False)
              for h, m, b in jobs]
    out = {}

    def job(cur, i):
        for k in range(3):
            h, m, b = jobs[(i + k) % 3]
            out[(i, k)] = ((i + k) % 3, dbd.inspect(cur, "planted", ["planted"], h, "snippets", measures=m,
                                                   batch_size=b, reuse=False))
    assert on_cursors(con, job, 3) == []
    for j, t in out.values():
        assert t.column("score").to_pylist() == serial[j].column("score").to_pylist()
    n, distinct = con.sql("SELECT count(*), count(DISTINCT query_id) FROM queries").fetchall()[0]
    assert n == distinct == 3 + 9


def test_retains_on_one_model_take_turns():
    adapter = planted_adapter()
    module = adapter.module
    x = adapter.encode(["x = 1\n"]).inputs
    order = []
    first = Retain(module, ["planted"])
    first.__enter__()

    def other():
        with Retain(module, ["planted"]) as r:
            order.append("second entered")
            with torch.no_grad():
                module(x)
            assert r.outputs["planted"] is not None
    t = threading.Thread(target=other)
    t.start()
    time.sleep(0.3)
    order.append("first still open")
    with torch.no_grad():
        module(x)
    assert np.isfinite(first.outputs["planted"].numpy()).all()
    with Retain(module, ["planted"]):                 # the same thread again: re-entrant
        pass
    first.close()
    t.join(5)
    assert order == ["first still open", "second entered"]


def test_sql_inspect_from_cursors_runs_one_at_a_time(con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    def job(cur, i):
        cur.sql(f"SELECT count(*) FROM inspect('planted', ['planted'], ['digit', 'in_string'], 'snippets', "
                f"batch_size := {2 + i})").fetchall()
    assert on_cursors(con, job, 4) == []
    assert con.sql("SELECT count(DISTINCT query_id) FROM queries").fetchall()[0][0] == 4


def test_a_failed_compare_releases_the_other_models_lock(con):
    """compare_layers closes every model's forward stream when one fails: with the exception
    kept (as a notebook keeps its last traceback), another thread can still run the good model."""
    dbd.register_model(con, "good", planted_adapter())
    bad = planted_adapter()

    dbd.register_model(con, "bad", bad)
    dbd.add_dataset(con, "snippets", TEXTS)

    def boom(*args, **kwargs):
        raise RuntimeError("broken model")
    bad.module.forward = boom                     # broken after registration
    kept = []
    try:
        dbd.compare_layers(con, ["good:planted", "bad:planted"], "snippets")
    except Exception as exc:              # noqa: BLE001
        kept.append(exc)                  # the traceback (and its frames) stays alive
    assert kept and "broken model" in str(kept[0])
    done = []

    def other():
        cur = dbd.cursor(con)
        try:
            dbd.inspect(cur, "good", ["planted"], ["digit"], "snippets", reuse=False)
            done.append(True)
        finally:
            dbd.close(cur)
    t = threading.Thread(target=other)
    t.start()
    t.join(60)
    assert done == [True]
