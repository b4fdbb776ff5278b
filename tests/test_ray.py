"""The Ray engine on a real multi-node Ray cluster on this machine (ray.cluster_utils: a head with
no CPUs and two worker nodes of one CPU each): scores equal the local engine's, a worker node
lost mid-query changes nothing, early stopping stops early, bad input fails cleanly.

Select with ``-m ray``; skipped only when ray is not installed (pip install '.[ray]')."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXTS, planted_adapter

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from deepbase_duck.engine.ray_engine import RayEngine  # noqa: E402

pytestmark = pytest.mark.ray
TESTS = str(Path(__file__).resolve().parent)
HYPS = ["digit", "bracket_depth", "in_string"]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    # the workers import the loader module of the planted model (tests/ray_models.py)
    ray.init(address=c.address, runtime_env={"env_vars": {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}},
             log_to_driver=False, logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def db(cluster):
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")
    dbd.add_dataset(c, "snippets", TEXTS)
    rng = np.random.default_rng(3)
    dbd.add_dataset(c, "many", ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(240)])
    yield c
    dbd.close(c)


def _by_key(t):
    return {(r["model"], r["layer"], r["unit"], r["hypothesis"], r["measure"]): r for r in t.to_pylist()}


def _last_params(con):
    return json.loads(con.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


def _assert_equal_scores(local, remote, tol=1e-9, probe_tol=1e-3):
    a, b = _by_key(local), _by_key(remote)
    assert a.keys() == b.keys() and len(a) > 0
    for k, r in a.items():
        s = b[k]
        assert r["n"] == s["n"], k
        if r["score"] is None:
            assert s["score"] is None, k
        else:
            assert abs(r["score"] - s["score"]) <= (probe_tol if k[4] == "probe" else tol), (k, r["score"], s["score"])


def _counts(con):
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in ("queries", "scores", "symbols", "tokenized_records", "labels", "models")}


def test_ray_scores_equal_local_on_planted_units(db):
    kw = {"measures": ["corr", "probe"], "batch_size": 4}
    local = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "snippets", **kw)
    remote = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "snippets", engine="ray", reuse=False,
                         ray_options={"block_batches": 1}, **kw)
    _assert_equal_scores(local, remote)
    p = _last_params(db)
    assert p["engine"] == "ray" and p["ray_workers"] == 2 and p["ray_blocks_merged"] == p["ray_blocks"] == 6
    # the planted units are found (unit 0 copies `digit`, unit 1 is its negation plus noise)
    r = _by_key(remote)
    assert r[("planted", "planted", 0, "digit", "corr")]["score"] == pytest.approx(1.0, abs=1e-9)
    assert r[("planted", "planted", 1, "digit", "corr")]["score"] < -0.99
    # an independent reference: numpy's Pearson r of unit 4 (bracket depth) with its label
    labels = np.concatenate([_depth(t) for t in TEXTS])
    acts = np.concatenate([_depth(t, planted=True) for t in TEXTS])
    assert r[("planted", "planted", 4, "bracket_depth", "corr")]["score"] == pytest.approx(
        np.corrcoef(acts, labels)[0, 1], abs=1e-9)


def test_ray_mi_blocks_take_the_drivers_bins_and_equal_local(db):
    """mi calibrates its bins on the first rows it meets: the driver runs blocks one at a time
    until its states are calibrated, then sends their edges with every block, so the merge is
    exact (blocks calibrated on their own rows merged only approximately)."""
    kw = {"measures": ["mi"], "batch_size": 4, "mi": {"calibration_rows": 100}}
    local = dbd.inspect(db, "planted", ["planted", "mix"], ["digit", "in_string"], "snippets", **kw)
    remote = dbd.inspect(db, "planted", ["planted", "mix"], ["digit", "in_string"], "snippets", engine="ray",
                         reuse=False,
                         ray_options={"block_batches": 1}, **kw)
    _assert_equal_scores(local, remote, tol=1e-12)
    assert all("approximate" not in r["detail"] for r in remote.to_pylist() if r["detail"])


def _depth(text, planted=False):
    """Bracket depth per character, as the planted unit computes it (closing bracket counted
    after the character) and as the `bracket_depth` hypothesis labels it."""
    from conftest import per_char_labels

    import deepbase_duck.hypotheses.library  # noqa: F401
    from deepbase_duck.hypotheses import get_hypothesis
    if not planted:
        return per_char_labels(get_hypothesis("bracket_depth"), text)
    out = planted_adapter().module.planted(
        __import__("torch").as_tensor([__import__("deepbase_duck.models.charlstm", fromlist=["x"]).encode_chars(text)]))
    return out[0, :, 4].numpy().astype(np.float64)


def test_ray_scores_equal_local_on_the_bundled_charlstm(db):
    dbd.register_model(db, "charlstm", "deepbase_duck.models.zoo:charlstm")
    kw = {"measures": ["corr"], "batch_size": 4, "limit": 12}
    local = dbd.inspect(db, "charlstm", ["lstm1"], ["in_string", "digit"], "snippets", **kw)
    remote = dbd.inspect(db, "charlstm", ["lstm1"], ["in_string", "digit"], "snippets", engine="ray", reuse=False, **kw)
    _assert_equal_scores(local, remote)
    assert _last_params(db)["records_used"] == 12
    # a second query of the same model reuses the workers (the model stays loaded)
    again = dbd.inspect(db, "charlstm", ["lstm0"], ["digit"], "snippets", engine="ray", reuse=False, **kw)
    assert _last_params(db)["ray_workers_reused"] is True
    _assert_equal_scores(dbd.inspect(db, "charlstm", ["lstm0"], ["digit"], "snippets", **kw), again)
    # the untrained baseline: on Ray the twin is rebuilt on the workers from a loader spec
    local = dbd.inspect(db, "charlstm", ["lstm0"], ["digit"], "snippets", baseline=True, **kw)
    remote = dbd.inspect(db, "charlstm", ["lstm0"], ["digit"], "snippets", baseline=True, engine="ray", reuse=False, **kw)
    assert {r["model"] for r in remote.to_pylist()} == {"charlstm", "charlstm~untrained"}
    _assert_equal_scores(local, remote)


def test_a_worker_node_lost_mid_query_changes_nothing(db, cluster):
    dbd.register_model(db, "planted_slow", "ray_models:slow_planted", {"delay": 0.1})
    kw = {"measures": ["corr"], "batch_size": 8, "limit": 120}
    local = dbd.inspect(db, "planted_slow", ["planted", "mix"], HYPS, "many", **kw)
    extra = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    engine = RayEngine(block_batches=1)
    out = {}

    def run():
        try:
            out["t"] = dbd.inspect(db, "planted_slow", ["planted", "mix"], HYPS, "many", engine=engine, reuse=False,
                                   keep_activations=True, **kw)
        except Exception as exc:  # pragma: no cover - reported below
            out["error"] = exc
    th = threading.Thread(target=run)
    th.start()
    deadline = time.time() + 120
    while engine.stats.get("merged", 0) < 3 and th.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert th.is_alive(), "the query ended before the node could be removed"
    cluster.remove_node(extra, allow_graceful=False)          # killed, not drained
    th.join(180)
    assert not th.is_alive() and "error" not in out, out.get("error")
    p = _last_params(db)
    assert p["ray_workers"] == 3 and p["ray_redispatched"] >= 1
    _assert_equal_scores(local, out["t"])
    # the activations kept on the way: every symbol of the 120 records once, none twice
    ids = [int(r) for r in np.sort(db.execute("SELECT record_id FROM records WHERE dataset = 'many'").fetchall(),
                                   axis=0)[:120, 0]]
    want = sum(n for (n,) in db.execute("SELECT length(text) FROM records WHERE dataset = 'many' AND "
                                        "list_contains(?, record_id)", [ids]).fetchall())
    for layer in ("planted", "mix"):
        view = db.execute("SELECT view_name FROM behaviors WHERE model = 'planted_slow' AND layer = ? AND "
                          "dataset = 'many'", [layer]).fetchall()[0][0]
        n, distinct, recs = db.execute(f"SELECT count(*), count(DISTINCT (record_id, pos)), "
                                       f"count(DISTINCT record_id) FROM {view}").fetchall()[0]
        assert n == distinct == want and recs == 120


def test_early_stopping_on_ray_stops_early_and_keeps_the_top_units(db):
    kw = {"measures": ["corr"], "batch_size": 8}
    full = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "many", **kw)
    local_early = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "many", max_error=0.2, seed=5, **kw)
    local_p = _last_params(db)
    early = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "many", max_error=0.2, seed=5, engine="ray", reuse=False, **kw)
    p = _last_params(db)
    assert p["stopped_early"] and p["bound_reached"] <= 0.2
    assert p["ray_blocks_merged"] < p["ray_blocks"] and p["records_used"] < 240
    # the same seeded prefix as the local engine, the same scores and bound
    assert p["records_used"] == local_p["records_used"]
    assert p["bound_reached"] == pytest.approx(local_p["bound_reached"], abs=1e-9)
    _assert_equal_scores(local_early, early)

    def top(t):
        rows = [r for r in t.to_pylist() if r["score"] is not None]
        rows.sort(key=lambda r: (-abs(r["score"]), r["layer"], r["unit"], r["hypothesis"]))
        return [(r["layer"], r["unit"], r["hypothesis"]) for r in rows[:10]]
    a, b = top(full), top(early)
    assert len(set(a) & set(b)) >= 9, (a, b)


def test_early_stopping_on_ray_tokenises_only_the_records_it_dispatched(db):
    """No record is tokenised before the scan: each block's new records are encoded by a worker
    (its 'encode' thread) as the block is prepared, so a query that stops early leaves most of
    the dataset untokenised; the symbols it stored equal the local engine's, record by record."""
    rng = np.random.default_rng(8)
    texts = ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(240)]
    dbd.add_dataset(db, "fresh_ray", texts)
    dbd.add_dataset(db, "fresh_local", texts)
    kw = {"measures": ["corr"], "batch_size": 8, "max_error": 0.2, "seed": 5}
    remote = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "fresh_ray", engine=RayEngine(block_batches=1),
                         **kw)
    p = _last_params(db)
    assert p["engine"] == "ray" and p["stopped_early"]
    tokenised = {r for (r,) in db.execute("SELECT record_id FROM tokenized_records WHERE dataset = 'fresh_ray'"
                                          ).fetchall()}
    used = p["records_used"]
    # the records merged, plus those of the blocks dispatched but not merged when the scan stopped:
    # at most `ahead` blocks (of 8 records) past the last merged one, however the blocks finished
    assert p["ray_blocks_dispatched"] <= p["ray_blocks_merged"] + p["ray_ahead"]
    assert used <= len(tokenised) <= 8 * p["ray_blocks_dispatched"] and len(tokenised) < 240
    local = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "fresh_ray", reuse=False, **kw)
    assert _last_params(db)["records_used"] == used
    _assert_equal_scores(local, remote)
    dbd.inspect(db, "planted", ["planted"], ["digit"], "fresh_local", measures=["corr"])    # tokenises all, locally
    sym = lambda ds: db.execute("SELECT record_id, pos, start_char, end_char, token FROM symbols "  # noqa: E731
                                "WHERE dataset = ? AND list_contains(?, record_id) ORDER BY ALL",
                                [ds, sorted(tokenised)]).fetchall()
    assert len(sym("fresh_ray")) == sum(len(texts[r]) for r in tokenised) and sym("fresh_ray") == sym("fresh_local")


def test_dispatch_window_of_one_block_keeps_results_and_bounds_the_run_ahead(db):
    """ahead=1: the driver dispatches a block only once every earlier block has merged; the scan
    stops where the local engine does, having dispatched at most the block after the last merged."""
    kw = {"measures": ["corr"], "batch_size": 8, "max_error": 0.2, "seed": 3}
    local = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "many", **kw)
    lp = _last_params(db)
    remote = dbd.inspect(db, "planted", ["planted", "mix"], HYPS, "many", reuse=False,
                         engine=RayEngine(block_batches=1, ahead=1), **kw)
    p = _last_params(db)
    assert p["ray_ahead"] == 1 and p["stopped_early"] and p["records_used"] == lp["records_used"]
    assert p["ray_blocks_merged"] <= p["ray_blocks_dispatched"] <= p["ray_blocks_merged"] + 1
    _assert_equal_scores(local, remote)
    with pytest.raises(DeepBaseError, match="ahead must be >= 1"):
        RayEngine(ahead=0)


def test_probe_plateau_on_ray_stops_where_the_local_engine_does(db):
    kw = {"measures": ["corr", "probe"], "batch_size": 8, "max_error": 0.3, "seed": 1}
    local = dbd.inspect(db, "planted", ["planted", "mix"], ["digit", "in_string"], "many", **kw)
    lp = _last_params(db)
    remote = dbd.inspect(db, "planted", ["planted", "mix"], ["digit", "in_string"], "many", engine="ray",
                         reuse=False, **kw)
    p = _last_params(db)
    assert p["engine"] == "ray" and p["stop_rule"] == lp["stop_rule"] == "max_error+plateau"
    assert p["records_used"] == lp["records_used"] < 240 and p["ray_blocks_merged"] < p["ray_blocks"]
    a, b = p["plateau_checks"], lp["plateau_checks"]
    assert [(c["windows"], c["plateau"], c["train_rows"]) for c in a] == \
        [(c["windows"], c["plateau"], c["train_rows"]) for c in b]
    for x, y in zip(a, b):
        assert x["loss"] == {l: pytest.approx(v, abs=1e-4) for l, v in y["loss"].items()}
    _assert_equal_scores(local, remote)


def test_min_support_on_ray_stops_where_the_local_engine_does(db):
    from deepbase_duck.hypotheses.core import Hypothesis, register
    register(Hypothesis("at_sign", lambda t: [float(c == "@") for c in t], "binary"))
    rng = np.random.default_rng(3)
    records = ["".join(TEXTS[int(i)] for i in rng.integers(0, len(TEXTS), 3)) for _ in range(240)]
    order = [i for (i,) in db.sql("SELECT i FROM range(240) t(i) ORDER BY sample_key('rare', i, 5), i").fetchall()]
    for i in (order[0], order[-1]):             # the rare class: first and last in the seeded order
        records[i] = "@" + records[i]
    dbd.add_dataset(db, "rare", records)
    kw = {"measures": ["corr"], "batch_size": 8, "max_error": 0.2, "seed": 5, "min_support": 50}
    local = dbd.inspect(db, "planted", ["planted"], ["digit", "at_sign"], "rare", **kw)
    lp = _last_params(db)
    remote = dbd.inspect(db, "planted", ["planted"], ["digit", "at_sign"], "rare", engine="ray", reuse=False, **kw)
    p = _last_params(db)
    assert p["engine"] == "ray" and lp["rare"] == p["rare"] == {"at_sign": 1}
    assert p["records_used"] == lp["records_used"] < 240
    assert p["bound_reached"] == pytest.approx(lp["bound_reached"], abs=1e-9)
    _assert_equal_scores(local, remote)


def test_keep_activations_on_ray_stores_each_row_once(db):
    from deepbase_duck.engine.ray_engine import RayEngine
    dbd.add_dataset(db, "kept", TEXTS[:12], replace=True)
    kw = {"measures": ["corr"], "batch_size": 4}
    remote = dbd.inspect(db, "planted", ["planted", "mix"], ["digit"], "kept", keep_activations=True,
                         reuse=False, engine=RayEngine(block_batches=2), **kw)
    assert _last_params(db)["engine"] == "ray"
    n_symbols = sum(len(t) for t in TEXTS[:12])
    for layer, width in (("planted", 5), ("mix", 4)):
        view, = db.execute("SELECT view_name FROM behaviors WHERE model = 'planted' AND layer = ? AND dataset = 'kept'",
                           [layer]).fetchall()[0]
        n, distinct, w = db.execute(f"SELECT count(*), count(DISTINCT (record_id, pos)), max(len(act)) FROM {view}"
                                    ).fetchall()[0]
        assert n == distinct == n_symbols and w == width
        # the catalog lists exactly the files in the folder: no orphan or temporary file is read
        files = {f for (f,) in db.execute("SELECT file FROM behavior_parts p JOIN behaviors b USING (behavior_id) "
                                          "WHERE b.view_name = ?", [view]).fetchall()}
        folder = db.execute("SELECT directory FROM behaviors WHERE view_name = ?", [view]).fetchall()[0][0]
        from deepbase_duck.catalog import session_of
        assert {p.name for p in (session_of(db).act_root / folder).iterdir()} == files
    # a local query now reads the stored parts (the model does not run) and scores the same
    local = dbd.inspect(db, "planted", ["planted", "mix"], ["digit"], "kept", reuse=False, **kw)
    assert db.execute("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0] == "stored"
    _assert_equal_scores(local, remote)


def test_sql_macro_runs_on_ray(db):
    want = dbd.inspect(db, "planted", ["planted"], ["digit"], "snippets", batch_size=4)
    got = db.sql("SELECT * FROM inspect('planted', ['planted'], ['digit'], 'snippets', batch_size := 4, "
                 "engine := 'ray', reuse := false)").arrow().read_all()
    _assert_equal_scores(want, got)
    assert _last_params(db)["engine"] == "ray"


def test_cli_runs_on_ray(cluster, tmp_path):
    from deepbase_duck.engine.ray_engine import release_workers
    release_workers()                     # this process keeps its workers: free the CPUs for the CLI's
    deadline = time.time() + 15
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.05)
    path = str(tmp_path / "s.duckdb")
    c = dbd.connect(path, progress=False)
    dbd.register_model(c, "charlstm", "deepbase_duck.models.zoo:charlstm")
    dbd.add_dataset(c, "snippets", TEXTS[:8])
    want = dbd.inspect(c, "charlstm", ["lstm0"], ["digit"], "snippets")
    dbd.close(c)
    r = subprocess.run([sys.executable, "-m", "deepbase_duck", "inspect", path, "charlstm", "snippets",
                        "--layers", "lstm0", "--hypotheses", "digit", "--engine", "ray", "--no-reuse", "--ray-address",
                        cluster.address], capture_output=True, text=True, timeout=150,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "digit" in r.stdout
    c = dbd.connect(path, progress=False)
    try:
        got = c.sql("SELECT * FROM scores WHERE query_id = (SELECT max(query_id) FROM scores)").arrow().read_all()
        assert json.loads(c.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])[
            "engine"] == "ray"
    finally:
        dbd.close(c)
    _assert_equal_scores(want, got)


# -- bad input: clear errors, nothing written ------------------------------------------------------
@pytest.mark.parametrize("address, match", [("127.0.0.1:1", "unreachable"), ("ray://127.0.0.1:1", "unreachable"),
                                            ("no-port-here", "not of the form")])
def test_unreachable_address_fails_fast_and_writes_nothing(db, address, match):
    dbd.add_dataset(db, "fresh", TEXTS[:5], replace=True)
    before = _counts(db)
    t = time.time()
    with pytest.raises(DeepBaseError, match=match):
        dbd.inspect(db, "planted", ["planted"], ["digit"], "fresh", engine="ray", reuse=False, ray_address=address)
    assert time.time() - t < 30
    assert _counts(db) == before
    assert ray.is_initialized()            # the working connection was not dropped


def test_unreadable_weights_on_the_workers_fail_cleanly(db, tmp_path):
    import torch
    weights = tmp_path / "planted.pt"
    torch.save(planted_adapter().module.state_dict(), weights)
    dbd.register_model(db, "from_file", "ray_models:from_file", {"path": str(weights)})
    dbd.add_dataset(db, "fresh", TEXTS[:5], replace=True)
    weights.write_bytes(b"not a checkpoint")
    before = _counts(db)
    with pytest.raises(DeepBaseError, match=r"model 'from_file': the loader 'ray_models:from_file' failed on "
                                            r"the Ray worker"):
        dbd.inspect(db, "from_file", ["planted"], ["digit"], "fresh", engine="ray", reuse=False)
    assert _counts(db) == before


def test_weights_that_changed_fail_the_checksum(db, tmp_path):
    import torch
    weights = tmp_path / "planted.pt"
    sd = planted_adapter().module.state_dict()
    torch.save(sd, weights)
    dbd.register_model(db, "from_file2", "ray_models:from_file", {"path": str(weights)})
    sd["embed.weight"] = sd["embed.weight"] + 1
    torch.save(sd, weights)
    with pytest.raises(DeepBaseError, match="from_file2.*checksum"):
        dbd.inspect(db, "from_file2", ["planted"], ["digit"], "snippets", engine="ray", reuse=False)


def test_a_failing_forward_pass_on_a_worker_fails_the_query_and_writes_no_scores(db):
    from deepbase_duck.errors import ActivationError
    dbd.register_model(db, "nan_planted", "ray_models:planted", {"nan_on_tilde": True})
    dbd.add_dataset(db, "tilde", TEXTS[:6] + ["x = ~5\n"] + TEXTS[:6], replace=True)
    before = db.execute("SELECT count(*) FROM queries").fetchall()[0][0], db.execute(
        "SELECT count(*) FROM scores").fetchall()[0][0]
    with pytest.raises(ActivationError, match="NaN or infinite activations on record 6 of dataset 'tilde'"):
        dbd.inspect(db, "nan_planted", ["planted"], ["digit"], "tilde", batch_size=2, engine="ray")
    assert (db.execute("SELECT count(*) FROM queries").fetchall()[0][0],
            db.execute("SELECT count(*) FROM scores").fetchall()[0][0]) == before


def test_live_model_is_refused_on_ray(db):
    dbd.register_model(db, "live", planted_adapter())
    with pytest.raises(DeepBaseError, match="model 'live' was registered from a live Python object.*loader spec"):
        dbd.inspect(db, "live", ["planted"], ["digit"], "snippets", engine="ray", reuse=False)
    with pytest.raises(DeepBaseError, match="unknown engine 'spark'"):
        dbd.inspect(db, "live", ["planted"], ["digit"], "snippets", engine="spark")


def test_the_local_engine_does_not_import_ray():
    code = ("import sys, deepbase_duck as d; c = d.connect(None, progress=False); "
            "d.register_model(c, 'm', 'deepbase_duck.models.zoo:charlstm'); d.add_dataset(c, 's', ['x = 1']); "
            "d.inspect(c, 'm', ['lstm0'], ['digit'], 's'); assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_workers_without_the_package_fail_with_a_clear_error(cluster, tmp_path):
    """Workers whose Python cannot import deepbase_duck. The driver runs in its own process from a
    folder outside the project (Ray puts the driver's folder on the workers' path), and the
    workers' PYTHONPATH starts with a deepbase_duck that raises ModuleNotFoundError, as a node
    without the package does."""
    from deepbase_duck.engine.ray_engine import release_workers
    release_workers()
    deadline = time.time() + 15
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.05)
    shadow = tmp_path / "no_package" / "deepbase_duck"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'deepbase_duck'\", "
                                        "name='deepbase_duck')\n")
    store_path = tmp_path / "s.duckdb"
    script = f"""
import json, sys
import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError
c = dbd.connect({str(store_path)!r}, progress=False)
dbd.register_model(c, "charlstm", "deepbase_duck.models.zoo:charlstm")
dbd.add_dataset(c, "snippets", {TEXTS[:4]!r})
env = {{"env_vars": {{"PYTHONPATH": {str(shadow.parent)!r}, "OMP_NUM_THREADS": "1"}}}}
try:
    dbd.inspect(c, "charlstm", ["lstm0"], ["digit"], "snippets", engine="ray", ray_address={cluster.address!r},
                ray_options={{"runtime_env": env, "keep_workers": False, "startup_timeout": 90}})
    print("NO ERROR")
except DeepBaseError as exc:
    print("ERROR:", exc)
print("COUNTS", json.dumps([c.sql(f"SELECT count(*) FROM {{t}}").fetchall()[0][0] for t in ("queries", "scores")]))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
                       env={k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1"}.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERROR: Ray workers cannot import deepbase_duck: install deepbase-duck" in r.stdout, r.stdout[-2000:]
    assert "COUNTS [0, 0]" in r.stdout


def test_ray_refuses_bad_measure_parameters_before_writing_or_starting(db):
    """A bad measure parameter is refused when the query is planned: no symbols, labels or
    behaviors written (Ray wrote them before building its states), as on the local engine."""
    from deepbase_duck.errors import BadParameterError
    dbd.add_dataset(db, "fresh_params", TEXTS[:6])
    before = _counts(db) | {"behaviors": db.execute("SELECT count(*) FROM behaviors").fetchall()[0][0]}
    for kw in ({"keep_activations": True, "corr": {"intervals": "bogus"}},
               {"measures": ["probe"], "control": True, "probe": {"l2": -1.0}}):
        with pytest.raises(BadParameterError):
            dbd.inspect(db, "planted", ["mix"], ["digit"], "fresh_params", engine="ray", reuse=False, **kw)
    after = _counts(db) | {"behaviors": db.execute("SELECT count(*) FROM behaviors").fetchall()[0][0]}
    assert after == before


def test_slow_blocks_are_not_cut_by_the_startup_timeout(db):
    """startup_timeout bounds waiting for workers, not a block's run (block_timeout does)."""
    dbd.register_model(db, "planted_slower", "ray_models:slow_planted", {"delay": 0.5})
    kw = {"reuse": False, "batch_size": 2, "limit": 16}
    dbd.inspect(db, "planted_slower", ["mix"], ["digit"], "snippets", engine=RayEngine(block_batches=4), **kw)
    # the same workers (kept), blocks of 4 forward passes of 0.5 s: each longer than the 1 s
    t = dbd.inspect(db, "planted_slower", ["mix"], ["digit"], "snippets",
                    engine=RayEngine(block_batches=4, startup_timeout=1), **kw)
    p = _last_params(db)
    assert t.num_rows > 0 and p["records_used"] == 16 and p["ray_workers_reused"] is True
    with pytest.raises(dbd.DeepBaseError, match="no Ray block finished within 1 s"):
        dbd.inspect(db, "planted_slower", ["mix"], ["digit"], "snippets", reuse=False, batch_size=2, limit=16,
                    engine=RayEngine(block_batches=4, startup_timeout=60, block_timeout=1))


def test_ray_and_local_read_the_same_records_of_a_partial_float16_store(db):
    """With float16 activations stored for half the records, both engines read them and run
    the model on the rest (Ray computed every record before): the same scores, so a Ray query
    after a local one may be served its scores, and one that scans reads the stored half too."""
    dbd.add_dataset(db, "half16", TEXTS[:8])
    ids = [r for (r,) in db.execute("SELECT record_id FROM records WHERE dataset = 'half16' ORDER BY 1").fetchall()]
    dbd.extract(db, "planted", ["mix"], "half16", dtype="float16", record_ids=ids[:4])
    local = dbd.inspect(db, "planted", ["mix"], ["digit"], "half16")
    assert _last_params(db)["reused"]["activation_records_read"] == 4
    ray = dbd.inspect(db, "planted", ["mix"], ["digit"], "half16", engine="ray", reuse=False)
    p = _last_params(db)
    source = db.execute("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
    assert source == "stored+model" and p["reused"]["activation_records_read"] == 4
    assert p["reused"]["activation_records_computed"] == 4
    np.testing.assert_allclose(np.array(ray.column("score").to_pylist(), float),
                               np.array(local.column("score").to_pylist(), float), atol=1e-9)
