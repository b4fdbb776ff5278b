"""Early exit: a scan runs the forward pass only up to the last layer it reads, where each read
layer runs once per forward pass; the scores are those of the whole forward pass."""
from __future__ import annotations

import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.extraction.hooks import Retain, StopForward, run_until_retained
from deepbase_duck.models.charlstm import VOCAB, encode_chars

from conftest import TEXTS

HYPS = ["in_string", "bracket_depth", "digit"]


class Counting(torch.nn.Module):
    """Wraps a module and counts its calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


class Chain(torch.nn.Module):
    """embed -> a -> b -> head, each a counted module; with ``shared`` the module ``a`` runs twice
    (a weight-shared block, as ALBERT's layers), so its last output is the one after ``b``."""

    def __init__(self, shared: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(len(VOCAB), 6)
        self.a = Counting(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()))
        self.b = Counting(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()))
        self.head = Counting(torch.nn.Linear(6, len(VOCAB)))
        self.shared = shared
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, ids):
        x = self.b(self.a(self.embed(ids)))
        if self.shared:
            x = self.a(x)
        return self.head(x)


def adapter(shared=False, early_exit=None):
    a = CharAdapter(Chain(shared), encode_chars, "chars-test", device="cpu")
    a.early_exit = early_exit
    return a


def test_retain_stops_once_every_layer_has_given_its_output():
    ad = adapter()
    enc = ad.encode(TEXTS[:3])
    assert ad.exits_early(["a", "b"])                    # its one checking forward pass, before counting
    with Retain(ad.module, ["a", "b"]) as full:
        ad.forward(enc)
    calls = ad.module.head.calls
    with Retain(ad.module, ["a", "b"]) as ret:
        ad.forward(enc)                                  # not run for it: not stopped
        assert ad.module.head.calls == calls + 1
        ret.clear()
        ret.armed = True
        with pytest.raises(StopForward):
            ad.forward(enc)
        ret.clear()
        run_until_retained(ad, enc, ret)                 # the same, ended without an error
        assert not ret.armed
    assert ad.module.head.calls == calls + 1             # the head did not run for it
    for n in ("a", "b"):
        assert torch.equal(ret[n], full[n])


def test_early_exit_is_checked_per_set_of_layers():
    ad = adapter()
    assert ad.exits_early(["a", "b"]) and ad.exits_early(["b"])
    shared = adapter(shared=True)
    assert not shared.exits_early(["a"])                 # runs twice per forward pass
    assert shared.exits_early(["b"])
    assert adapter(shared=True, early_exit=True).exits_early(["a"])
    assert not adapter(early_exit=False).exits_early(["b"])


@pytest.mark.parametrize("shared", [False, True])
def test_scans_exit_early_with_the_whole_forward_pass_scores(con, shared):
    exits = adapter(shared)
    whole = adapter(shared, early_exit=False)
    dbd.register_model(con, "exits", exits)
    dbd.register_model(con, "whole", whole)
    dbd.add_dataset(con, "snippets", TEXTS)
    layers = ["a"] if shared else ["a", "b"]
    exits.exits_early(layers)                            # its one checking forward pass, before counting
    before = exits.module.head.calls, exits.module.b.calls
    got = dbd.inspect(con, "exits", layers, HYPS, "snippets", batch_size=5).to_pylist()
    want = dbd.inspect(con, "whole", layers, HYPS, "snippets", batch_size=5).to_pylist()
    if shared:      # 'a' runs twice: no early exit, the retained output is the last call's
        assert exits.module.head.calls > before[0]
    else:           # the head never runs in the scan
        assert exits.module.head.calls == before[0]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert (g["layer"], g["unit"], g["hypothesis"]) == (w["layer"], w["unit"], w["hypothesis"])
        assert (g["score"] is None) == (w["score"] is None)
        if w["score"] is not None:
            assert g["score"] == pytest.approx(w["score"], abs=1e-12)


def test_the_bundled_lstm_skips_its_head_and_upper_layer(con):
    """Reading lstm0 alone runs neither lstm1 nor the decoder head; the stored activations equal
    those of the whole forward pass."""
    from deepbase_duck.models.zoo import charlstm
    ad = charlstm("final", device="cpu")
    assert ad.exits_early(["lstm0"]) and ad.exits_early(["lstm0", "lstm1"])
    seen = []
    ad.module.lstm1.register_forward_hook(lambda *_: seen.append("lstm1"))
    ad.module.head.register_forward_hook(lambda *_: seen.append("head"))
    ad.variant = "call-counting hooks"        # they change nothing, but the checksum cannot know
    dbd.register_model(con, "lstm", ad)
    dbd.add_dataset(con, "snippets", TEXTS[:6])
    seen.clear()
    res = dbd.extract(con, "lstm", ["lstm0"], "snippets", batch_size=3)
    assert seen == []
    rows = con.sql(f"SELECT record_id, pos, act FROM {res[0]['view']} ORDER BY record_id, pos").fetchall()
    for rid, text in enumerate(TEXTS[:6]):
        with torch.no_grad():
            want = ad.module.lstm0(ad.module.embed(ad.encode([text]).inputs))[0][0]
        got = torch.tensor([r[2] for r in rows if r[0] == rid])
        assert torch.allclose(got, want, atol=1e-6)


class InPlace(torch.nn.Module):
    """embed -> fc1 -> ReLU(inplace=True) -> fc2: the ReLU writes into fc1's output tensor."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(len(VOCAB), 8)
        self.fc1 = torch.nn.Linear(8, 6)
        self.act = torch.nn.ReLU(inplace=True)
        self.fc2 = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.embed(x))))


def test_an_output_written_in_place_later_is_kept_as_the_module_gave_it(con):
    """fc1's activations are its own (before the in-place ReLU) whether the pass stops after it
    or runs on to fc2, in a stored extraction and when two models are scanned together (vmap)."""
    from deepbase_duck.engine.stacking import StackedForward
    adapter = CharAdapter(InPlace(), encode_chars, "chars-inplace", device="cpu")
    enc = adapter.encode(TEXTS[:4])
    with torch.no_grad():
        want = adapter.module.fc1(adapter.module.embed(enc.inputs))
    assert (want < 0).any()                                   # the ReLU would change it
    for layers in (["fc1"], ["fc1", "fc2"]):
        with Retain(adapter.module, layers) as ret:
            for _ in range(2):                               # the first pass checks, the second copies
                run_until_retained(adapter, enc, ret)
                assert torch.equal(ret["fc1"], want)
    dbd.register_model(con, "m1", adapter)
    dbd.register_model(con, "m2", CharAdapter(InPlace(seed=1), encode_chars, "chars-inplace", device="cpu"))
    dbd.add_dataset(con, "d", TEXTS)
    view = next(b["view"] for b in dbd.extract(con, "m1", ["fc1", "fc2"], "d") if b["layer"] == "fc1")
    low = con.sql(f"SELECT min(list_min(act)) FROM {view}").fetchall()[0][0]
    assert low < 0                                            # stored before the ReLU, fc2 read too
    alone = dbd.inspect(con, "m1", ["fc1"], HYPS, "d", reuse=False)
    both = dbd.inspect(con, ["m1", "m2"], ["fc1"], HYPS, "d", reuse=False)
    assert StackedForward({"a": adapter, "b": adapter}, ["fc1"]).mode == "vmap"
    a = {(r["unit"], r["hypothesis"]): r["score"] for r in alone.to_pylist()}
    b = {(r["unit"], r["hypothesis"]): r["score"] for r in both.to_pylist() if r["model"] == "m1"}
    assert a.keys() == b.keys() and all(
        (a[k] is None and b[k] is None) or abs(a[k] - b[k]) < 1e-6 for k in a)
