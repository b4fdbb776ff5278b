"""Ray engine, hunt 15: the states a GPU worker sends back hold no tensor left on the GPU (a
nested sample or state included), and the Ray engine answers as the local engine under the
early-stopping changes (a class the first windows do not meet, a rule that first holds at the
last window).

The parity test starts a local Ray of 2 CPUs (as tests/test_ray_failures.py); select with ``-m ray``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deepbase_duck as dbd

ray = pytest.importorskip("ray")

import deepbase_duck.engine.ray_engine as RE  # noqa: E402
from deepbase_duck.inspectors.base import measure_class  # noqa: E402

HYPS = [{"name": "digit", "kind": "binary"}, {"name": "in_string", "kind": "binary"}]


class _OnGpu(torch.Tensor):
    """Stands for a CUDA tensor on a machine without one: .cpu() turns it into a plain tensor."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def _walk(obj, seen=None):
    """Every (holder, name, value) reachable through attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    items = (obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple))
             else vars(obj).items() if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.Tensor))
             else ())
    for k, v in list(items):
        yield obj, k, v
        if not isinstance(v, torch.Tensor):
            yield from _walk(v, seen)


def _as_if_on_gpu(state):
    """Mark every tensor held by ``state`` (nested objects included) as a GPU tensor and every
    device attribute as cuda, as a state built by a GPU worker holds them."""
    for holder, k, v in list(_walk(state)):
        if isinstance(holder, (list, tuple)):
            continue
        if isinstance(v, torch.Tensor):
            new = v.as_subclass(_OnGpu)
            if isinstance(holder, dict):
                holder[k] = new
            else:
                setattr(holder, k, new)
        elif isinstance(v, torch.device) and not isinstance(holder, dict):
            setattr(holder, k, torch.device("cuda", 0))


@pytest.mark.parametrize("measure", ["ap", "spearman", "pointbiserial", "corr", "mi"])
def test_states_from_a_gpu_worker_come_back_wholly_on_the_cpu(measure):
    """_to_cpu moved the tensors a state held directly, not those of an object it holds: the
    RowSample of ap/spearman and the PearsonState of pointbiserial stayed on the worker's GPU, so
    a driver without a GPU could not unpickle the block's states (and one with a GPU combined
    CPU and CUDA tensors)."""
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(60, 3, generator=g)
    labels = (torch.rand(60, 2, generator=g) > 0.5).to(torch.float64)
    recs = torch.repeat_interleave(torch.arange(6), 10)
    state = measure_class(measure)(3, HYPS, device="cpu")
    state.update(acts, labels, recs)
    reference = measure_class(measure)(3, HYPS, device="cpu")
    reference.update(acts, labels, recs)
    _as_if_on_gpu(state)
    assert any(isinstance(v, _OnGpu) for _, _, v in _walk(state))
    moved = RE._to_cpu(state)
    left = [k for _, k, v in _walk(moved) if isinstance(v, _OnGpu)
            or (isinstance(v, torch.device) and v.type != "cpu")]
    assert left == []
    # and it merges into the driver's CPU state as the worker's own state would
    total = measure_class(measure)(3, HYPS, device="cpu").combine(moved)
    a, b = total.score_rows()[2], reference.score_rows()[2]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


# -- the Ray engine and the local engine under today's early-stopping changes -------------------
from test_ray_failures import _texts, local_ray  # noqa: E402,F401  (a local Ray of 2 CPUs; records)


def _params(c):
    return json.loads(c.execute("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


def _both(texts, hyps, **kw):
    out = []
    for extra in ({}, {"engine": "ray", "ray_options": {"block_batches": 1}}):
        c = dbd.connect(None, progress=False)
        try:
            dbd.register_model(c, "planted", "ray_models:planted")
            dbd.add_dataset(c, "many", texts)
            t = dbd.inspect(c, "planted", ["planted", "mix"], hyps, "many", reuse=False, **kw, **extra)
            out.append((t, _params(c)))
        finally:
            dbd.close(c)
    return out


def _assert_same(local, remote):
    (a, pa_), (b, pb) = local, remote
    key = lambda r: (r["layer"], r["unit"], r["hypothesis"], r["measure"])  # noqa: E731
    a, b = {key(r): r for r in a.to_pylist()}, {key(r): r for r in b.to_pylist()}
    assert a.keys() == b.keys() and a
    for k, r in a.items():
        for col in ("n", "score", "ci_low", "ci_high"):
            x, y = r[col], b[k][col]
            assert (x is None and y is None) or abs(x - y) <= 1e-9, (k, col, x, y)
    assert pb["engine"] == "ray"
    for k in ("records_used", "stopped_early", "stop_rule", "rare", "reused"):
        assert pa_[k] == pb[k], k
    assert pa_["bound_reached"] == pytest.approx(pb["bound_reached"], abs=1e-9)


@pytest.mark.ray
@pytest.mark.parametrize("rule", ["max_error", "top_k"])
def test_a_class_the_first_windows_do_not_meet_reads_on_on_ray_as_locally(local_ray, rule):
    texts = _texts()
    c = dbd.connect(None, progress=False)
    dbd.add_dataset(c, "many", texts)
    order = [r for (r,) in c.execute("SELECT record_id FROM seeded_order('many', seed := 2)").fetchall()]
    text_of = dict(c.execute("SELECT record_id, text FROM records WHERE dataset = 'many'").fetchall())
    dbd.close(c)
    last = {text_of[r] for r in order[-3:]}
    assert all(text_of[r] not in last for r in order[:-3])

    @dbd.hypothesis(f"ray_last_three_{rule}", kind="binary")
    def last_three(text):
        return [(0, len(text))] if text in last else []
    kw = dict(max_error=0.9) if rule == "max_error" else dict(top_k=3, stable_windows=1)
    local, remote = _both(texts, ["digit", f"ray_last_three_{rule}"], measures=["corr", "mi"], batch_size=8,
                          seed=2, **kw)
    _assert_same(local, remote)
    assert remote[1]["records_used"] == 120 and not remote[1]["stopped_early"]


@pytest.mark.ray
def test_a_rule_first_holding_at_the_last_window_is_a_full_scan_on_ray_as_locally(local_ray):
    local, remote = _both(_texts(40), ["digit", "in_string"], measures=["corr", "mi"], batch_size=8, seed=5,
                          max_error=0.9)
    _assert_same(local, remote)
    assert (remote[1]["records_used"], remote[1]["stopped_early"], remote[1]["stop_rule"]) == (40, False, None)
    assert remote[1]["ray_blocks_merged"] == remote[1]["ray_blocks"] == 5
