"""Several models of one architecture in one scan: equal scores to one model at a time, fused
forward passes where torch.vmap can, and a clear record of what ran."""
from __future__ import annotations

import json

import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.models.charlstm import encode_chars

from conftest import TEXTS, planted_adapter

HYPS = ["digit", "in_string", "bracket_depth"]


def variant(k: int):
    """The planted model with its learned part (embed, mix) moved by k: same architecture."""
    a = planted_adapter()
    with torch.no_grad():
        a.module.embed.weight.add_(0.3 * k)
        a.module.mix[0].weight.mul_(1 + 0.5 * k)
    a._checksum = None
    return a


def by_key(table):
    return {(r["model"], r["layer"], r["unit"], r["hypothesis"], r["measure"]): r["score"] for r in table.to_pylist()}


def params_of_last(con):
    return json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


@pytest.fixture
def three(con):
    for k in range(3):
        dbd.register_model(con, f"v{k}", variant(k))
    dbd.add_dataset(con, "snippets", TEXTS)
    return con


def test_stacked_scan_equals_one_model_at_a_time_with_fused_forward(three):
    names = ["v0", "v1", "v2"]
    calls = {n: dbd.catalog.session_of(three).adapters[n].module.calls for n in names}
    together = dbd.inspect(three, names, ["planted", "mix"], HYPS, "snippets", measures=["corr"])
    p = params_of_last(three)
    assert p["scan"] == "together" and p["forward"] == "vmap" and p["models"] == names
    # the fused pass ran the stacked weights, not the models one by one
    assert all(dbd.catalog.session_of(three).adapters[n].module.calls == calls[n] for n in names[1:])
    assert three.sql("SELECT model FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() == [("v0, v1, v2",)]
    apart = {}
    for n in names:
        apart.update(by_key(dbd.inspect(three, n, ["planted", "mix"], HYPS, "snippets",
                                        measures=["corr"])))
    got = by_key(together)
    assert got.keys() == apart.keys() and len(got) == 3 * (5 + 4) * len(HYPS)
    for k, v in got.items():
        assert (v is None) == (apart[k] is None), k
        if v is not None:
            assert v == pytest.approx(apart[k], abs=1e-9), k
    # the models differ (their mix layers score differently), and the planted units are found in each
    mix = [got[(n, "mix", 0, "digit", "corr")] for n in names]
    assert len({round(m, 6) for m in mix}) == 3
    for n in names:
        assert got[(n, "planted", 0, "digit", "corr")] == pytest.approx(1.0)


def test_lstm_checkpoints_scan_together_with_sequential_forward(con):
    from deepbase_duck.models.zoo import charlstm
    names = ["step0", "final"]
    for n in names:
        dbd.register_model(con, n, charlstm(n, device="cpu"))
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    together = by_key(dbd.inspect(con, names, ["lstm1"], ["in_string"], "snippets"))
    p = params_of_last(con)
    assert p["scan"] == "together" and p["forward"] == "sequential" and "lstm" in p["why_sequential"]
    for n in names:
        apart = by_key(dbd.inspect(con, n, ["lstm1"], ["in_string"], "snippets"))
        for k, v in apart.items():
            assert (v is None and together[k] is None) or together[k] == pytest.approx(v, abs=1e-12)


def test_when_models_cannot_share_a_scan_they_run_one_at_a_time(three):
    other = CharAdapter(variant(5).module, encode_chars, "chars-other", device="cpu")
    dbd.register_model(three, "other", other)
    t = dbd.inspect(three, ["v0", "other"], ["planted"], ["digit"], "snippets")
    p = params_of_last(three)
    assert p["scan"] == "one model at a time" and "different tokenizations" in p["why_one_at_a_time"]
    assert set(t.column("model").to_pylist()) == {"v0", "other"}
    # stored activations are read rather than recomputed
    dbd.extract(three, "v1", ["planted"], "snippets")
    dbd.inspect(three, ["v1", "v2"], ["planted"], ["digit"], "snippets")
    p = params_of_last(three)
    assert p["scan"] == "one model at a time" and "stored activations" in p["why_one_at_a_time"]


def test_bad_model_lists(three):
    before = three.sql("SELECT count(*) FROM queries").fetchall()
    with pytest.raises(DeepBaseError, match="model names repeat"):
        dbd.inspect(three, ["v0", "v0"], ["planted"], ["digit"], "snippets")
    with pytest.raises(DeepBaseError, match="non-empty list"):
        dbd.inspect(three, [], ["planted"], ["digit"], "snippets")
    with pytest.raises(DeepBaseError, match="nope"):
        dbd.inspect(three, ["v0", "nope"], ["planted"], ["digit"], "snippets")
    assert three.sql("SELECT count(*) FROM queries").fetchall() == before


def test_sql_takes_a_list_of_models_and_top_k(three):
    rows = three.sql("SELECT model, count(*) FROM inspect(['v0', 'v2'], ['planted'], ['digit'], 'snippets') "
                     "GROUP BY model ORDER BY model").fetchall()
    assert rows == [("v0", 5), ("v2", 5)]
    p = params_of_last(three)
    assert p["models"] == ["v0", "v2"] and p["scan"] == "together"
    three.sql("SELECT * FROM inspect('v1', ['planted'], ['digit'], 'snippets', top_k := 2, batch_size := 4)").fetchall()
    p = params_of_last(three)
    assert p["top_k"] == 2 and p["seed"] == 0


def test_a_stacked_scan_tokenises_each_record_once(three, monkeypatch):
    """The stacked scan stores the symbols from its batches' own encodings: one encode per record."""
    from deepbase_duck.extraction.adapters import CharAdapter
    seen = []
    real = CharAdapter.encode
    monkeypatch.setattr(CharAdapter, "encode", lambda self, texts: seen.extend(texts) or real(self, texts))
    dbd.inspect(three, ["v0", "v1", "v2"], ["planted"], ["digit"], "snippets", measures=["corr"])
    assert params_of_last(three)["scan"] == "together"
    assert sorted(seen) == sorted(TEXTS)
    assert three.sql("SELECT count(*), sum(n_symbols) FROM tokenized_records").fetchall() == [
        (len(TEXTS), sum(len(t) for t in TEXTS))]
    assert three.sql("SELECT count(*) FROM symbols").fetchall() == [(sum(len(t) for t in TEXTS),)]


def test_models_differing_in_a_setting_outside_their_weights_are_not_fused(con):
    """The fused pass runs the first model's code and settings with each model's weights: a
    model whose output depends on a plain attribute (here a flag that turns '~' into NaN) must run
    its own forward, and the query says why."""
    from conftest import PlantedModel
    from deepbase_duck.engine.stacking import _same_structure
    assert _same_structure([PlantedModel(), PlantedModel()]) is None
    assert _same_structure([PlantedModel(), PlantedModel(nan_on_tilde=True)]) == \
        "submodule 'planted' setting 'nan_on_tilde' differs (False vs True)"
    dbd.register_model(con, "good", planted_adapter())
    dbd.register_model(con, "flagged", planted_adapter(nan_on_tilde=True))
    dbd.add_dataset(con, "plain", TEXTS)
    dbd.inspect(con, ["good", "flagged"], ["planted"], HYPS, "plain", measures=["corr"])
    p = params_of_last(con)
    assert p["scan"] == "together" and p["forward"] == "sequential"
    assert "setting 'nan_on_tilde' differs" in p["why_sequential"]


def test_models_with_hooks_or_other_variants_run_their_own_forward(three):
    """A forward hook (an ablation outside the weights) is honoured: that model runs on its own,
    and its hooked layer scores as the hook makes it; differing variants also stop fusion."""
    ad = dbd.catalog.session_of(three).adapters["v1"]
    handle = ad.module.mix.register_forward_hook(lambda m, i, o: o * 0)
    try:
        t = dbd.inspect(three, ["v0", "v1"], ["mix"], HYPS, "snippets", measures=["corr"], reuse=False)
        p = params_of_last(three)
        assert p["forward"] == "sequential" and "model 'v1' has forward hooks" in p["why_sequential"]
        got = by_key(t)
        assert all(v is None for k, v in got.items() if k[0] == "v1")            # zeroed: constant
        assert any(v is not None for k, v in got.items() if k[0] == "v0")
    finally:
        handle.remove()
    for n in ("v0", "v2"):                            # the planted model counts its calls: a plain
        dbd.catalog.session_of(three).adapters[n].module.calls = 0      # setting that must match too
    dbd.catalog.session_of(three).adapters["v2"].variant = "patched"
    dbd.inspect(three, ["v0", "v2"], ["mix"], HYPS, "snippets", measures=["corr"], reuse=False)
    assert "variants differ (v0: '', v2: 'patched')" in params_of_last(three)["why_sequential"]


class _Attending(torch.nn.Module):
    """A character model with one self-attention step (torch's fused attention, which has no vmap
    batching rule on the CPU: torch would loop over the models inside the fused call)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(98, 8)
        self.qkv = torch.nn.Linear(8, 24)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(98, 8, generator=g))
            self.qkv.weight.copy_(torch.randn(24, 8, generator=g) * 0.3)
        self.out = torch.nn.Identity()

    def forward(self, ids):
        q, k, v = self.qkv(self.embed(ids)).chunk(3, -1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])


def test_an_operator_without_a_batching_rule_runs_the_models_one_after_another(con):
    """torch.vmap's per-model fallback loop is off inside the fused pass: the CPU's attention
    operator stops fusion (recorded in why_sequential), the scores equal one model at a time,
    and torch's global fallback switch is left as it was."""
    names = ["a0", "a1"]
    for i, n in enumerate(names):
        dbd.register_model(con, n, CharAdapter(_Attending(i), encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "snippets", TEXTS[:8])
    before = torch._C._functorch._is_vmap_fallback_enabled()
    together = by_key(dbd.inspect(con, names, ["out"], ["digit", "in_string"], "snippets"))
    p = params_of_last(con)
    assert p["scan"] == "together" and p["forward"] == "sequential"
    assert "scaled_dot_product" in p["why_sequential"], p["why_sequential"]
    assert torch._C._functorch._is_vmap_fallback_enabled() == before
    for n in names:
        apart = by_key(dbd.inspect(con, n, ["out"], ["digit", "in_string"], "snippets"))
        for k, v in apart.items():
            assert (v is None and together[k] is None) or together[k] == pytest.approx(v, abs=1e-9), k


def test_adapters_of_another_class_are_not_fused(con):
    """The fused pass runs the first adapter's forward(): a model whose adapter class passes its
    own arguments to the module is scanned on its own, with the reason, and scores as alone."""
    from deepbase_duck.extraction.adapters import to_device

    class Gained(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(100, 4)
            self.act = torch.nn.Tanh()

        def forward(self, ids, gain=1.0):
            return self.act(gain * self.embed(ids))

    class Scaled(CharAdapter):
        def forward(self, encoded):
            with torch.inference_mode():
                return self.module(to_device(encoded.inputs, self.device), gain=3.0)

    dbd.register_model(con, "plain", CharAdapter(Gained(), encode_chars, "chars-test", device="cpu"))
    dbd.register_model(con, "scaled", Scaled(Gained(), encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "s", TEXTS)
    together = by_key(dbd.inspect(con, ["plain", "scaled"], ["act"], ["digit"], "s", measures=["probeless"]))
    assert "adapter classes differ (plain: " in params_of_last(con)["why_sequential"]
    alone = by_key(dbd.inspect(con, "scaled", ["act"], ["digit"], "s", measures=["probeless"], reuse=False))
    mine = {k: v for k, v in together.items() if "scaled" in k}
    assert mine and all(v == pytest.approx(alone[k], abs=1e-12) for k, v in mine.items())
