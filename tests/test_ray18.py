"""Ray engine, hunt 18: the cluster connection. An address naming this machine by another name
than Ray's (its host name, 127.0.0.1) was taken for another cluster: the engine shut its Ray down
(killing a Ray this process started) and hung connecting to it; 'localhost:6379' was taken for
another machine's port 6379. ray_address='auto' stayed on a private Ray this process had started
instead of the cluster RAY_ADDRESS names; a dead RAY_ADDRESS hung ray.init and was reported as
'None'. A pool of workers kept on a connection the user shut down was "reused" on the next one:
the query failed with Ray's "Can't find actor".

Ray client (ray://) connections need ray[client], absent here: only the address matching is
tested for them. Select with ``-m ray``."""
from __future__ import annotations

import json
import socket
import time

import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import deepbase_duck.engine.ray_engine as RE  # noqa: E402
from test_ray_failures import TESTS, _texts  # noqa: E402
from test_ray17 import no_ray  # noqa: E402,F401  (the fixture: no Ray before or after a test)

pytestmark = pytest.mark.ray
FAR = "198.51.100.7"          # TEST-NET-2 (RFC 5737): never an address of this machine


@pytest.fixture
def cluster(no_ray):
    """A Ray cluster this process did not start as its driver (as one `ray start` runs)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    yield c
    RE.release_workers()
    ray.shutdown()
    c.shutdown()


def test_addresses_are_compared_by_host_not_by_spelling():
    """'localhost:6379' matched any machine's port 6379 (the query ran on a remote cluster the
    process was connected to, not the local one asked for); a 'ray://' address is a client
    server's, matched against the client connection only."""
    assert not RE._same_address("localhost:6379", f"{FAR}:6379")
    assert not RE._same_address("127.0.0.1:6379", f"{FAR}:6379")
    assert RE._same_address(f"{FAR}:6379", f"{FAR}:6379")
    assert not RE._same_address(f"{FAR}:6380", f"{FAR}:6379")
    assert not RE._same_address(f"ray://{FAR}:10001", f"{FAR}:6379")           # a native connection
    assert RE._same_address(f"ray://{FAR}:10001", f"{FAR}:6379", client=f"{FAR}:10001")
    assert not RE._same_address(f"ray://localhost:10001", f"{FAR}:6379", client=f"{FAR}:10001")


def test_this_machines_ray_named_by_host_name_is_reused_not_killed(no_ray):
    """Ray's GCS address names this machine by its node IP; the same Ray asked for by the host
    name was another cluster: the engine shut the Ray this process started down and hung
    connecting to it."""
    ray.init(num_cpus=1, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
    mine = ray.get_runtime_context().gcs_address
    port = mine.rsplit(":", 1)[1]
    for name in (socket.gethostname(), "127.0.0.1", "localhost"):
        RE.RayEngine(address=f"{name}:{port}", connect_timeout=5).connect()
        assert ray.is_initialized() and ray.get_runtime_context().gcs_address == mine


def test_auto_leaves_a_private_ray_for_the_cluster_ray_address_names(cluster, monkeypatch):
    """ray_address='auto' is the cluster RAY_ADDRESS (or the last `ray start`) names; a private
    Ray this process started with 'local' was kept instead, and the query ran there."""
    RE.RayEngine(address="local").connect()
    private = ray.get_runtime_context().gcs_address
    assert private != cluster.address
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    RE.RayEngine(address="auto").connect()
    assert ray.get_runtime_context().gcs_address == cluster.address
    RE.RayEngine(address="auto").connect()           # and kept for the next query
    assert ray.get_runtime_context().gcs_address == cluster.address


def test_a_dead_ray_address_fails_fast_naming_it(no_ray, monkeypatch):
    """ray_address=None with RAY_ADDRESS naming a cluster that is gone: ray.init retried for a
    minute or more, and the error named the address None."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    c = dbd.connect(None, progress=False)
    try:
        dbd.register_model(c, "planted", "ray_models:planted")
        dbd.add_dataset(c, "many", _texts(4))
        t = time.time()
        with pytest.raises(DeepBaseError, match=r"'127\.0\.0\.1:1'.*unreachable.*RAY_ADDRESS"):
            dbd.inspect(c, "planted", ["mix"], ["digit"], "many", reuse=False, measures=["corr"], engine="ray",
                        ray_options={"connect_timeout": 5})
        assert time.time() - t < 30
    finally:
        dbd.close(c)


def test_a_pool_kept_on_a_connection_shut_down_is_not_reused(cluster):
    """The user's ray.shutdown() ends the job whose actors the kept pool holds; the next query on
    the same cluster "reused" them and failed with Ray's "Can't find actor"."""
    c = dbd.connect(None, progress=False)
    try:
        dbd.register_model(c, "planted", "ray_models:planted")
        dbd.add_dataset(c, "many", _texts(6))
        reused = []
        for _ in range(2):
            dbd.inspect(c, "planted", ["mix"], ["digit"], "many", reuse=False, measures=["corr"], engine="ray",
                        ray_address=cluster.address,
                        ray_options={"runtime_env": {"env_vars": {"PYTHONPATH": TESTS}}})
            reused.append(json.loads(c.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1")
                                     .fetchall()[0][0])["ray_workers_reused"])
            ray.shutdown()                           # the user's own, between the queries
        assert reused == [False, False]
        assert c.execute("SELECT count(DISTINCT query_id) FROM scores").fetchall()[0][0] == 2
    finally:
        dbd.close(c)
