"""The Ray engine where something fails: errors raised where (and as) the local engine raises
them, workers lost at any point replaced, the pool of kept workers kept at its size, and stored
activations read where they are (tests/test_ray.py: the engine's results on a multi-node cluster).

A local Ray of 2 CPUs (two workers of one CPU); select with ``-m ray``."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXTS

import deepbase_duck as dbd
from deepbase_duck.errors import HypothesisError

ray = pytest.importorskip("ray")

import deepbase_duck.engine.ray_engine as RE  # noqa: E402
from deepbase_duck.engine.ray_engine import RayEngine  # noqa: E402

pytestmark = pytest.mark.ray
TESTS = str(Path(__file__).resolve().parent)
HYPS = ["digit", "in_string", "bracket_depth"]
KW = {"measures": ["corr"], "batch_size": 8, "max_error": 0.2, "seed": 5}


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}},
             log_to_driver=False, logging_level="ERROR", include_dashboard=False)
    yield
    RE.release_workers()
    ray.shutdown()


def _texts(n=120, seed=3):
    rng = np.random.default_rng(seed)
    return ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(n)]


def _store(texts, models=(("planted", "ray_models:planted", None),)):
    c = dbd.connect(None, progress=False)
    for name, loader, params in models:
        if params:
            dbd.register_model(c, name, loader, params)
        else:
            dbd.register_model(c, name, loader)
    dbd.add_dataset(c, "many", texts)
    return c


def _params(c):
    return json.loads(c.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


def _scores(t):
    return {(r["model"], r["layer"], r["unit"], r["hypothesis"], r["measure"]): (r["n"], r["score"])
            for r in t.to_pylist()}


def _assert_same(a, b):
    a, b = _scores(a), _scores(b)
    assert a.keys() == b.keys() and a
    for k, (n, s) in a.items():
        assert b[k][0] == n, k
        assert (s is None and b[k][1] is None) or abs(s - b[k][1]) <= 1e-9, (k, s, b[k][1])


def _labels_consistent(c):
    """Every labeled_records mark has exactly its n_spans label rows, and no label row is unmarked."""
    bad = c.execute("""SELECT count(*) FROM (SELECT l.hypothesis, l.version, l.record_id, l.n_spans,
                       count(b.record_id) AS n FROM labeled_records l
                       LEFT JOIN labels b ON b.hypothesis = l.hypothesis AND b.version = l.version
                       AND b.dataset = l.dataset AND b.record_id = l.record_id GROUP BY ALL) WHERE n_spans <> n
                    """).fetchall()[0][0]
    orphans = c.execute("""SELECT count(*) FROM labels b ANTI JOIN labeled_records l ON b.hypothesis = l.hypothesis
                           AND b.version = l.version AND b.dataset = l.dataset AND b.record_id = l.record_id
                        """).fetchall()[0][0]
    tok = c.execute("""SELECT count(*) FROM (SELECT t.dataset, t.tokenization, t.record_id, t.n_symbols,
                       count(s.pos) AS n FROM tokenized_records t
                       LEFT JOIN symbols s USING (dataset, tokenization, record_id) GROUP BY ALL)
                       WHERE n_symbols <> n""").fetchall()[0][0]
    assert (bad, orphans, tok) == (0, 0, 0)


def _local_stop(texts, hyps=HYPS):
    """Records the local progressive scan uses, and the dataset's seeded order."""
    c = _store(texts)
    dbd.inspect(c, "planted", ["planted", "mix"], hyps, "many", **KW)
    used = _params(c)["records_used"]
    order = [r for (r,) in c.execute("SELECT record_id FROM seeded_order('many', seed := 5)").fetchall()]
    dbd.close(c)
    assert used < len(texts)
    return used, order


# -- 1. a hypothesis raising on a record past the early stop ------------------------------------
def test_a_hypothesis_raising_past_the_early_stop_fails_neither_engine(local_ray):
    from deepbase_duck.hypotheses.core import Hypothesis, register

    def bomb(t):
        if "@" in t:
            raise ValueError("bomb on @")
        return [float(c.isdigit()) for c in t]
    register(Hypothesis("bomb_past_stop", bomb, "binary"))
    hyps = ["bomb_past_stop", "in_string", "bracket_depth"]
    texts = _texts()
    used, order = _local_stop(texts, hyps)
    for k in range(used, len(texts), 5):        # records of the windows after the stop raise
        texts[order[k]] = "@" + texts[order[k]]
    out = {}
    for engine in ("local", "ray"):
        c = _store(texts)
        out[engine] = dbd.inspect(c, "planted", ["planted", "mix"], hyps, "many", engine=engine, **KW)
        p = _params(c)
        assert p["stopped_early"] and p["records_used"] == used, engine
        _labels_consistent(c)          # the labels of blocks labelled ahead but never merged
        dbd.close(c)
    _assert_same(out["local"], out["ray"])
    # a scan that reaches such a record raises the hypothesis' error on both engines
    texts[order[0]] = "@" + texts[order[0]]
    for engine in ("local", "ray"):
        c = _store(texts)
        with pytest.raises(HypothesisError, match="bomb_past_stop.*bomb on @"):
            dbd.inspect(c, "planted", ["planted", "mix"], hyps, "many", engine=engine, **KW)
        _labels_consistent(c)
        dbd.close(c)


# -- 2. a forward pass failing on a record past the early stop ----------------------------------
def test_a_forward_pass_failing_past_the_early_stop_fails_neither_engine(local_ray):
    """Every record after the stop makes the model raise at once, while the blocks before it
    sleep: a failed block beyond the stop comes back before the block that stops the scan."""
    texts = _texts()
    used, order = _local_stop(texts)
    for k in range(used, len(texts)):
        texts[order[k]] = "~" + texts[order[k]]
    models = (("raising", "ray_models:raising_planted", {"delay": 0.3}),)
    out = {}
    for engine in ("local", "ray"):
        c = _store(texts, models)
        out[engine] = dbd.inspect(c, "raising", ["planted", "mix"], HYPS, "many", engine=engine,
                                  **({"ray_options": {"num_workers": 2}} if engine == "ray" else {}), **KW)
        p = _params(c)
        assert p["stopped_early"] and p["records_used"] == used, engine
        dbd.close(c)
    _assert_same(out["local"], out["ray"])


# -- 3. a model's own exception type ------------------------------------------------------------
def test_a_model_error_keeps_its_type_on_ray(local_ray):
    texts = list(TEXTS)
    texts[10] = "~" + texts[10]
    for engine in ("local", "ray"):
        c = _store(texts, (("raising", "ray_models:raising_planted", None),))
        with pytest.raises(RuntimeError, match="^boom on tilde") as info:
            dbd.inspect(c, "raising", ["planted", "mix"], ["digit"], "many", batch_size=4, engine=engine)
        assert str(info.value) == "boom on tilde"
        if engine == "ray":            # where it came from: a note, with the worker's traceback
            notes = "\n".join(getattr(info.value, "__notes__", []))
            assert "Ray worker" in notes and "boom on tilde" in notes
        assert c.execute("SELECT count(*) FROM scores").fetchall()[0][0] == 0
        dbd.close(c)


# -- 4. the only worker dies before it tokenises the next block ---------------------------------
def test_the_only_worker_dying_before_tokenising_is_replaced(local_ray, monkeypatch):
    texts = _texts(64)
    original = RE._RemoteEncoder.encode
    calls = []

    def encode(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:                  # the 3rd block's records: its worker is gone
            victim = self.engine._live[0]
            ray.kill(victim, no_restart=True)
            deadline = time.time() + 30
            while time.time() < deadline:    # until Ray knows it is dead
                try:
                    ray.get(victim.ready.remote(), timeout=5)
                except Exception:
                    break
                time.sleep(0.1)
        return original(self, batch)
    monkeypatch.setattr(RE._RemoteEncoder, "encode", encode)
    RE.release_workers()
    c = _store(texts)
    remote = dbd.inspect(c, "planted", ["planted", "mix"], ["digit"], "many", batch_size=4, reuse=False,
                         engine=RayEngine(block_batches=1, num_workers=1))
    assert len(calls) >= 3 and _params(c)["records_used"] == 64
    assert RE._POOL is not None and len(RE._POOL[1]) == 1      # the replacement is kept
    monkeypatch.setattr(RE._RemoteEncoder, "encode", original)
    local = dbd.inspect(c, "planted", ["planted", "mix"], ["digit"], "many", batch_size=4, reuse=False)
    _assert_same(local, remote)
    _labels_consistent(c)
    dbd.close(c)


# -- 5. the kept pool after a query that lost a worker ------------------------------------------
def test_the_pool_kept_after_a_lost_worker_keeps_its_size(local_ray):
    RE.release_workers()
    c = _store(_texts(48), (("slow", "ray_models:slow_planted", {"delay": 0.15}),))
    engine = RayEngine(block_batches=1, num_workers=2)
    out = {}

    def go():
        try:
            out["t"] = dbd.inspect(c, "slow", ["planted", "mix"], ["digit"], "many", batch_size=4, engine=engine)
        except Exception as exc:  # pragma: no cover - reported below
            out["e"] = exc
    th = threading.Thread(target=go)
    th.start()
    deadline = time.time() + 120                  # late in the query: it ends before a replacement is up
    while engine.stats.get("merged", 0) < 8 and th.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    assert th.is_alive(), "the query ended before a worker could be killed"
    ray.kill(engine._live[0], no_restart=True)
    th.join(240)
    assert not th.is_alive() and "e" not in out, out.get("e")
    assert _params(c)["ray_redispatched"] >= 1
    assert RE._POOL is not None and len(RE._POOL[1]) == 2
    # the next query takes the pool (a replacement still starting joins when it is up)
    again = dbd.inspect(c, "slow", ["planted", "mix"], ["digit"], "many", batch_size=4, reuse=False,
                        engine=RayEngine(block_batches=1, num_workers=2))
    assert _params(c)["ray_workers_reused"] is True
    _assert_same(out["t"], again)
    assert RE._POOL is not None and len(RE._POOL[1]) == 2
    dbd.close(c)


# -- 6. keep_activations where every activation is stored -----------------------------------------
def test_keep_activations_of_stored_activations_reads_them_on_ray_too(local_ray):
    c = _store(TEXTS[:12])
    kw = {"measures": ["corr"], "batch_size": 4, "keep_activations": True, "reuse": False}
    first = dbd.inspect(c, "planted", ["planted", "mix"], ["digit"], "many", engine="ray", **kw)
    assert _params(c)["engine"] == "ray"
    parts = c.execute("SELECT count(*) FROM behavior_parts").fetchall()[0][0]
    again = dbd.inspect(c, "planted", ["planted", "mix"], ["digit"], "many", engine="ray", **kw)
    assert _params(c)["engine"] == "local (stored activations)"
    assert c.execute("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0] == "stored"
    assert c.execute("SELECT count(*) FROM behavior_parts").fetchall()[0][0] == parts
    _assert_same(first, again)
    dbd.close(c)


def test_params_say_which_model_ran_where(local_ray, tmp_path):
    """Two models, one with every activation stored (read locally), one run on Ray: the query's
    params name the engine asked for, each model's, and keep the Ray run's figures."""
    import torch
    from conftest import planted_adapter
    module = planted_adapter().module
    with torch.no_grad():
        for p in module.mix.parameters():
            p.mul_(0.5)                                    # other weights: another checksum
    path = tmp_path / "half.pt"
    torch.save(module.state_dict(), path)
    c = _store(TEXTS[:12], models=(("planted", "ray_models:planted", None),
                                   ("half", "ray_models:from_file", {"path": str(path)})))
    dbd.extract(c, "planted", ["planted", "mix"], "many")
    dbd.inspect(c, ["planted", "half"], ["planted", "mix"], ["digit"], "many", measures=["corr"], engine="ray")
    p = _params(c)
    assert p["engine"] == "ray"
    assert p["engine_per_model"] == {"planted": "local (stored activations)", "half": "ray"}
    assert p["ray_workers"] >= 1
    dbd.close(c)
