"""Ray engine, hunt 17: ray_address='local' reuses the Ray this process started (it restarted Ray,
and lost the kept workers, on every query), and a cluster whose workers differ in whether they see
the store's activation folder reads the stored records on those that do (one worker was asked and
its answer taken for all: a worker that did not see the folder failed the query, or none read it),
writes parts there only on those that do (keep_activations: the others' parts were listed in the
catalog but lost), and fails clearly when none that does is left.

A worker that does not see the folder is a real one: its process starts (Ray's runtime_env
'py_executable', a wrapper script) in a mount namespace of its own where the store's activation
folder is an empty tmpfs, as on a node that does not mount the shared folder. That needs root and
``unshare``: skipped elsewhere. Select with ``-m ray``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import deepbase_duck as dbd

ray = pytest.importorskip("ray")

import deepbase_duck.engine.ray_engine as RE  # noqa: E402
from test_ray_failures import TESTS, _texts, local_ray  # noqa: E402,F401  (a local Ray of 2 CPUs; records)
from test_ray_hunt15 import _assert_same as same_as_local  # noqa: E402

pytestmark = pytest.mark.ray
LAYERS = ["planted", "mix"]


def _params(c):
    return json.loads(c.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


# -- ray_address='local' ---------------------------------------------------------------------------
@pytest.fixture
def no_ray():
    """No Ray connected before the test, none left after it."""
    RE.release_workers()
    if ray.is_initialized():
        ray.shutdown()
    yield
    RE.release_workers()
    ray.shutdown()


def _local_query(c):
    dbd.inspect(c, "planted", ["mix"], ["digit"], "many", reuse=False, measures=["corr"], engine="ray",
                ray_address="local", ray_options={"runtime_env": {"env_vars": {"PYTHONPATH": TESTS}}})
    return ray.get_runtime_context().gcs_address, _params(c)


def test_local_address_reuses_the_ray_this_process_started(no_ray):
    """Each query with ray_address='local' shut Ray down and started a new one (another GCS
    address), so the workers kept for the next query were always gone. Now the Ray of this
    process is reused, whether an earlier 'local' query or ray.init() started it."""
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")
    dbd.add_dataset(c, "many", _texts(8))
    try:
        first, p1 = _local_query(c)
        second, p2 = _local_query(c)
        assert second == first                     # the same Ray: not restarted
        assert p1["ray_workers_reused"] is False and p2["ray_workers_reused"] is True
        # a Ray this process started itself is as local: reused too
        RE.release_workers()
        ray.shutdown()
        ray.init(num_cpus=2, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
        mine = ray.get_runtime_context().gcs_address
        third, _ = _local_query(c)
        assert third == mine
    finally:
        dbd.close(c)


# -- workers that differ in whether they see the activation folder ----------------------------------
WRAPPER = """#!/bin/sh
# The Ray workers started through this script take turns ($BLIND_MARK.1, .2, ...); the one whose
# turn is $BLIND_NTH (every one from turn $BLIND_FROM on) runs where $BLIND_DIR is an empty tmpfs
# (a mount namespace of its own): a node that does not see the store's activation folder.
i=1
while ! mkdir "$BLIND_MARK.$i" 2>/dev/null; do i=$((i + 1)); done
if [ "$i" = "$BLIND_NTH" ] || { [ -n "$BLIND_FROM" ] && [ "$i" -ge "$BLIND_FROM" ]; }; then
  exec unshare -m sh -c 'mount -t tmpfs blind "$0" && exec "$@"' "$BLIND_DIR" "$BLIND_PYTHON" "$@"
fi
exec "$BLIND_PYTHON" "$@"
"""


def _blind_env(tmp_path, act_root: str, nth: int = 0, since: int = 0) -> dict:
    """The runtime_env of workers of which the ``nth`` started (every one from the ``since``th on)
    does not see ``act_root``."""
    wrapper = tmp_path / "blind_python.sh"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    return {"py_executable": str(wrapper),
            "env_vars": {"PYTHONPATH": TESTS, "BLIND_MARK": str(tmp_path / "turn"), "BLIND_NTH": str(nth),
                         "BLIND_FROM": str(since or ""), "BLIND_DIR": act_root, "BLIND_PYTHON": sys.executable}}


def _can_hide_folders() -> bool:
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _partly_stored(texts, stored):
    """A store whose first ``stored`` records (by id) have activations stored (parts of 5)."""
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:planted")
    dbd.add_dataset(c, "many", texts)
    ids = [r for (r,) in c.execute("SELECT record_id FROM records WHERE dataset = 'many' ORDER BY 1").fetchall()]
    dbd.extract(c, "planted", LAYERS, "many", record_ids=ids[:stored], dtype="float16", batch_size=5)
    return c


@pytest.mark.skipif(not _can_hide_folders(), reason="hiding a folder from one Ray worker needs root and unshare -m")
@pytest.mark.parametrize("nth", [1, 2])
def test_a_worker_that_does_not_see_the_stored_activations_runs_only_the_models_blocks(local_ray, tmp_path, nth):
    """Two workers, the first or the second started not seeing the activation folder. The engine
    asked one worker whether it saw the stored parts and took its answer for both: where it was
    the blind one, none was read (ray_stored_unseen); where it was the other, the blocks reading
    them failed on the blind one ('missing or unreadable'). Now each worker is asked: the blocks
    reading stored parts go to the one that sees them, the blind one runs the model's blocks, and
    the scores, records and provenance are the local engine's."""
    kw = dict(measures=["corr"], batch_size=5, reuse=False)
    texts = _texts(60)
    c = _partly_stored(texts, 40)
    try:
        local = dbd.inspect(c, "planted", LAYERS, ["digit", "in_string"], "many", **kw)
        pl = _params(c)
    finally:
        dbd.close(c)
    c = _partly_stored(texts, 40)            # (a store of its own: no labels stored by the local query)
    try:
        act_root = str(dbd.session_of(c).act_root)
        RE.release_workers()
        env = _blind_env(tmp_path, act_root, nth)
        remote = dbd.inspect(c, "planted", LAYERS, ["digit", "in_string"], "many", engine="ray",
                             ray_options={"block_batches": 1, "num_workers": 2, "keep_workers": False,
                                          "runtime_env": env}, **kw)
        pr = _params(c)
    finally:
        dbd.close(c)
    assert (tmp_path / f"turn.{nth}").is_dir()              # a worker started blind
    assert "ray_stored_unseen" not in pr
    same_as_local((local, pl), (remote, pr))
    assert pr["reused"]["activation_records_read"] == 40 and pr["reused"]["activation_records_computed"] == 20
    assert pr["ray_workers_not_seeing_stored"] == 1         # (the blind one said so, and ran the model)


@pytest.mark.skipif(not _can_hide_folders(), reason="hiding a folder from one Ray worker needs root and unshare -m")
@pytest.mark.parametrize("nth", [1, 2])
def test_keep_activations_writes_no_part_on_a_worker_that_does_not_see_the_folder(local_ray, tmp_path, nth):
    """keep_activations with a worker that does not see the activation folder: it wrote its parts
    where the store never finds them, and the driver listed them in the catalog all the same (a
    store listing parts it does not hold). Now the blocks that write parts go to the worker that
    sees the folder: every listed part is on disk, and the local engine reading them scores as the
    Ray query did."""
    kw = dict(measures=["corr"], batch_size=5)
    c = dbd.connect(None, progress=False)
    try:
        dbd.register_model(c, "planted", "ray_models:planted")
        dbd.add_dataset(c, "many", _texts(40))
        act_root = dbd.session_of(c).act_root
        act_root.mkdir(parents=True, exist_ok=True)
        RE.release_workers()
        remote = dbd.inspect(c, "planted", LAYERS, ["digit"], "many", engine="ray", keep_activations=True,
                             ray_options={"block_batches": 1, "num_workers": 2, "keep_workers": False,
                                          "runtime_env": _blind_env(tmp_path, str(act_root), nth)}, **kw)
        pr = _params(c)
        parts = c.execute("SELECT b.directory, p.file FROM behavior_parts p JOIN behaviors b USING (behavior_id)"
                          ).fetchall()
        missing = [f"{d}/{f}" for d, f in parts if not (act_root / d / f).is_file()]
        assert parts and not missing, missing
        assert c.execute("SELECT count(DISTINCT record_id) FROM behavior_records").fetchall()[0][0] == 40
        assert not list(act_root.glob(".ray-sees-*"))        # (the driver's probe file: removed)
        again = dbd.inspect(c, "planted", LAYERS, ["digit"], "many", reuse=False, **kw)
        assert _params(c)["reused"]["activation_records_read"] == 40
    finally:
        dbd.close(c)
    key = lambda r: (r["layer"], r["unit"], r["hypothesis"])  # noqa: E731
    a, b = {key(r): r["score"] for r in remote.to_pylist()}, {key(r): r["score"] for r in again.to_pylist()}
    assert a.keys() == b.keys() and a
    assert all((a[k] is None and b[k] is None) or abs(a[k] - b[k]) <= 1e-6 for k in a)
    assert (tmp_path / f"turn.{nth}").is_dir() and pr["ray_workers_not_seeing_stored"] == 1


@pytest.mark.skipif(not _can_hide_folders(), reason="hiding a folder from one Ray worker needs root and unshare -m")
def test_a_scan_left_with_no_worker_that_sees_the_stored_activations_says_so(local_ray, tmp_path):
    """The only worker that sees the activation folder dies mid-scan and its replacement does not
    see it: the blocks reading stored parts failed on the replacement ('missing or unreadable',
    the folder named as if every node lacked it). Now the replacement is asked first, no block
    reading stored parts is sent to it, and the query fails saying that the workers that saw the
    folder are gone (it does not wait for one, and writes nothing)."""
    import threading
    import time
    c = dbd.connect(None, progress=False)
    dbd.register_model(c, "planted", "ray_models:slow_planted", {"delay": 0.3})
    dbd.add_dataset(c, "many", _texts(60))
    ids = [r for (r,) in c.execute("SELECT record_id FROM records WHERE dataset = 'many' ORDER BY 1").fetchall()]
    dbd.extract(c, "planted", LAYERS, "many", record_ids=ids[:30], batch_size=5)
    RE.release_workers()
    engine = RE.RayEngine(block_batches=1, num_workers=1, keep_workers=False,
                          runtime_env=_blind_env(tmp_path, str(dbd.session_of(c).act_root), since=2))
    out = {}

    def go():
        try:       # every window holds stored records: each block reads stored parts
            dbd.inspect(c, "planted", LAYERS, ["digit"], "many", measures=["corr"], batch_size=5, max_error=0.001,
                        seed=5, engine=engine)
        except Exception as exc:
            out["e"] = exc
    th = threading.Thread(target=go)
    th.start()
    try:
        deadline = time.time() + 120
        while engine.stats.get("merged", 0) < 1 and th.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        assert th.is_alive(), out
        ray.kill(engine._live[0], no_restart=True)
        th.join(180)
        assert not th.is_alive()
        assert isinstance(out.get("e"), dbd.DeepBaseError), out
        assert "no live Ray worker sees that folder" in str(out["e"]), out["e"]
        assert c.execute("SELECT count(*) FROM scores").fetchall()[0][0] == 0
        assert (tmp_path / "turn.2").is_dir()               # the replacement started, blind
    finally:
        th.join(180)
        dbd.close(c)


# -- keep_activations stores what the model computed ------------------------------------------------
def test_keep_activations_on_ray_does_not_store_float16_reads_as_float32(local_ray, tmp_path):
    """As the local engine (tests/test_engine17.py): the workers read the float16-stored records
    and wrote them into the float32 behavior too, rounded, where later float32 queries took them
    as the model's own activations."""
    texts = _texts(40)
    c = dbd.connect(str(tmp_path / "s.duckdb"), progress=False)
    ref = dbd.connect(None, progress=False)
    try:
        for con in (c, ref):
            dbd.register_model(con, "planted", "ray_models:planted")
            dbd.add_dataset(con, "many", texts)
        ids = [r for (r,) in c.sql("SELECT record_id FROM records ORDER BY record_id").fetchall()]
        dbd.extract(c, "planted", ["mix"], "many", dtype="float16", record_ids=ids[:10])
        dbd.inspect(c, "planted", ["mix"], ["digit"], "many", keep_activations=True, engine="ray",
                    measures=["corr"], batch_size=8)
        assert _params(c)["engine"] == "ray"
        view = c.sql("SELECT view_name FROM behaviors WHERE dtype = 'float32'").fetchall()[0][0]
        rows = c.sql(f"SELECT record_id, pos, act FROM {view} ORDER BY record_id, pos").fetchall()
        assert sorted({r for r, _, _ in rows}) == ids[10:]          # what the model ran for, only
        (e,) = dbd.extract(ref, "planted", ["mix"], "many")
        want = ref.sql(f"SELECT record_id, pos, act FROM {e['view']} WHERE record_id >= {ids[10]} "
                       "ORDER BY record_id, pos").fetchall()
        assert [(r, p) for r, p, _ in rows] == [(r, p) for r, p, _ in want]
        import numpy as np
        np.testing.assert_allclose(np.array([a for _, _, a in rows]), np.array([a for _, _, a in want]),
                                   rtol=0, atol=1e-6)
    finally:
        dbd.close(c)
        dbd.close(ref)
