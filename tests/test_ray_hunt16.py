"""Ray engine, hunt 16: a dataset partly stored (grown since its extraction) is scanned on Ray as
the local engine scans it: the stored records read from their parts (on the workers), the model
run for the rest, with the local engine's scores, records, windows and provenance.

A local Ray of 2 CPUs (as tests/test_ray_failures.py); select with ``-m ray``."""
from __future__ import annotations

import json

import numpy as np
import pytest

import deepbase_duck as dbd

ray = pytest.importorskip("ray")

import deepbase_duck.engine.ray_engine as RE  # noqa: E402
from test_ray_failures import _texts, local_ray  # noqa: E402,F401  (a local Ray of 2 CPUs; records)
from test_ray_hunt15 import _assert_same as same_as_local  # noqa: E402

pytestmark = pytest.mark.ray
LAYERS = ["planted", "mix"]


def _params(c):
    return json.loads(c.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


def _source(c):
    return c.execute("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]


def _partly_stored(texts, stored, dtype="float32"):
    """A store whose first ``stored`` records (by id) have activations stored, the rest not."""
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")
    dbd.add_dataset(c, "many", texts)
    ids = [r for (r,) in c.execute("SELECT record_id FROM records WHERE dataset = 'many' ORDER BY 1").fetchall()]
    dbd.extract(c, "planted", LAYERS, "many", record_ids=ids[:stored], dtype=dtype, batch_size=5)
    return c


def _both(texts, stored, hyps, dtype="float32", after=None, **kw):
    """(scores, params, source) of the local engine and of Ray over the same partly stored store."""
    out = []
    for extra in ({}, {"engine": "ray", "ray_options": {"block_batches": 2}}):
        c = _partly_stored(texts, stored, dtype)
        try:
            t = dbd.inspect(c, "planted", LAYERS, hyps, "many", reuse=False, **kw, **extra)
            out.append((t, _params(c), _source(c)))
            if after is not None:
                after(c)
        finally:
            dbd.close(c)
    return out


def _assert_same(local, remote):
    """hunt 15's comparison (scores to 1e-9, the early-stopping report, reused), and both
    sources 'stored+model'."""
    (a, pa_, sa), (b, pb, sb) = local, remote
    same_as_local((a, pa_), (b, pb))
    assert sa == sb == "stored+model"


def test_a_full_scan_of_a_partly_stored_dataset_reads_the_stored_records_on_ray(local_ray):
    """Ray ran the model on every record where some were not stored (reused read 0): it now
    reads the 40 stored ones and runs the 20 others, as the local engine does, mi's calibration
    (on stored and computed records) and keep_activations included."""
    texts = _texts(60)
    done = {}

    def stored_now(c):
        done[len(done)] = c.execute("SELECT count(DISTINCT record_id) FROM behavior_records").fetchall()[0][0]
    local, remote = _both(texts, 40, ["digit", "in_string"], measures=["corr", "mi"], batch_size=8,
                          keep_activations=True, after=stored_now, mi={"calibration_rows": 600})
    _assert_same(local, remote)
    assert remote[1]["reused"]["activation_records_read"] == 40
    assert remote[1]["reused"]["activation_records_computed"] == 20
    assert done == {0: 60, 1: 60}                # the 20 computed records stored by both engines
    assert "ray_stored_unseen" not in remote[1]


def test_a_progressive_scan_of_a_partly_stored_dataset_reads_the_same_windows_on_ray(local_ray):
    """Early stopping over float16 activations stored for 60 of 120 records: each seeded batch's
    stored records are read, the others run, and Ray stops at the local engine's window."""
    local, remote = _both(_texts(120), 60, ["digit", "in_string", "bracket_depth"], dtype="float16",
                          measures=["corr"], batch_size=8, max_error=0.2, seed=5)
    _assert_same(local, remote)
    used = remote[1]["records_used"]
    assert remote[1]["stopped_early"] and used < 120
    r = remote[1]["reused"]
    assert r["activation_records_read"] > 0 and r["activation_records_computed"] > 0
    assert r["activation_records_read"] + r["activation_records_computed"] == used


def test_workers_that_do_not_see_the_activation_folder_run_the_model(local_ray, monkeypatch):
    """A cluster whose workers cannot read the store's activation folder: the model runs for
    every record (the scores of a scan without stored activations) and params say why."""
    original = RE._RemoteEncoder.ask
    monkeypatch.setattr(RE._RemoteEncoder, "ask",
                        lambda self, method, *a: False if method == "sees" else original(self, method, *a))
    texts = _texts(24)
    c = _partly_stored(texts, 12, dtype="float16")
    kw = dict(measures=["corr"], batch_size=8, reuse=False)
    remote = dbd.inspect(c, "planted", LAYERS, ["digit"], "many", engine="ray", **kw)
    p = _params(c)
    assert p["reused"]["activation_records_read"] == 0 and p["reused"]["activation_records_computed"] == 24
    assert _source(c) == "model" and p["ray_stored_unseen"]
    # its fingerprint is that of a query reading no float16 parts (the scores it holds), not the
    # one naming the float16 layers it would have read: a later query that reads them is not
    # served these float32 scores
    from deepbase_duck.engine.inspect import plan_inspect, query_fingerprint
    plans = [plan_inspect(dbd.session_of(c), "planted", LAYERS, ["digit"], "many", measures=["corr"], batch_size=8)]
    session = dbd.session_of(c)
    assert p["fingerprint"] == query_fingerprint(session, plans, False, 0, partial=False)
    assert p["fingerprint"] != query_fingerprint(session, plans, False, 0, partial=True)
    dbd.close(c)
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")
    dbd.add_dataset(c, "many", texts)
    local = dbd.inspect(c, "planted", LAYERS, ["digit"], "many", **kw)
    dbd.close(c)
    key = lambda r: (r["layer"], r["unit"], r["hypothesis"])  # noqa: E731
    a, b = {key(r): r["score"] for r in local.to_pylist()}, {key(r): r["score"] for r in remote.to_pylist()}
    assert a.keys() == b.keys()
    assert all((a[k] is None and b[k] is None) or abs(a[k] - b[k]) <= 1e-9 for k in a)


# -- releasing the kept workers before starting others --------------------------------------------
def _query(c, **options):
    dbd.inspect(c, "planted", ["mix"], ["digit"], "many", reuse=False, engine="ray", ray_options=options)
    return _params(c)


def test_a_pool_of_smaller_workers_released_does_not_hold_the_next_start(local_ray):
    """The wait for the released pool's CPUs counted them at the NEW workers' num_cpus: a pool
    of two 1-CPU workers, then workers of 2 CPUs, waited 15 s for 4 CPUs that never came."""
    RE.release_workers()
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")
    dbd.add_dataset(c, "many", _texts(8))
    assert _query(c)["ray_workers"] == 2
    p = _query(c, num_cpus=2)
    assert p["ray_workers"] == 1 and p["ray_startup_s"] < 10
    RE.release_workers()
    dbd.close(c)


def test_a_pool_of_another_cluster_does_not_hold_the_next_start(local_ray):
    """Workers kept on a Ray cluster left since (ray restarted in this process, or another
    ray_address) hold nothing on the new one: the start waited 15 s for their CPUs to come back."""
    from test_ray_failures import TESTS
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")
    dbd.add_dataset(c, "many", _texts(8))
    _query(c)
    assert RE._POOL is not None
    ray.shutdown()                   # (the module's fixture shuts the new one down)
    ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}},
             log_to_driver=False, logging_level="ERROR", include_dashboard=False)
    p = _query(c)
    assert p["ray_workers"] == 2 and p["ray_startup_s"] < 10 and p["ray_workers_reused"] is False
    dbd.close(c)


# -- a replacement worker on a node without the model's files ---------------------------------------
LOADER = '''
import time
import torch
from conftest import planted_adapter


def slow_from_file(path, delay=0.2):
    """The planted model with its weights read from ``path``, sleeping ``delay`` s per forward pass."""
    adapter = planted_adapter()
    adapter.module.load_state_dict(torch.load(path, weights_only=True))
    forward = adapter.forward

    def slow(encoded):
        time.sleep(delay)
        return forward(encoded)
    adapter.forward = slow
    return adapter
'''


def test_a_replacement_that_cannot_load_the_model_says_why(local_ray, tmp_path, monkeypatch):
    """The only worker dies mid-query and its replacement cannot load the model (its weights
    file is gone): the query failed with 'every Ray worker died and no replacement could start',
    without the loader's error that says what to fix."""
    import threading
    import time

    import torch
    from conftest import planted_adapter
    from test_ray_failures import TESTS
    (tmp_path / "hunt16_loader.py").write_text(LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "planted.pt"
    torch.save(planted_adapter().module.state_dict(), weights)
    RE.release_workers()
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "filed", "hunt16_loader:slow_from_file", {"path": str(weights)})
    dbd.add_dataset(c, "many", _texts(40))
    engine = RE.RayEngine(block_batches=1, num_workers=1, keep_workers=False,
                          runtime_env={"env_vars": {"PYTHONPATH": f"{TESTS}:{tmp_path}"}})
    out = {}

    def go():
        try:
            dbd.inspect(c, "filed", ["mix"], ["digit"], "many", batch_size=4, engine=engine)
        except Exception as exc:
            out["e"] = exc
    th = threading.Thread(target=go)
    th.start()
    deadline = time.time() + 120
    while engine.stats.get("merged", 0) < 2 and th.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    assert th.is_alive(), "the query ended before its worker could be killed"
    weights.unlink()
    ray.kill(engine._live[0], no_restart=True)
    th.join(120)
    assert not th.is_alive()
    assert isinstance(out.get("e"), dbd.DeepBaseError), out
    assert "replacement failed to start" in str(out["e"]) and "planted.pt" in str(out["e"]), out["e"]
    assert c.execute("SELECT count(*) FROM scores").fetchall()[0][0] == 0
    dbd.close(c)


# -- a query interrupted while its workers start ----------------------------------------------------
def _free_cpus(want, within=20.0):
    import time
    deadline = time.time() + within
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= want:
            return True
        time.sleep(0.1)
    return False


def test_a_query_interrupted_while_its_workers_start_leaves_none_behind(local_ray, tmp_path, monkeypatch):
    """Ctrl-C while the workers load the model (RayEngine._start waiting on them): the actors
    started were neither killed nor kept, and held the cluster's CPUs while the interrupt's
    traceback lived (an interactive shell keeps the last one: sys.last_traceback), so the next
    query found no free CPU."""
    import os
    import signal
    import threading

    from test_ray_failures import TESTS
    (tmp_path / "hunt16_slow_start.py").write_text(
        "import time\nfrom conftest import planted_adapter\n\n\n"
        "def slow_start(delay=5.0):\n    time.sleep(delay)\n    return planted_adapter()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    RE.release_workers()
    assert _free_cpus(2)
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "slow_start", "hunt16_slow_start:slow_start", {"delay": 5.0})
    dbd.add_dataset(c, "many", _texts(8))
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:       # kept, as an interactive shell keeps it
            dbd.inspect(c, "slow_start", ["mix"], ["digit"], "many", reuse=False, engine="ray",
                        ray_options={"runtime_env": {"env_vars": {"PYTHONPATH": f"{TESTS}:{tmp_path}"}}})
    finally:
        timer.cancel()
    assert RE._POOL is None
    # (Ray ends an actor killed in its constructor once that returns)
    assert _free_cpus(2, within=30), ray.available_resources()
    assert info.type is KeyboardInterrupt
    assert c.execute("SELECT count(*) FROM queries").fetchall()[0][0] == 0
    dbd.close(c)
