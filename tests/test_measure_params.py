"""Measure parameters: a bad value raises BadParameterError naming the measure, the parameter
and the value (never a raw TypeError / OverflowError, never silently accepted or truncated);
good values, whole numbers given as floats included, keep working."""
from __future__ import annotations

import math
import re

import duckdb
import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import BadParameterError, DeepBaseError, check_float, check_integer
from deepbase_duck.inspectors import measure_class

from conftest import TEXTS, planted_adapter, snapshot

BIN = [{"name": "a", "kind": "binary"}]
NAN, INF = float("nan"), float("inf")

# (measure, parameter, bad value[, the value the message shows when it is not the whole value])
BAD = [
    ("corr", "confidence", "0.9"),
    ("corr", "confidence", None),
    ("corr", "intervals", "record"),
    ("pointbiserial", "confidence", "0.9"),
    ("probeless", "confidence", None),
    ("mi", "confidence", NAN),
    ("spearman", "confidence", "0.9"),
    ("ap", "confidence", 1.0),
    ("iou", "confidence", None),
    ("precision", "confidence", True),
    ("iou", "quantile", None),
    ("iou", "quantile", "0.1"),
    ("recall", "quantile", 0.5),
    ("f1", "quantile", NAN),
    ("iou", "max_rows", INF),
    ("iou", "max_rows", 0.5),
    ("iou", "seed", -1),
    ("mi", "bins", "x"),
    ("mi", "bins", None),
    ("mi", "bins", 2.9),
    ("mi", "bins", 1),
    ("mi", "calibration_rows", 0),
    ("spearman", "max_rows", 4.9),
    ("spearman", "max_rows", "100"),
    ("spearman", "max_rows", 3),
    ("spearman", "seed", 1.7),
    ("ap", "max_rows", NAN),
    ("probe", "topk", "5"),
    ("probe", "topk", 0),
    ("probe", "topk", [1, 2.5], 2.5),
    ("probe", "max_rows", NAN),
    ("probe", "l2", NAN),
    ("probe", "l1", -0.1),
    ("probe", "max_epochs", 0),
    ("probe", "max_epochs", -3),
    ("probe", "ridge_alpha", -5.0),
    ("probe", "tol", -1.0),
    ("probe", "tol", INF),
    ("probe", "min_per_class", -1),
    ("probe", "patience", 0),
    ("probe", "test_fraction", 1.0),
    ("probe", "confidence", "high"),
    ("probe", "seed", None),
    ("pointbiserial", "intervals", "x"),
    ("iou", "intervals", "rows"),
]


@pytest.mark.parametrize("case", BAD, ids=[f"{c[0]}-{c[1]}-{c[2]!r}" for c in BAD])
def test_bad_parameter_is_named(case):
    measure, param, value = case[:3]
    shown = case[3] if len(case) > 3 else value
    with pytest.raises(BadParameterError) as e:
        measure_class(measure)(3, BIN, **{param: value})
    msg = str(e.value)
    # the measure first (not the inner state's name: pointbiserial keeps a PearsonState), then
    # the parameter, and the value as given
    assert msg.startswith(f"{measure}: {param} must be "), msg
    assert msg.endswith(f"got {shown!r}"), msg
    assert isinstance(e.value, DeepBaseError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("measure,params,attr,want", [
    ("mi", {"bins": 4.0}, "bins", 4),
    ("mi", {"calibration_rows": np.int64(50)}, "calibration_rows", 50),
    ("iou", {"max_rows": 600.0}, "max_rows", 600),
    ("iou", {"quantile": np.float32(0.25)}, "quantile", 0.25),
    ("spearman", {"seed": 3.0}, "seed", 3),
    ("ap", {"confidence": np.float64(0.9)}, "confidence", 0.9),
    ("probe", {"topk": 5}, "topk", (5,)),
    ("probe", {"topk": [1, 3.0, np.int64(7)]}, "topk", (1, 3, 7)),
    ("probe", {"topk": None}, "topk", ()),
    ("probe", {"topk": ()}, "topk", ()),
    ("probe", {"max_epochs": 50.0}, "max_epochs", 50),
    ("probe", {"ridge_alpha": 0}, "ridge_alpha", 0.0),
    ("probe", {"min_per_class": 0}, "min_per_class", 0),
    ("probe", {"tol": 0}, "tol", 0.0),
    ("probe", {"l1": 0.01, "l2": 0}, "l1", 0.01),
])
def test_good_parameters_are_taken(measure, params, attr, want):
    st = measure_class(measure)(3, BIN, **params)
    got = getattr(st, attr)
    assert got == want and type(got) is type(want), (got, want)


def test_whole_floats_give_the_same_scores():
    """bins=4.0 is bins=4 (not a different binning), max_rows=100.0 is max_rows=100."""
    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.standard_normal((300, 3)))
    y = torch.as_tensor((x[:, :1].numpy() + rng.standard_normal((300, 1)) > 0).astype(float))
    for measure, a, b in (("mi", {"bins": 4}, {"bins": 4.0}), ("spearman", {"max_rows": 100}, {"max_rows": 100.0}),
                          ("iou", {"max_rows": 50, "quantile": 0.1}, {"max_rows": 50.0, "quantile": 0.1})):
        out = []
        for params in (a, b):
            st = measure_class(measure)(3, BIN, **params)
            st.update(x, y)
            out.append(st.finalize().column("score").to_pylist())
        assert out[0] == out[1], measure
        assert any(v is not None for v in out[0])


def test_probe_topk_int_is_one_k():
    """topk=3 re-fits on the top 3 units exactly as topk=[3] does."""
    rng = np.random.default_rng(0)
    n, W = 600, 5
    x = rng.standard_normal((n, W))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(float)[:, None]
    rows = []
    for topk in (3, [3]):
        st = measure_class("probe")(W, BIN, topk=topk, max_epochs=100)
        st.update(torch.as_tensor(x), torch.as_tensor(y), torch.arange(n) // 4)
        t = st.finalize().to_pylist()
        rows.append([(r["k"], r["score"]) for r in t if r["measure"] == "probe_topk"])
    assert rows[0] == rows[1]
    assert [k for k, _ in rows[0]] == [3]
    assert rows[0][0][1] > 0.8                    # the top 3 units hold the signal


@pytest.mark.parametrize("value,ok", [(0.5, True), (np.float32(0.5), True), (1, True), (0, True),
                                      (True, False), ("0.5", False), (None, False), (NAN, False),
                                      (INF, False), (-INF, False), (1.5, False), ([0.5], False)])
def test_check_float(value, ok):
    if ok:
        got = check_float("m: p", value, 0, 1)
        assert type(got) is float and got == float(value)
    else:
        with pytest.raises(BadParameterError, match=re.escape(f"m: p must be in [0, 1], got {value!r}")):
            check_float("m: p", value, 0, 1)


def test_check_float_bounds_and_messages():
    assert check_float("m: p", 0.0, 0) == 0.0
    with pytest.raises(BadParameterError, match=r"m: p must be a finite number > 0, got 0\.0"):
        check_float("m: p", 0.0, 0, open_low=True)
    with pytest.raises(BadParameterError, match=r"m: p must be in \(0, 0\.5\), got 0\.5"):
        check_float("m: p", 0.5, 0, 0.5, open_low=True, open_high=True)
    with pytest.raises(BadParameterError, match=r"m: p must be a finite number <= 2, got 3"):
        check_float("m: p", 3, high=2)
    with pytest.raises(BadParameterError, match=r"m: p must be a finite number, got inf"):
        check_float("m: p", math.inf)


@pytest.mark.parametrize("value,want", [(3, 3), (3.0, 3), (np.int64(3), 3), (np.float64(4.0), 4),
                                        (True, None), (3.5, None), ("3", None), (None, None), (NAN, None),
                                        (INF, None), (1, None)])
def test_check_integer(value, want):
    if want is not None:
        got = check_integer("m: p", value, 2)
        assert type(got) is int and got == want
    else:
        with pytest.raises(BadParameterError, match=re.escape(f"m: p must be an integer >= 2, got {value!r}")):
            check_integer("m: p", value, 2)


# ----------------------------------------------------------------- through dbd.inspect and SQL
@pytest.fixture
def primed(con):
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets")
    return con


@pytest.mark.parametrize("measure,params,message", [
    ("iou", {"quantile": None}, "iou: quantile must be in (0, 0.5), got None"),
    ("mi", {"bins": 2.9}, "mi: bins must be an integer >= 2, got 2.9"),
    ("probe", {"l2": NAN}, "probe: l2 must be a finite number >= 0, got nan"),
    ("spearman", {"confidence": "0.9"}, "spearman: confidence must be in (0, 1), got '0.9'"),
])
def test_bad_parameter_through_inspect_changes_nothing(primed, measure, params, message):
    before = snapshot(primed)
    with pytest.raises(BadParameterError, match=re.escape(message)):
        dbd.inspect(primed, "planted", ["planted"], ["digit"], "snippets", measures=[measure], reuse=False,
                    **{measure: params})
    assert snapshot(primed) == before


def test_bad_parameter_through_sql(primed):
    before = snapshot(primed)
    with pytest.raises(duckdb.Error, match=re.escape("mi: bins must be an integer >= 2, got 2.9")):
        primed.sql("""SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets',
                      measures := ['mi'], params := '{"mi": {"bins": 2.9}}')""").fetchall()
    with pytest.raises(duckdb.Error, match=re.escape("iou: quantile must be in (0, 0.5), got None")):
        primed.sql("""SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets',
                      measures := ['iou'], params := '{"iou": {"quantile": null}}')""").fetchall()
    assert snapshot(primed) == before
    # a good value (a whole float for an integer) still runs
    rows = primed.sql("""SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets',
                         measures := ['mi'], params := '{"mi": {"bins": 4.0}}')""").fetchall()
    assert rows[0][0] > 0
