"""Edge cases of several models scanned together (engine/stacking.py) and of compare_layers' CKA:
what the fused pass (torch.vmap over the first model's code) must not stand in for, each checked
against the models scanned one at a time and against numpy on the models' own activations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.extraction.adapters import CharAdapter, to_device
from deepbase_duck.hypotheses import get_hypothesis
from deepbase_duck.models.charlstm import VOCAB, encode_chars

from conftest import TEXTS, per_char_labels

pytestmark = pytest.mark.usefixtures("one_thread")

SNIPPETS = TEXTS[:8]


class Net(torch.nn.Module):
    """embed -> (x scale, x dims, + sum of a non-persistent buffer) -> BatchNorm or nothing -> tanh.
    ``scale`` is a tensor kept as a plain attribute and ``dims`` a list: settings outside the
    weights, which the fused pass would take from the first model."""

    def __init__(self, seed, scale=None, dims=None, bn=False, shift=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(len(VOCAB), 4)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(len(VOCAB), 4, generator=g))
        self.bn = torch.nn.BatchNorm1d(4, affine=False) if bn else torch.nn.Identity()
        self.act = torch.nn.Tanh()
        self.scale = scale
        self.dims = dims
        if shift is not None:
            self.register_buffer("shift", shift, persistent=False)

    def pre(self, ids):
        x = self.embed(ids)
        if self.scale is not None:
            x = x * self.scale
        if self.dims is not None:
            x = x * torch.tensor(self.dims, dtype=x.dtype)
        if hasattr(self, "shift"):
            x = x + self.shift.sum()
        return x

    def forward(self, ids):
        return self.act(self.bn(self.pre(ids).transpose(1, 2)).transpose(1, 2))


def numpy_acts(net: Net, texts, bn_train=False) -> np.ndarray:
    """The act layer over ``texts``, one record at a time, computed in numpy from the weights
    (BatchNorm in training mode: each record's own mean and biased variance over its symbols)."""
    w = net.embed.weight.detach().double().numpy()
    out = []
    for t in texts:
        x = w[[VOCAB.index(c) for c in t]]
        if net.scale is not None:
            x = x * float(net.scale)
        if net.dims is not None:
            x = x * np.asarray(net.dims, np.float64)
        if hasattr(net, "shift"):
            x = x + float(net.shift.sum())
        if bn_train:
            x = (x - x.mean(0)) / np.sqrt(x.var(0) + net.bn.eps)
        out.append(np.tanh(x))
    return np.concatenate(out)


def numpy_corr(acts: np.ndarray, texts, hyp: str) -> np.ndarray:
    y = np.concatenate([per_char_labels(get_hypothesis(hyp), t) for t in texts])
    xc, yc = acts - acts.mean(0), y - y.mean()
    return (xc * yc[:, None]).sum(0) / np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum())


def corr_scores(table, model: str, hyp: str) -> np.ndarray:
    rows = sorted((r["unit"], r["score"]) for r in table.to_pylist()
                  if r["model"] == model and r["hypothesis"] == hyp and r["measure"] == "corr")
    return np.array([s for _, s in rows], np.float64)


def last_params(con) -> dict:
    return json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


def scan_pair(con, a, b, batch_size=16):
    """Register two models (as CharAdapters, which put them in eval mode) and a dataset."""
    dbd.register_model(con, "a", CharAdapter(a, encode_chars, "chars-test", device="cpu"))
    dbd.register_model(con, "b", CharAdapter(b, encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "s", SNIPPETS)


def check_against_alone_and_numpy(con, net_b, batch_size=16, bn_train=False, numpy_tol=1e-6):
    """b's scores scanned together with a equal b's scores scanned alone (1e-12) and numpy's."""
    hyps = ["digit", "in_string"]
    together = dbd.inspect(con, ["a", "b"], ["act"], hyps, "s", measures=["corr"], batch_size=batch_size)
    params = last_params(con)
    alone = dbd.inspect(con, "b", ["act"], hyps, "s", measures=["corr"], batch_size=batch_size, reuse=False)
    acts = numpy_acts(net_b, SNIPPETS, bn_train)
    for h in hyps:
        np.testing.assert_allclose(corr_scores(together, "b", h), corr_scores(alone, "b", h), rtol=0, atol=1e-12)
        np.testing.assert_allclose(corr_scores(together, "b", h), numpy_corr(acts, SNIPPETS, h),
                                   rtol=0, atol=numpy_tol)
    return params


@pytest.mark.parametrize("setting", ["scale", "dims"])
def test_a_tensor_or_list_kept_outside_the_weights_stops_fusion(con, setting):
    """A tensor kept as a plain attribute (not a buffer) or a list setting is part of what the
    model computes: the fused pass would run b with a's; now the models run one after another."""
    if setting == "scale":
        a, b = Net(0, scale=torch.tensor(1.0)), Net(1, scale=torch.tensor(3.0))
    else:
        a, b = Net(0, dims=[1.0, 1.0, 1.0, 1.0]), Net(1, dims=[3.0, 1.0, 0.5, 1.0])
    scan_pair(con, a, b)
    p = check_against_alone_and_numpy(con, b)
    assert p["scan"] == "together" and p["forward"] == "sequential"
    assert f"setting '{setting}' differs" in p["why_sequential"], p["why_sequential"]


def test_equal_tensor_settings_still_fuse(con):
    a, b = Net(0, scale=torch.tensor(2.0), dims=[1.0, 2.0, 1.0, 1.0]), Net(1, scale=torch.tensor(2.0),
                                                                          dims=[1.0, 2.0, 1.0, 1.0])
    scan_pair(con, a, b)
    p = check_against_alone_and_numpy(con, b)
    assert p["forward"] == "vmap" and p["why_sequential"] is None


def test_a_submodule_left_in_training_mode_is_not_fused(con):
    """b's BatchNorm put back in training mode after registration (batch statistics): the
    fused pass ran a's code in eval mode (running statistics) for b too."""
    a, b = Net(0, bn=True), Net(1, bn=True)
    scan_pair(con, a, b)
    b.bn.train()
    p = check_against_alone_and_numpy(con, b, batch_size=1, bn_train=True, numpy_tol=1e-5)
    assert p["forward"] == "sequential" and "'bn' is in eval mode in one model, training mode in another" \
        in p["why_sequential"], p["why_sequential"]


def test_models_in_training_mode_score_as_alone_to_the_last_digit(con):
    """Both in training mode: vmap's BatchNorm reduces in another order (scores differed from the
    models' own in the 9th digit); such models now run their own forward passes."""
    a, b = Net(0, bn=True), Net(1, bn=True)
    scan_pair(con, a, b)
    a.bn.train()
    b.bn.train()
    p = check_against_alone_and_numpy(con, b, batch_size=1, bn_train=True, numpy_tol=1e-5)
    assert p["forward"] == "sequential" and "is in training mode" in p["why_sequential"]


def test_non_persistent_buffers_of_other_shapes_run_sequentially_instead_of_crashing(con):
    """state_dict() leaves non-persistent buffers out, but stack_module_state stacks them: two
    models whose non-persistent buffers differ in shape crashed the scan in torch.stack."""
    a, b = Net(0, shift=torch.ones(2)), Net(1, shift=torch.full((3,), 0.25))
    scan_pair(con, a, b)
    p = check_against_alone_and_numpy(con, b)
    assert p["forward"] == "sequential"
    assert "buffer shift: (2,), float32 vs (3,), float32" in p["why_sequential"], p["why_sequential"]


def test_models_of_one_class_but_other_widths_are_scanned_with_their_own_forward(con):
    """Same class, other parameter shapes: not fused (the reason names the parameter), and each
    model is scored at its own width."""
    class Wide(Net):
        def __init__(self, seed, width):
            super().__init__(seed)
            g = torch.Generator().manual_seed(seed)
            self.embed = torch.nn.Embedding(len(VOCAB), width)
            with torch.no_grad():
                self.embed.weight.copy_(torch.randn(len(VOCAB), width, generator=g))

    a, b = Wide(0, 4), Wide(1, 6)
    scan_pair(con, a, b)
    p = check_against_alone_and_numpy(con, b)
    assert p["forward"] == "sequential"
    assert "parameter names or shapes differ (param embed.weight: (98, 4), float32 vs (98, 6), float32)" \
        == p["why_sequential"]


class Direct(CharAdapter):
    """An adapter whose forward calls the model's submodules itself."""

    def forward(self, encoded):
        with torch.inference_mode():
            return self.module.act(self.module.pre(to_device(encoded.inputs, self.device)))


def test_an_adapter_that_reaches_into_submodules_runs_sequentially_instead_of_crashing(con):
    """The fused pass hands the adapter a stand-in module without the model's submodules: an
    AttributeError there ended the scan; now the models run one after another."""
    a, b = Net(0), Net(1)
    dbd.register_model(con, "a", Direct(a, encode_chars, "chars-test", device="cpu"))
    dbd.register_model(con, "b", Direct(b, encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "s", SNIPPETS)
    # a forward pass without the module's own forward: act reads pre's output directly
    p = check_against_alone_and_numpy(con, b)
    assert p["forward"] == "sequential" and "AttributeError" in p["why_sequential"], p["why_sequential"]


def test_a_real_model_error_is_still_raised_after_the_fused_pass_gives_up(con):
    """The fused pass now gives up on any exception; the model's own error still ends the scan,
    raised by the model's own forward pass, and no scores are written."""
    class Broken(Net):
        broken = False

        def forward(self, ids):
            if self.broken:
                raise KeyError("broken model")
            return super().forward(ids)

    models = [Broken(0), Broken(1)]
    dbd.register_model(con, "a", CharAdapter(models[0], encode_chars, "chars-test", device="cpu"))
    dbd.register_model(con, "b", CharAdapter(models[1], encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "s", SNIPPETS)
    for m in models:
        m.broken = True
    before = con.sql("SELECT count(*) FROM scores").fetchall()
    with pytest.raises(KeyError, match="broken model"):
        dbd.inspect(con, ["a", "b"], ["act"], ["digit"], "s", measures=["corr"])
    assert con.sql("SELECT count(*) FROM scores").fetchall() == before


# -- compare_layers: linear CKA against the centred-HSIC formula on the full matrices -------------

def hsic_cka(x: np.ndarray, y: np.ndarray):
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hs = lambda p, q: np.trace(p @ h @ q @ h)
    d = hs(k, k) * hs(l, l)
    return hs(k, l) / math.sqrt(d) if d > 0 else None


def test_compare_layers_matches_numpy_streamed_selected_stored_and_computed(con):
    nets = {"a": Net(0, dims=[1.0, 2.0, 0.5, 1.0]), "b": Net(1)}
    for n, m in nets.items():
        dbd.register_model(con, n, CharAdapter(m, encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "s", SNIPPETS)
    ids = [r for (r,) in con.sql("SELECT record_id FROM records WHERE dataset = 's' ORDER BY 1").fetchall()]
    text = dict(con.sql("SELECT record_id, text FROM records WHERE dataset = 's'").fetchall())
    groups = ["a:act", "a:embed", "b:act", "a:act"]

    def reference(sel):
        texts = [text[r] for r in sorted(sel)]
        with torch.no_grad():
            acts = {"a:act": numpy_acts(nets["a"], texts), "b:act": numpy_acts(nets["b"], texts),
                    "a:embed": np.concatenate([nets["a"].embed(torch.tensor([[VOCAB.index(c) for c in t]]))[0]
                                              .double().numpy() for t in texts])}
        return [hsic_cka(acts[g], acts[h]) for i, g in enumerate(groups) for h in groups[i + 1:]]

    def run(**kw):
        return [r["score"] for r in dbd.compare_layers(con, groups, "s", **kw).to_pylist()]

    # the model computes in float32, numpy in float64: 1e-6 against numpy, 1e-12 between scans
    full = reference(ids)
    assert full[2] == pytest.approx(1.0, abs=1e-12)              # a:act with itself
    at_once = run(batch_size=16)
    np.testing.assert_allclose(at_once, full, rtol=0, atol=1e-6)
    assert at_once[2] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(run(batch_size=1), at_once, rtol=0, atol=1e-12)
    sel = [ids[5], ids[0], ids[3]]
    np.testing.assert_allclose(run(record_ids=sel, batch_size=2), reference(sel), rtol=0, atol=1e-6)
    dbd.extract(con, "a", ["act", "embed"], "s")                  # a read from storage, b run
    np.testing.assert_allclose(run(batch_size=3), at_once, rtol=0, atol=1e-12)
    assert con.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("stored+model",)]
