"""One code path on every device: inspector states, scans, extraction and stacked checkpoint scans
give the CPU's results on an accelerator (CUDA), the device chosen at run time.

The CPU results are checked against numpy / scipy / scikit-learn elsewhere (test_inspectors_*,
test_core_inspect, test_charlstm); here the same work runs on each accelerator present and must
agree with the CPU. On a machine without one every test here is skipped: they ran on a lent H100
(benchmarks/RESULTS.md, "GPU")."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.extraction.adapters import CharAdapter
from deepbase_duck.inspectors import MEASURES, measure_class
from deepbase_duck.models.charlstm import VOCAB, encode_chars

from conftest import TEXTS

# DEEPBASE_TEST_DEVICES=cpu runs these tests' own logic on a machine without an accelerator
ACCELERATORS = ([d for d in os.environ["DEEPBASE_TEST_DEVICES"].split(",") if d] if os.environ.get("DEEPBASE_TEST_DEVICES")
                else ["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not ACCELERATORS, reason="no CUDA device on this machine")
on_each = pytest.mark.parametrize("device", ACCELERATORS or ["cuda"])

BIN = dict(name="b", kind="binary")
CAT = dict(name="cat", kind="categorical", categories=["a", "b", "c"])
CONT = dict(name="c", kind="continuous")


def hypotheses_for(measure: str) -> list[dict]:
    accepts = measure_class(measure).accepts
    return [h for h in (BIN, CAT, CONT) if h["kind"] in accepts]


def data(hyps: list[dict], n: int = 3000, width: int = 5, seed: int = 3):
    """Activations with unit 0 planted on the first hypothesis, unit 1 constant, NaN labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width)).astype(np.float32)
    cols = []
    for h in hyps:
        if h["kind"] == "binary":
            cols.append((rng.random(n) < 0.3).astype(np.float64))
        elif h["kind"] == "categorical":
            cols.append(rng.integers(0, 3, n).astype(np.float64))
        else:
            cols.append(rng.normal(size=n))
    y = np.stack(cols, 1)
    x[:, 0] = (y[:, 0] + 0.4 * rng.normal(size=n)).astype(np.float32)
    x[:, 1] = 0.25
    y[rng.random(n) < 0.1, -1] = np.nan
    return torch.from_numpy(x), torch.from_numpy(y)


def fed(measure, hyps, x, y, device, parts=(0, 1100, 2000, 3000), other_device=None):
    """States over consecutive slices (each in two batches), combined into the first; with
    ``other_device`` every second state lives there (states built on different devices merge)."""
    states = []
    for k, (a, b) in enumerate(zip(parts[:-1], parts[1:])):
        dev = other_device if (other_device and k % 2) else device
        st = measure_class(measure)(x.shape[1], hyps, device=dev)
        mid = (a + b) // 2
        for s, e in ((a, mid), (mid, b)):
            ids = torch.arange(s, e, dtype=torch.int64) // 7          # records of 7 rows
            st.update(x[s:e], y[s:e], ids)
        states.append(st)
    for st in states[1:]:
        states[0].combine(st)
    return states[0]


def close(a, b, tol) -> bool:
    """Equal up to ``tol`` (relative above 1): numbers, NaN / None alike, lists element by element."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is None and b is None
        return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


def assert_tables_close(got, want, tol, label):
    g, w = got.to_pydict(), want.to_pydict()
    assert g.keys() == w.keys(), label
    for k in w:
        assert len(g[k]) == len(w[k]), (label, k)
        for i, (a, b) in enumerate(zip(g[k], w[k])):
            assert close(a, b, tol), (label, k, i, a, b)


@on_each
@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_every_measure_gives_the_cpu_scores_on_the_device(measure, device):
    hyps = hypotheses_for(measure)
    x, y = data(hyps)
    want = fed(measure, hyps, x, y, "cpu").finalize()
    got = fed(measure, hyps, x, y, device).finalize()
    # float64 states: only the order of the reductions differs; probes train in float32
    tol = 2e-3 if measure == "probe" else 1e-9
    assert_tables_close(got, want, tol, measure)
    # states built on different devices combine into the same result
    mixed = fed(measure, hyps, x, y, device, other_device="cpu").finalize()
    assert_tables_close(mixed, want, tol, measure + " mixed")
    # and the planted unit is found on the device
    rows = [r for r in got.to_pylist() if r["unit"] == 0 and r["score"] is not None]
    if measure != "probe":
        assert rows, measure


@on_each
def test_correlation_stop_rule_rows_equal_on_the_device(device):
    hyps = [BIN, CONT]
    x, y = data(hyps)
    a, b = fed("corr", hyps, x, y, "cpu"), fed("corr", hyps, x, y, device)
    (ua, ha, sa), (ub, hb, sb) = a.score_rows(), b.score_rows()
    assert ua.tolist() == ub.tolist() and ha.tolist() == hb.tolist()
    np.testing.assert_allclose(sb, sa, rtol=1e-9, atol=1e-12)
    assert b.max_error() == pytest.approx(a.max_error(), rel=1e-9)


class CharMlp(torch.nn.Module):
    """A small character model that runs on any device (no buffers pinned to the CPU)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(len(VOCAB), 8)
        self.hidden = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
        self.out = torch.nn.Linear(16, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, ids):
        return self.out(self.hidden(self.embed(ids)))


def scores(table) -> dict:
    return {(r["model"], r["layer"], r["unit"], r["hypothesis"], r["measure"]): r["score"] for r in table.to_pylist()}


def assert_scores_close(got: dict, want: dict, tol: float, probe_tol: float = 2e-3):
    """Equal keys and NULLs; scores within ``tol`` (probes, trained in float32: ``probe_tol``)."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert (got[k] is None) == (v is None), k
        if v is not None:
            assert got[k] == pytest.approx(v, abs=probe_tol if k[-1] == "probe" else tol), k


def charlstm_scans(dev: str, tf32=False) -> tuple[dict, dict, list, dict]:
    """corr (both layers), mi / iou / probe (binary hypotheses) and a progressive corr scan of the
    bundled LSTM on ``dev`` (its adapter's ``tf32`` set): (full scores, progressive scores, records
    and symbols read, params)."""
    from deepbase_duck.models.zoo import charlstm
    con = dbd.connect(None, progress=False)
    try:
        adapter = charlstm("final", device=dev)
        adapter.tf32 = tf32
        dbd.register_model(con, "lstm", adapter)
        dbd.add_dataset(con, "snippets", TEXTS)
        t = dbd.inspect(con, "lstm", ["lstm0", "lstm1"], ["in_string", "in_comment", "bracket_depth", "digit"],
                        "snippets", measures=["corr"], device=dev, batch_size=5)
        t = pa.concat_tables([t, dbd.inspect(con, "lstm", ["lstm0", "lstm1"], ["in_string", "in_comment"],
                                             "snippets", measures=["mi", "iou", "probe"], device=dev)])
        p = dbd.inspect(con, "lstm", ["lstm1"], ["in_string", "bracket_depth"], "snippets", max_error=0.3, seed=2,
                        device=dev, batch_size=4)
        used, params = con.sql("SELECT [n_records, n_symbols], params FROM queries ORDER BY query_id DESC "
                               "LIMIT 1").fetchall()[0]
        return scores(t), scores(p), used, json.loads(params)
    finally:
        dbd.close(con)


def max_gap(got: dict, want: dict, measure: str) -> float:
    return max(abs(got[k] - v) for k, v in want.items() if k[-1] == measure and v is not None)


@on_each
def test_charlstm_scan_on_the_device_matches_the_cpu(device):
    """The bundled LSTM on the device (cuDNN) and on the CPU: by default (``ModelAdapter.tf32``
    False) the forward passes run in float32 and the scores differ in rounding only, whatever
    torch's global TF32 switch says. With TF32 asked for, activations differ at about 1e-3
    relative: correlations move by about 1e-4, mutual information by up to 1e-2 (bin edges)."""
    cpu = charlstm_scans("cpu")
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True                 # torch's default; the adapter overrides it
    try:
        exact = charlstm_scans(device)
        fast = charlstm_scans(device, tf32=True)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    gaps = {m: (max_gap(exact[0], cpu[0], m), max_gap(fast[0], cpu[0], m)) for m in ("corr", "mi", "iou", "probe")}
    print("largest |device - cpu| per measure (float32, TF32):", gaps)
    assert_scores_close(exact[0], cpu[0], 2e-5, probe_tol=0.02)   # a probe's test example may flip
    assert_scores_close(exact[1], cpu[1], 2e-5)
    assert exact[2] == cpu[2]                                     # the same records read before the stop
    assert max_gap(fast[0], cpu[0], "corr") < 2e-3 and max_gap(fast[0], cpu[0], "mi") < 5e-2
    assert exact[3]["device"] == device and exact[3]["model_devices"] == {"lstm": str(torch.device(device))}
    assert cpu[3]["device"] == "cpu" and "tf32" not in cpu[3]
    if device.startswith("cuda"):
        assert exact[3]["tf32"] == {"lstm": False} and fast[3]["tf32"] == {"lstm": True}
        assert torch.backends.cudnn.allow_tf32 == old             # the switch is restored


@on_each
def test_extracted_activations_equal_across_devices(device):
    out = {}
    for dev in ("cpu", device):
        con = dbd.connect(None, progress=False)
        dbd.register_model(con, "mlp", CharAdapter(CharMlp(1), encode_chars, "chars-test", device=dev))
        dbd.add_dataset(con, "snippets", TEXTS[:8])
        res = dbd.extract(con, "mlp", ["hidden", "out"], "snippets")
        out[dev] = [con.sql(f"SELECT record_id, pos, act FROM {r['view']} ORDER BY record_id, pos").fetchall()
                    for r in res]
        dbd.close(con)
    for a, b in zip(out["cpu"], out[device]):
        assert len(a) == len(b) == sum(len(t) for t in TEXTS[:8])
        assert [r[:2] for r in a] == [r[:2] for r in b]
        np.testing.assert_allclose(np.asarray([r[2] for r in b]), np.asarray([r[2] for r in a]),
                                   rtol=1e-5, atol=1e-6)


@on_each
def test_stacked_checkpoints_on_the_device_match_separate_cpu_scans(device):
    names = ["m1", "m2", "m3"]
    together, apart = {}, {}
    con = dbd.connect(None, progress=False)
    for i, n in enumerate(names):
        dbd.register_model(con, n, CharAdapter(CharMlp(i + 1), encode_chars, "chars-test", device=device))
    dbd.add_dataset(con, "snippets", TEXTS)
    together = scores(dbd.inspect(con, names, ["hidden", "out"], ["digit", "bracket_depth"], "snippets",
                                  device=device))
    p = con.sql("SELECT params FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0][0]
    assert '"together"' in p
    dbd.close(con)
    con = dbd.connect(None, progress=False)
    for i, n in enumerate(names):
        dbd.register_model(con, n, CharAdapter(CharMlp(i + 1), encode_chars, "chars-test", device="cpu"))
    dbd.add_dataset(con, "snippets", TEXTS)
    for n in names:
        apart.update(scores(dbd.inspect(con, n, ["hidden", "out"], ["digit", "bracket_depth"], "snippets",
                                        device="cpu")))
    dbd.close(con)
    assert_scores_close(together, apart, 1e-5)
