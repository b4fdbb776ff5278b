"""Labels, checkpoint comparison and stacked (fused) scans: checkpoints that differ outside their
weights and settings (a function, a config object) are not fused as the first model, and a control
task's draw follows the probe's seed.

Scores are checked against numpy over an independent forward pass per record."""
from __future__ import annotations

import json
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from conftest import TEXTS, per_char_labels, planted_adapter
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.hypotheses import get_hypothesis
from deepbase_duck.models.charlstm import VOCAB, encode_chars

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(torch.nn.Module):
    """Embedding -> ``act`` -> Linear, the same weights for every ``act`` and ``cfg``: checkpoints
    of an ablation that differ only in what the forward reads outside the weights."""

    def __init__(self, act, cfg=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(len(VOCAB), 4)
        self.act = act
        self.cfg = cfg
        self.out = torch.nn.Linear(4, 3)

    def forward(self, ids):
        x = self.embed(ids)
        if self.cfg is not None:
            x = x * self.cfg.scale + self.cfg.shift
        return self.out(self.act(x))


@dataclass
class Config:
    scale: float
    shift: float


def _register(con, models: dict) -> None:
    for name, module in models.items():
        dbd.register_model(con, name, CharAdapter(module.eval(), encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "snippets", TEXTS)


def _numpy_corr(module, hypothesis: str = "digit") -> np.ndarray:
    """Pearson r of each unit of ``module``'s output against the hypothesis, by numpy over one
    forward pass per record."""
    xs, ys = [], []
    for text in TEXTS:
        with torch.no_grad():
            xs.append(module(CharAdapter(module, encode_chars, "chars-test").encode([text]).inputs)[0].double().numpy())
        ys.append(per_char_labels(get_hypothesis(hypothesis), text))
    x, y = np.concatenate(xs), np.concatenate(ys)
    return np.array([np.corrcoef(x[:, u], y)[0, 1] for u in range(x.shape[1])])


def _last_params(con) -> dict:
    return json.loads(con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0])


def _scores(table, model) -> np.ndarray:
    rows = sorted((r["unit"], r["score"]) for r in table.to_pylist() if r["model"] == model)
    return np.array([s for _, s in rows], np.float64)


# -- fusion: what the forward reads outside weights and settings ----------------------------------
@pytest.mark.parametrize("pair", [
    pytest.param(lambda: (Net(torch.tanh), Net(torch.relu)), id="function"),
    pytest.param(lambda: (Net(torch.tanh, Config(1.0, 0.0)), Net(torch.tanh, Config(2.0, 0.5))), id="config"),
    pytest.param(lambda: (Net(torch.tanh, types.SimpleNamespace(scale=1.0, shift=0.0)),
                          Net(torch.tanh, types.SimpleNamespace(scale=3.0, shift=0.5))), id="namespace"),
])
def test_checkpoints_differing_in_a_function_or_config_are_not_scored_as_the_first(con, pair):
    """Before: settings leave out functions and config objects, so two checkpoints of one class
    and weights that differ in ``self.act`` (torch.tanh vs torch.relu) or in a config object
    their forward reads were fused, and the second was scored with the first's function: its
    scores were the first model's."""
    first, second = pair()
    models = {"a": first, "b": second}
    _register(con, models)
    t = dbd.inspect(con, ["a", "b"], ["out"], ["digit"], "snippets", measures=["corr"])
    for name, module in models.items():
        np.testing.assert_allclose(_scores(t, name), _numpy_corr(module), rtol=0, atol=1e-6)
    assert np.abs(_scores(t, "a") - _scores(t, "b")).max() > 1e-3      # the two really differ
    p = _last_params(con)
    assert p["scan"] == "together" and p["forward"] == "sequential", p
    assert "attribute 'act'" in p["why_sequential"] or "attribute 'cfg'" in p["why_sequential"], p


def test_the_reason_names_the_attribute_and_both_functions(con):
    _register(con, {"a": Net(torch.tanh), "b": Net(torch.relu)})
    dbd.inspect(con, ["a", "b"], ["out"], ["digit"], "snippets")
    assert _last_params(con)["why_sequential"] == (
        "submodule '(root)' attribute 'act' differs (tanh vs relu): its forward may read it")


def test_equal_configs_and_per_model_lambdas_still_fuse_and_equal_separate_scans(con):
    """What tells the same computation is still fused: a lambda made per model (same code), equal
    config objects, and the fused scores equal each model alone to 1e-10 (float64 statistics)."""
    models = {f"m{k}": Net(lambda x: torch.tanh(x) * 2, Config(1.5, -0.25)) for k in range(3)}
    for k, m in enumerate(models.values()):
        with torch.no_grad():
            m.out.weight.mul_(1 + k)
            m.embed.weight.add_(0.1 * k)
    _register(con, models)
    names = list(models)
    t = dbd.inspect(con, names, ["out"], ["digit"], "snippets", measures=["corr"])
    assert _last_params(con)["forward"] == "vmap"
    for name, module in models.items():
        alone = dbd.inspect(con, name, ["out"], ["digit"], "snippets", measures=["corr"], reuse=False)
        np.testing.assert_allclose(_scores(t, name), _scores(alone, name), rtol=0, atol=1e-10)
        np.testing.assert_allclose(_scores(t, name), _numpy_corr(module), rtol=0, atol=1e-6)


# -- control tasks: the draw follows the probe's seed ---------------------------------------------
def _control_labels_of(con, probe_seed: int):
    """(types, real, control) per symbol of every record for the 'digit' control task of a plan
    whose probe has ``seed`` = probe_seed."""
    from deepbase_duck.engine.inspect import class_frequencies, plan_inspect
    from deepbase_duck.engine.labels import block_labels
    s = dbd.catalog.session_of(con)
    plan = plan_inspect(s, "planted", ["mix"], ["digit"], "snippets", measures=["probe"], control=True,
                        probe={"seed": probe_seed})
    plan.control_freq = class_frequencies(s, plan, "chars-test")
    ids = np.asarray(plan.record_ids, np.int64)
    counts = dict(con.sql("SELECT record_id, count(*) FROM symbols GROUP BY ALL").fetchall())
    y = block_labels(s, plan, "chars-test", ids, [counts[int(r)] for r in ids]).numpy()
    names = [c["name"] for c in plan.label_columns]
    texts = dict(con.sql("SELECT record_id, text FROM records").fetchall())
    chars = np.array([ch for r in ids for ch in texts[int(r)]], dtype=object)
    return chars, y[:, names.index("digit")], y[:, names.index("digit~control")]


def test_the_control_task_draw_follows_the_probe_seed(con):
    """Before: control labels were always drawn with seed 0, so probe={'seed': s} changed the
    probe's split but never the control task: selectivity's spread over control draws could not
    be judged. The default (seed 0) draws as before."""
    from deepbase_duck.inspectors.probes import control_labels
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.extract(con, "planted", ["mix"], "snippets")          # the symbols, stored
    draws = {}
    for seed in (0, 3, 11):
        chars, real, ctrl = _control_labels_of(con, seed)
        assert np.array_equal(np.isnan(ctrl), np.isnan(real))         # the real task's symbols
        for ch in set(chars):                                         # one class per word type
            assert len(set(ctrl[chars == ch].tolist())) == 1, ch
        # the empirical class distribution of the real task, over the selected symbols
        freq = np.bincount(real[~np.isnan(real)].astype(int), minlength=2).astype(float)
        np.testing.assert_array_equal(ctrl, control_labels(chars, 2, freq, seed=seed).astype(float))
        draws[seed] = {ch: ctrl[chars == ch][0] for ch in set(chars)}
    assert draws[0] != draws[3] and draws[3] != draws[11]


def test_a_control_query_with_a_probe_seed_is_not_served_the_seed_0_draw(planted, monkeypatch):
    """Control tasks were drawn with seed 0 whatever the probe's seed; a query stored then holds
    that draw under the fingerprint the same query had. A control query with a nonzero probe seed
    now marks its key (``control_draw``), so it is scanned, not served the old draw; seed 0 (the
    default) and queries without control keep their keys, and their caches."""
    from deepbase_duck.catalog import session_of
    import importlib
    engine = importlib.import_module("deepbase_duck.engine.inspect")
    session = session_of(planted)

    def key(control, seed):
        plans = engine.plan_inspect(session, "planted", ["planted"], ["digit"], "snippets", ["probe"], control=control,
                                    probe={"seed": seed})
        return engine.query_fingerprint(session, [plans], False, 0)
    now = {(c, s): key(c, s) for c in (True, False) for s in (0, 3)}
    monkeypatch.setattr(engine, "control_draw", lambda plan: None)      # the key of before
    before = {(c, s): key(c, s) for c in (True, False) for s in (0, 3)}
    assert now[True, 3] != before[True, 3]
    assert [now[k] == before[k] for k in [(True, 0), (False, 0), (False, 3)]] == [True, True, True]
