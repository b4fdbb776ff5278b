"""A hypothesis' version follows the user functions it calls (helpers): an edited helper gives a
new version, so its labels are computed again and no query is served from the cache with the old
labels' scores. Functions of the standard library, installed packages and deepbase_duck are not
followed; recursion and cycles end."""
from __future__ import annotations

import json
import sys
import types
from json import dumps

import numpy as np
import pytest
from conftest import TEXTS

import deepbase_duck as dbd
from deepbase_duck.hypotheses import core
from deepbase_duck.hypotheses.core import Hypothesis, function_inputs, hypothesis

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(c):
    return c.isdigit()


def _brackets(c):
    return c in "()"


helper = _digits                               # what the hypotheses below call, rebound by the tests


def _labels(text):
    return np.array([helper(c) for c in text], float)


def _outer(text):
    return [float(_middle(c)) for c in text]


def _middle(c):
    return _inner(c)


def _inner(c):
    return helper(c)


def _ping(c, n=2):
    return n > 0 and _pong(c, n - 1)


def _pong(c, n):
    return _ping(c, n) if n > 0 else c.isdigit()


def _last(con):
    p, source = con.sql("SELECT params, source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall()[0]
    return json.loads(p), source


def _unit_scores(t):
    return {(r["layer"], r["unit"], r["measure"]): r["score"] for r in t.to_pylist()}


def test_an_edited_helper_gives_a_new_version_and_no_cache_hit(planted, monkeypatch):
    """The hypothesis calls a module-level helper; rebinding it (digits -> brackets) changes the
    version: the next identical query scans again, computes the labels again, and its scores are
    the new helper's (before: source 'cache' with the old scores, and reuse=False kept the old
    labels too)."""
    hypothesis("helped")(_labels)
    before = Hypothesis("x", _labels).version
    first = dbd.inspect(planted, "planted", ["planted"], ["helped"], "snippets")
    monkeypatch.setattr(sys.modules[__name__], "helper", _brackets)
    assert Hypothesis("x", _labels).version != before
    second = dbd.inspect(planted, "planted", ["planted"], ["helped"], "snippets")
    params, source = _last(planted)
    assert source == "model" and params["reused"]["scores_of_query"] is None
    assert params["reused"]["label_pairs_computed"] == len(TEXTS)
    assert _unit_scores(second) != _unit_scores(first)
    # the scores are those of a hypothesis written with the new helper's code from the start
    hypothesis("brackets_direct")(lambda text: np.array([c in "()" for c in text], float))
    ref = dbd.inspect(planted, "planted", ["planted"], ["brackets_direct"], "snippets")
    assert _unit_scores(second) == pytest.approx(_unit_scores(ref), nan_ok=True)
    # reuse=False after another edit: the labels are the newest helper's too
    monkeypatch.setattr(sys.modules[__name__], "helper", _digits)
    third = dbd.inspect(planted, "planted", ["planted"], ["helped"], "snippets", reuse=False)
    assert _unit_scores(third) == pytest.approx(_unit_scores(first), nan_ok=True)
    assert _last(planted)[0]["reused"]["label_pairs_computed"] == len(TEXTS)
    stored = planted.sql("SELECT DISTINCT version FROM labels WHERE hypothesis = 'helped'").fetchall()
    assert stored == [(Hypothesis("x", _labels).version,)] and stored[0][0] == before


def test_helpers_are_followed_through_helpers_and_closures(monkeypatch):
    """Two levels down (outer -> middle -> inner -> helper), through a closed-over function and a
    default argument: an edit of the helper changes the version; the same code gives the same."""
    v = lambda fn: Hypothesis("h", fn).version               # noqa: E731
    deep = v(_outer)

    def make(f):
        return lambda text: [float(f(c)) for c in text]
    closed = v(make(_inner))
    default = v(lambda text, f=_inner: [float(f(c)) for c in text])
    assert v(_outer) == deep and v(make(_inner)) == closed
    monkeypatch.setattr(sys.modules[__name__], "helper", _brackets)
    assert v(_outer) != deep and v(make(_inner)) != closed
    assert v(lambda text, f=_inner: [float(f(c)) for c in text]) != default


def test_helpers_in_a_module_of_functions_made_by_exec_are_followed():
    """A helper without readable source (exec, a REPL) counts by its compiled code."""
    def module(body):
        mod = types.ModuleType("user_mod")
        exec(f"def helper(c):\n    return {body}\n\ndef hyp(text):\n    return [helper(c) for c in text]\n",
             mod.__dict__)                                   # noqa: S102
        return mod
    a, b = module("c.isdigit()"), module("c in '()'")
    assert Hypothesis("h", a.hyp).version == Hypothesis("h", module("c.isdigit()").hyp).version
    assert Hypothesis("h", a.hyp).version != Hypothesis("h", b.hyp).version


def test_cycles_and_depth_end(monkeypatch):
    """Mutual recursion ends (each function once); past HELPER_DEPTH levels a helper counts by its
    name; the text is the same in every computation."""
    depth = core.HELPER_DEPTH
    text = function_inputs(_ping)
    assert text == function_inputs(_ping) and "_pong" in text
    mod = types.ModuleType("chain_mod")
    src = "\n".join(f"def f{i}(c):\n    return f{i + 1}(c)\n" for i in range(depth + 3))
    src += f"\ndef f{depth + 3}(c):\n    return c\n"
    exec(src, mod.__dict__)                                  # noqa: S102
    chain = function_inputs(mod.f0)
    assert f"<function f{depth}>{{" in chain                       # followed: code and inputs
    assert f"<function f{depth + 1}>" in chain and f"<function f{depth + 1}>{{" not in chain


def test_library_functions_are_not_followed():
    """Standard-library, installed-package and deepbase_duck functions count as before (their code
    changes with the installed version): the version text holds no source of theirs."""
    from deepbase_duck.hypotheses.align import align

    def uses(text):
        return [dumps(c) == '"1"' and align is not None and np.isfinite(1.0) for c in text]
    got = function_inputs(uses)
    assert "def dumps" not in got and "def align" not in got and "<function" not in got
    assert function_inputs(_labels).count("<function _digits>") == 1 and "def _digits" in function_inputs(_labels)
