"""A model's identity covers its submodules' plain settings (model v3).

The checksum that keys everything stored from a model (activations, cached scores) covered its
weights, submodule classes, training mode and variant, but not a setting kept outside the
weights: a custom module's ``self.scale``, ``nn.LeakyReLU(negative_slope)``, ``nn.LayerNorm(eps)``,
a list of units to ablate. Changing one reused the old model's activations and scores silently.
Now they are part of it ('deepbase-duck model v3'); stores registered under the v2 checksum are
adopted, their stored activations kept.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from conftest import TEXTS, per_char_labels, planted_adapter
from deepbase_duck.extraction.adapters import CharAdapter, model_checksum, state_fingerprint, weights_checksum
from deepbase_duck.hypotheses.core import get_hypothesis
from deepbase_duck.models.charlstm import VOCAB, encode_chars

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).parent


# the identity stores before v3 hold, computed as the earlier code did (for eval models)
from test_extraction_hunt15 import _old_checksum as v2_checksum  # noqa: E402


def last_query(con):
    source, params = con.sql("SELECT source, params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return source, json.loads(params)


class Scaled(torch.nn.Module):
    """A char model whose layer `out` reads tanh(scale * embedding): ``scale`` a plain attribute
    read in forward."""

    def __init__(self, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(len(VOCAB), 4)
        self.out = torch.nn.Linear(4, 4)
        self.scale = scale

    def forward(self, ids):
        return self.out(torch.tanh(self.scale * self.embed(ids)))


def test_a_setting_changed_on_a_live_model_between_queries_is_another_model(con):
    """``self.scale`` changed between two queries: the second is not served the first's cached
    scores nor its stored activations, and its scores are the changed model's (numpy)."""
    ad = CharAdapter(Scaled(0.5), encode_chars, "chars-test", device="cpu")
    dbd.register_model(con, "s", ad)
    dbd.add_dataset(con, "d", TEXTS)
    kw = {"measures": ["corr"], "keep_activations": True}
    first = {r["unit"]: r["score"] for r in dbd.inspect(con, "s", ["out"], ["digit"], "d", **kw).to_pylist()}
    before = ad.checksum
    ad.module.scale = 4.0
    second = {r["unit"]: r["score"] for r in dbd.inspect(con, "s", ["out"], ["digit"], "d", **kw).to_pylist()}
    source, params = last_query(con)
    assert source == "model" and params["reused"]["scores_of_query"] is None
    assert params["reused"]["activation_records_read"] == 0
    with torch.no_grad():
        acts = np.concatenate([ad.module(ad.encode([t]).inputs)[0].numpy() for t in TEXTS])
    y = np.concatenate([per_char_labels(get_hypothesis("digit"), t) for t in TEXTS])
    for u in range(4):
        assert second[u] == pytest.approx(np.corrcoef(acts[:, u], y)[0, 1], abs=1e-5)
    assert max(abs(first[u] - second[u]) for u in range(4)) > 1e-3
    assert ad.checksum != before
    assert con.sql("SELECT checksum FROM models WHERE name = 's'").fetchall() == [(ad.checksum,)]


def _pair(**kw):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LeakyReLU(kw.get("slope", 0.01)),
                            torch.nn.LayerNorm(4, eps=kw.get("eps", 1e-5)))
    return a


def test_models_differing_only_in_a_setting_get_different_checksums():
    base = _pair()
    assert weights_checksum(_pair(slope=0.2)) == weights_checksum(base)
    assert model_checksum(_pair(slope=0.2)) != model_checksum(base)
    assert model_checksum(_pair(eps=1e-3)) != model_checksum(base)
    assert model_checksum(_pair()) == model_checksum(base)              # built again: the same
    x = torch.randn(3, 4)
    assert not torch.allclose(_pair(slope=0.2)(x), base(x))             # (they do compute differently)
    ablated, other = Scaled(), Scaled()
    ablated.ablate, other.ablate = [3, 7], [3, 8]
    assert model_checksum(ablated) != model_checksum(other) != model_checksum(Scaled())
    masked, remasked = Scaled(), Scaled()
    masked.mask, remasked.mask = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert model_checksum(masked) != model_checksum(remasked)
    typed, retyped = Scaled(), Scaled()
    typed.dtype, retyped.dtype = torch.float16, torch.bfloat16
    assert model_checksum(typed) != model_checksum(retyped)
    masked.mask = np.array([1.0, 1.0, 0.0, 1.0])
    assert model_checksum(masked) != model_checksum(remasked)           # a numpy array, another type
    # the same values set in another order, and on another device: the same model
    a, b = Scaled(), Scaled()
    a.p, a.q, b.q, b.p = {"x": 1, "y": (2.5, None)}, {2, 1}, {1, 2}, {"y": (2.5, None), "x": 1}
    a.where, b.where = torch.device("cpu"), torch.device("meta")
    assert model_checksum(a) == model_checksum(b)
    # what does not change the computation: torch's bookkeeping, a hook's handle, the library's path
    c = Scaled()
    c.register_forward_hook(lambda m, i, o: None)
    c.name_or_path = "/somewhere/else"
    assert model_checksum(c) == model_checksum(Scaled())


def test_the_fingerprint_sees_a_setting_change_and_an_in_place_tensor_write():
    m = Scaled()
    m.mask = torch.ones(4)
    base = state_fingerprint(m)
    assert state_fingerprint(m) == base
    m.scale = 2.0
    assert state_fingerprint(m) != base
    m.scale = 1.0
    assert state_fingerprint(m) == base
    m.mask[2] = 0.0
    assert state_fingerprint(m) != base


_CHILD = """
import sys, torch, numpy as np
sys.path.insert(0, {tests!r})
from test_identity_hunt16b import built
from deepbase_duck.extraction.adapters import model_checksum
print(built().checksum)
"""


def built():
    """A char model with settings of every kind, built the same way in any process."""
    m = Scaled(0.75)
    m.ablate, m.opts, m.kind = [3, 1], {"b": (1, 2.5), "a": None, 3: "x"}, torch.float16
    m.mask, m.table, m.flags = torch.arange(4.0), np.arange(6, dtype=np.int32).reshape(2, 3), frozenset({"u", "v"})
    m.out.negative = float("nan")
    return CharAdapter(m, encode_chars, "chars-test", device="cpu")


def test_two_identical_models_have_one_checksum_in_two_processes():
    here = built().checksum
    assert built().checksum == here
    out = subprocess.run([sys.executable, "-c", _CHILD.format(tests=str(TESTS))], capture_output=True, text=True,
                         timeout=120, cwd=str(TESTS.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == here


def test_a_call_counter_changed_by_the_forward_pass_is_not_a_setting(con):
    """The planted model counts its calls: a forward pass changes that count, which is the
    module's state, not its configuration. It does not change the identity (so a model that counts
    is not another model after each query), and finding that out changes no count."""
    ad = planted_adapter()
    calls = ad.module.calls
    first = ad.checksum
    assert ad.module.calls == calls                           # the settling pass was undone
    with torch.no_grad():
        ad.module(ad.encode(["x = 1"]).inputs)
    assert ad.module.calls == calls + 1 and ad.checksum == first
    assert model_checksum(ad.module) == first == planted_adapter().checksum
    ad.module.threshold = 5                                   # a setting nothing in forward changes
    assert ad.checksum != first


def test_a_v2_store_is_adopted_when_its_model_loads(tmp_path):
    """A store whose row and behaviors hold the v2 checksum (written before settings were
    covered): loading the model moves them to the v3 checksum, and the query reads the stored
    activations (the model does not run) and gives the scores it gave before."""
    sys.path.insert(0, str(TESTS))                             # tests/ray_models.py: a loader spec
    path = str(tmp_path / "v2.duckdb")
    con = dbd.connect(path, progress=False)
    dbd.register_model(con, "p", "ray_models:planted")
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "p", ["planted", "mix"], "snippets")
    module = dbd.catalog.session_of(con).adapter("p").module
    new = model_checksum(module)
    old = v2_checksum(module)
    assert old != new
    from deepbase_duck.extraction.adapters import model_checksum_v2
    assert model_checksum_v2(module) == old
    con.execute("UPDATE models SET checksum = ?, identity = 2", [old])          # as the v2 code wrote them
    con.execute("UPDATE behaviors SET model_checksum = ?", [old])
    dbd.close(con)
    con = dbd.connect(path, progress=False)
    try:
        again = dbd.inspect(con, "p", ["planted", "mix"], ["digit"], "snippets").to_pylist()
        assert dbd.catalog.session_of(con).adapters["p"].module.calls == 0          # it never ran
        source, params = last_query(con)
        assert source == "stored" and params["reused"]["activation_records_read"] == len(TEXTS)
        assert params["reused"]["activation_records_computed"] == 0
        assert con.sql("SELECT checksum, identity FROM models").fetchall() == [(new, 3)]
        assert con.sql("SELECT DISTINCT model_checksum FROM behaviors").fetchall() == [(new,)]
        key = lambda r: (r["layer"], r["unit"], r["hypothesis"], r["measure"])
        fresh = dbd.connect(None, progress=False)               # the same query on a new store
        try:
            dbd.register_model(fresh, "p", "ray_models:planted")
            dbd.add_dataset(fresh, "snippets", TEXTS)
            want = {key(r): r["score"] for r in dbd.inspect(fresh, "p", ["planted", "mix"], ["digit"],
                                                            "snippets").to_pylist()}
        finally:
            dbd.close(fresh)
        got = {key(r): r["score"] for r in again}
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(v, abs=1e-9) if v is not None else got[k] is None for k, v in want.items())
        dbd.inspect(con, "p", ["planted", "mix"], ["digit"], "snippets")
        assert last_query(con)[0] == "cache"                  # and its scores cached under the new key
    finally:
        dbd.close(con)


def test_a_v2_row_is_adopted_when_the_live_model_registers_again(con):
    """register_model(replace=False) of the same model over its v2 row: adopted (no 'different
    model' error), its stored activations kept and read; a model whose settings differ from what
    the v2 row was computed from is still adopted by v2's rule (v2 could not tell them apart), but
    a model with other weights is not."""
    dbd.add_dataset(con, "snippets", TEXTS)
    ad = planted_adapter()
    dbd.register_model(con, "p", ad)
    assert dbd.extract(con, "p", ["planted"], "snippets")[0]["extracted"] == len(TEXTS)
    old = v2_checksum(ad.module)
    con.execute("UPDATE models SET checksum = ?, identity = 2", [old])
    con.execute("UPDATE behaviors SET model_checksum = ?", [old])
    dbd.catalog.session_of(con).adapters.clear()
    again = planted_adapter()
    calls = again.module.calls
    session = dbd.catalog.session_of(con)
    session.register_model("p", again, replace=False)
    assert con.sql("SELECT checksum, identity FROM models").fetchall() == [(again.checksum, 3)]
    res = dbd.extract(con, "p", ["planted"], "snippets")
    assert res[0]["reused"] == len(TEXTS) and res[0]["extracted"] == 0
    assert again.module.calls == calls + 1                   # only the registration's width measurement ran
    other = planted_adapter()
    with torch.no_grad():
        other.module.mix[0].bias += 1.0
    with pytest.raises(dbd.DeepBaseError, match="different model"):
        session.register_model("p", other, replace=False)
    assert con.sql("SELECT checksum, identity FROM models").fetchall() == [(again.checksum, 3)]


def test_the_bundled_char_lstm_registers_and_scans(con):
    from deepbase_duck.models.zoo import charlstm
    ad = charlstm(device="cpu")
    dbd.register_model(con, "lstm", ad)
    dbd.add_dataset(con, "d", TEXTS[:4])
    rows = dbd.inspect(con, "lstm", ["lstm1"], ["digit"], "d", measures=["corr"]).to_pylist()
    assert len(rows) == 256 and last_query(con)[0] == "model"
    assert con.sql("SELECT checksum FROM models").fetchall() == [(ad.checksum,)]
    assert charlstm(device="cpu").checksum == ad.checksum
    dbd.inspect(con, "lstm", ["lstm1"], ["digit"], "d", measures=["corr"])
    assert last_query(con)[0] == "cache"
