"""Checks of the user-facing surfaces: top_units refuses a k that is not a whole number >= 1 (it
gave no rows for k := 0, as if nothing was scored), in Python and in the DuckDB 1.5 CLI; and
compare_layers takes several models' locks in one global order, so two threads comparing the
same live models in opposite orders (two stores) do not deadlock."""
from __future__ import annotations

import subprocess
import threading

import duckdb
import numpy as np
import pytest
import torch
from conftest import TEXTS, planted_adapter

import deepbase_duck as dbd
from deepbase_duck.extraction.hooks import ModelLock, Retain, hold_model_locks
from test_surface_fixes import DUCKDB_CLI, store_for_the_cli

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_K = [("0", "0"), ("-1", "-1"), ("NULL", "NULL"), ("2.5", "2.5"), ("'x'", "x")]


def _error(con, sql: str) -> str:
    with pytest.raises(duckdb.Error) as info:
        con.sql(sql).fetchall()
    return str(info.value)


def _scores(con):
    """Scores of one query: units 0-3 of layer l, hypothesis h, with |score| 0.9, 0.6, 0.55, 0.05."""
    for u, s in enumerate([0.9, -0.6, 0.55, 0.05]):
        con.execute("INSERT INTO scores (query_id, model, layer, unit, hypothesis, measure, score, ci_low, ci_high) "
                    "VALUES (1, 'm', 'l', ?, 'h', 'corr', ?, ?, ?)", [u, s, s - 0.05, s + 0.05])


@pytest.mark.parametrize("k,shown", BAD_K)
@pytest.mark.parametrize("filled", [False, True])
def test_top_units_refuses_a_bad_k_by_name(con, k, shown, filled):
    """An empty store and one with scores give the same error, naming k and its value."""
    if filled:
        _scores(con)
    msg = _error(con, f"SELECT * FROM top_units(k := {k})")
    assert f"top_units: k must be a whole number >= 1 (the units per hypothesis), got {shown}" in msg
    if filled:                                    # positional k and the other arguments too
        assert "got 0" in _error(con, "SELECT * FROM top_units(0, qid := 1, measure_name := NULL, by_layer := true)")


def test_top_units_keeps_good_values_of_k(con):
    """k of any whole-number form ranks as before; k beyond the units gives them all."""
    _scores(con)
    want = [(0, 1), (1, 2)]
    for k in ["2", "2.0", "'2'", "CAST(2 AS HUGEINT)"]:
        assert con.sql(f"SELECT unit, rank FROM top_units(k := {k})").fetchall() == want
    assert [u for (u,) in con.sql("SELECT unit FROM top_units(k := 1e18)").fetchall()] == [0, 1, 2, 3]
    assert con.sql("SELECT count(*) FROM top_units()").fetchall() == [(4,)]
    # separated still compares with the outsiders of the k asked for
    assert con.sql("SELECT unit, separated FROM top_units(k := 2.0)").fetchall() == [(0, True), (1, False)]


def test_top_units_errors_in_the_duckdb_cli(tmp_path):
    """The DuckDB 1.5 CLI reads the macro from the store: the same errors, and good k works."""
    db = store_for_the_cli(tmp_path / "t.duckdb", _scores)
    for k, shown in [("0", "0"), ("-3", "-3"), ("NULL", "NULL")]:
        out = subprocess.run([str(DUCKDB_CLI), "-readonly", db, "-c", f"SELECT * FROM top_units(k := {k})"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        assert f"top_units: k must be a whole number >= 1 (the units per hypothesis), got {shown}" in \
            out.stderr + out.stdout
    out = subprocess.run([str(DUCKDB_CLI), "-readonly", "-csv", "-noheader", db, "-c",
                          "SELECT unit, rank, separated FROM top_units(k := 2)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0,1,true", "1,2,false"]


# -- compare_layers: model locks in one order ------------------------------------------------

class Rendezvous:
    """A forward pre-hook that makes each thread's first forward pass wait (up to ``wait`` s) until
    the other thread's first forward pass has begun: each thread then holds the lock of the model
    it ran first, the interleaving in which locks taken in the groups' order deadlock. Where the
    other thread cannot arrive (it waits for a lock), the wait times out and the pass goes on."""

    def __init__(self, wait: float):
        self.barrier = threading.Barrier(2, timeout=wait)
        self.local = threading.local()

    def __call__(self, module, inputs):
        if getattr(self.local, "met", False):
            return
        self.local.met = True
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            pass


def _store(a, b):
    con = dbd.connect(None, progress=False)
    dbd.register_model(con, "A", a)
    dbd.register_model(con, "B", b)
    dbd.add_dataset(con, "snippets", TEXTS)
    return con


def test_compare_layers_in_opposite_orders_on_shared_models_does_not_deadlock():
    """Two stores share models A and B (the same live objects); one thread compares [A, B], the
    other [B, A]. Each finishes (a deadlock fails at the join's timeout) with CKA equal to a
    numpy reference over the layers' activations, and every model lock is free afterwards."""
    a, b = planted_adapter(), planted_adapter()
    with torch.no_grad():
        b.module.mix[0].weight.mul_(-0.5)                 # B's mix layer differs from A's
    cons = [_store(a, b), _store(a, b)]
    meet = Rendezvous(wait=3.0)
    handles = [m.module.register_forward_pre_hook(meet) for m in (a, b)]
    results, errors = {}, []

    def work(i, groups):
        try:
            results[i] = dbd.compare_layers(cons[i], groups, "snippets").to_pylist()
        except Exception as exc:                          # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(0, ["A:mix", "B:mix"]), daemon=True),
               threading.Thread(target=work, args=(1, ["B:mix", "A:mix"]), daemon=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "compare_layers deadlocked on the model locks"
        assert not errors, errors
    finally:
        for h in handles:
            h.remove()
    x = {n: torch.cat([m.module(m.encode([t]).inputs)[0] for t in TEXTS]).detach().double().numpy()
         for n, m in (("A", a), ("B", b))}
    want = _linear_cka(x["A"], x["B"])
    assert results[0][0]["score"] == pytest.approx(want, rel=1e-6)
    assert results[1][0]["score"] == pytest.approx(want, rel=1e-6)
    for m in (a, b):
        lock = ModelLock.of(m.module)
        assert lock.owner is None and lock.depth == 0 and lock.lock.acquire(blocking=False)
        lock.lock.release()
    for c in cons:
        dbd.close(c)


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of two activation matrices over the same rows."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_hold_model_locks_takes_locks_in_one_order_whatever_the_order_given():
    """The locks are taken by rank, repeats once, re-entered by the holder's own Retains, and all
    released after the block (also after an error inside)."""
    m1, m2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    l1, l2 = ModelLock.of(m1), ModelLock.of(m2)
    order = []
    for lock in (l1, l2):
        real = lock.acquire

        def traced(real=real, lock=lock):
            order.append(lock.rank)
            real()
        lock.acquire = traced
    with hold_model_locks([m2, m1, m2]):
        assert l1.depth == 1 and l2.depth == 1
        with Retain(m2, []):
            assert l2.depth == 2
    assert order[:2] == sorted([l1.rank, l2.rank])
    with pytest.raises(RuntimeError):
        with hold_model_locks([m1, m2]):
            raise RuntimeError("inside")
    assert l1.owner is None and l2.owner is None and l1.depth == 0 and l2.depth == 0
