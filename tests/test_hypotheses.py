"""Built-in hypotheses, label normalisation, materialisation and the span alignment rule."""
from __future__ import annotations

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.engine.extract import ensure_symbols
from deepbase_duck.extraction.adapters import Encoded, ModelAdapter
from deepbase_duck.hypotheses import get_hypothesis
from deepbase_duck.errors import HypothesisError
from deepbase_duck.hypotheses.core import Hypothesis, register
from deepbase_duck.hypotheses.library import bracket_depth, char_class, keyword_set, regex_span

from conftest import TEXTS, per_char_labels

CODE = 'def f(x):\n    s = "a(b)"  # note\n    if x:\n        return [x, {1: 2}]\n    return s\n'


def chars_where(h, text):
    lab = per_char_labels(get_hypothesis(h) if isinstance(h, str) else h, text)
    return "".join(c for c, v in zip(text, lab) if v == 1)


def test_in_string_and_in_comment():
    assert chars_where("in_string", CODE) == '"a(b)"'
    assert chars_where("in_comment", CODE) == "# note"
    assert chars_where("in_string", "x = f'hi {y}' + b'z'\n") == "f'hi {y}'b'z'"


def test_indent_level_and_position_in_line():
    lab = per_char_labels(get_hypothesis("indent_level"), CODE)
    lines = CODE.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(l) for l in lines])
    assert [lab[s] for s in starts[:-1]] == [0, 1, 1, 2, 1]
    pos = per_char_labels(get_hypothesis("position_in_line"), "ab\ncde")
    assert pos.tolist() == [0, 1, 2, 0, 1, 2]


def test_bracket_depth():
    lab = per_char_labels(get_hypothesis("bracket_depth"), "a(b[c]d)e")
    assert lab.tolist() == [0, 1, 1, 2, 2, 2, 1, 1, 0]
    curly = bracket_depth("curly_depth", "{}")
    assert per_char_labels(curly, "{a(}").tolist() == [1, 1, 1, 1]


def test_regex_keyword_and_char_class():
    h = regex_span("numbers", r"\d+")
    assert chars_where(h, "a 12 b 345") == "12345"
    k = keyword_set("kw_test", ["if", "return"])
    assert chars_where(k, "if iffy: return x") == "ifreturn"
    assert chars_where(get_hypothesis("python_keyword"), "for x in y: pass") == "forinpass"
    c = char_class("vowels", chars="aeiou")
    assert chars_where(c, "banana split") == "aaai"
    assert chars_where(get_hypothesis("digit"), "a1b22") == "122"
    with pytest.raises(ValueError, match="unknown class 'nope'"):
        char_class("bad", "nope")


def test_normalisation_run_length_and_union():
    h = Hypothesis("t_rle", lambda t: [1, 1, 0, 1, 0, 0], "binary")
    s, e, v = h.spans("abcdef")
    assert list(zip(s.tolist(), e.tolist(), v.tolist())) == [(0, 2, 1.0), (3, 4, 1.0)]
    u = Hypothesis("t_union", lambda t: [(0, 3), (2, 5), (7, 8)], "binary")
    s, e, _ = u.spans("abcdefghij")
    assert list(zip(s.tolist(), e.tolist())) == [(0, 5), (7, 8)]
    c = Hypothesis("t_cont", lambda t: [1.5, 1.5, float("nan"), 2.0], "continuous")
    s, e, v = c.spans("abcd")
    assert list(zip(s.tolist(), e.tolist(), v.tolist())) == [(0, 2, 1.5), (3, 4, 2.0)]


def test_version_follows_the_code():
    a = Hypothesis("v1", lambda t: [0] * len(t))
    b = Hypothesis("v1", lambda t: [1] * len(t))
    assert a.version != b.version


def test_labels_materialised_once_and_reused(planted):
    first = dbd.annotate(planted, ["digit", "in_string"], "snippets")
    assert all(s["labeled"] > 0 and s["reused"] == 0 for s in first)
    n = planted.sql("SELECT count(*) FROM labels").fetchall()[0][0]
    second = dbd.annotate(planted, ["digit", "in_string"], "snippets")
    assert all(s["labeled"] == 0 for s in second)
    assert planted.sql("SELECT count(*) FROM labels").fetchall()[0][0] == n


class PieceAdapter(ModelAdapter):
    """Symbols = pieces of at most 3 characters of each whitespace-separated word."""
    tokenization = "pieces3"

    def __init__(self):
        import torch
        super().__init__(torch.nn.Identity(), "cpu")

    def encode(self, texts):
        import re
        starts, ends, toks = [], [], []
        for t in texts:
            s, e = [], []
            for m in re.finditer(r"\S+", t):
                for a in range(m.start(), m.end(), 3):
                    s.append(a); e.append(min(a + 3, m.end()))
            starts.append(np.asarray(s, np.int32)); ends.append(np.asarray(e, np.int32))
            toks.append([t[a:b] for a, b in zip(s, e)])
        return Encoded(inputs=None, starts=starts, ends=ends, tokens=toks)


def majority(chars: np.ndarray):
    """The documented rule, written independently: majority value, ties to the earliest char."""
    vals, first = {}, {}
    for i, v in enumerate(chars):
        key = None if np.isnan(v) else float(v)
        vals[key] = vals.get(key, 0) + 1
        first.setdefault(key, i)
    best = max(vals.items(), key=lambda kv: (kv[1], -first[kv[0]]))[0]
    return best


def test_span_alignment_rule_against_python(con):
    texts = ["alpha 'quoted text' beta12 (x+y)", "ab'cd ef' 123456 zz", "no labels here"]
    dbd.add_dataset(con, "pieces", texts)
    hyps = [regex_span("quote_rx", r"'[^']*'"), get_hypothesis("digit"), get_hypothesis("bracket_depth"),
            register(Hypothesis("vowel_cat", lambda t: ["v" if c in "aeiou" else ("c" if c.isalpha() else None)
                                                         for c in t], "categorical", categories=("v", "c")))]
    dbd.annotate(con, hyps, "pieces")
    ad = PieceAdapter()
    ensure_symbols(dbd.catalog.session_of(con), ad, "pieces", [0, 1, 2])
    got = {(h, r, p): v for h, r, p, v in con.sql(
        "SELECT * FROM symbol_labels('pieces', 'pieces3', ['quote_rx', 'digit', 'bracket_depth', 'vowel_cat'])"
    ).fetchall()}
    enc = ad.encode(texts)
    n_checked = 0
    for h in hyps:
        for r, text in enumerate(texts):
            lab = per_char_labels(h, text)
            for p, (a, b) in enumerate(zip(enc.starts[r], enc.ends[r])):
                want = majority(lab[a:b])
                assert got[(h.name, r, p)] == want, (h.name, text[a:b], got[(h.name, r, p)], want)
                n_checked += 1
    assert n_checked == 4 * sum(len(s) for s in enc.starts)
    # straddling pieces: "'qu" has 3 chars in the quote span -> 1; "ab'" has 1 of 3 -> 0;
    # "d e"... and a 2:1 split "12," does not occur; tie case "(x" is not a piece here
    pieces = {(r, t): p for r, toks in enumerate(enc.tokens) for p, t in enumerate(toks)}
    assert got[("quote_rx", 0, pieces[(0, "'qu")])] == 1.0
    assert got[("quote_rx", 1, pieces[(1, "ab'")])] == 0.0
    assert got[("quote_rx", 1, pieces[(1, "ef'")])] == 1.0


def test_span_alignment_tie_goes_to_the_earliest_character(con):
    dbd.add_dataset(con, "ties", ["ab12"])
    dbd.annotate(con, ["digit"], "ties")

    class Pairs(PieceAdapter):
        tokenization = "pairs"

        def encode(self, texts):
            return Encoded(None, [np.array([0, 1, 2], np.int32)], [np.array([1, 3, 4], np.int32)], [["a", "b1", "2"]])

    ensure_symbols(dbd.catalog.session_of(con), Pairs(), "ties", [0])
    got = con.sql("SELECT pos, value FROM symbol_labels('ties', 'pairs', ['digit']) ORDER BY pos").fetchall()
    assert got == [(0, 0.0), (1, 0.0), (2, 1.0)]     # "b1": 1:1 tie -> the value of "b"


def test_vectorised_builtins_equal_the_plain_definitions():
    """bracket_depth, position_in_line and char classes are vectorised; check them against
    the character-by-character definitions on random texts (non-ASCII included)."""
    from deepbase_duck.hypotheses.library import _bracket_fn, _char_class_fn, position_in_line_fn
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = "".join(rng.choice(list("()[]{}ab\n éZ7\t"), size=int(rng.integers(0, 50))))
        d, ref = 0, []
        for ch in t:
            if ch in "([{":
                d += 1; ref.append(d)
            elif ch in ")]}":
                ref.append(d); d = max(d - 1, 0)
            else:
                ref.append(d)
        assert _bracket_fn(t, frozenset("([{"), frozenset(")]}")).tolist() == ref
        col, cols = 0, []
        for ch in t:
            cols.append(col); col = 0 if ch == "\n" else col + 1
        assert position_in_line_fn(t).tolist() == cols
        for cls, test in (("space", str.isspace), ("alpha", str.isalpha), ("upper", str.isupper),
                          ("digit", str.isdigit)):
            assert _char_class_fn(t, cls, None).tolist() == [float(test(c)) for c in t]


def test_code_hypotheses_on_a_fragment_that_starts_indented():
    """A record cut from the middle of a class starts indented and dedents below its first
    line; tokenize alone refuses it, the ladder of virtual lines makes it readable."""
    frag = "        return self.x  # done\n\n    @property\n    def y(self):\n        'doc'\n\nz = 1\n"
    assert chars_where("in_comment", frag) == "# done"
    assert chars_where("in_string", frag) == "'doc'"
    lab = per_char_labels(get_hypothesis("indent_level"), frag)
    assert [lab[frag.index(s)] for s in ("return", "@property", "def y", "'doc'", "z = 1")] == [2, 1, 1, 2, 0]


def _vowels(text):
    return [(i, i + 1) for i, c in enumerate(text) if c in "aeiou"]


def test_a_batch_function_labels_blocks_at_once_with_the_labels_of_one_call_per_text(con):
    """annotate and a scan that labels as it goes call a hypothesis' ``batch`` once per chunk or
    block of several records; the labels and the scores equal those of the per-text function."""
    from conftest import TEXTS, planted_adapter
    calls = []

    def many(texts):
        calls.append(len(texts))
        return [_vowels(t) for t in texts]

    batched = Hypothesis("vowel_b", _vowels, "binary", batch=many)
    plain = Hypothesis("vowel_p", _vowels, "binary")
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "a", TEXTS)
    dbd.add_dataset(con, "b", TEXTS)
    dbd.annotate(con, [batched, plain], "a")
    assert calls == [len(TEXTS)]
    spans = lambda h: con.sql("SELECT record_id, start_char, end_char, value FROM labels WHERE "  # noqa: E731
                              f"hypothesis = '{h}' ORDER BY ALL").fetchall()
    assert spans("vowel_b") == spans("vowel_p") and len(spans("vowel_b")) > 20
    calls.clear()
    rows = dbd.inspect(con, "planted", ["planted"], [batched, plain], "b", batch_size=4).to_pylist()
    assert calls == [4] * (len(TEXTS) // 4)           # one call per forward block
    by = {(r["unit"], r["hypothesis"]): r["score"] for r in rows}
    for u in range(5):                                 # equal to float64 rounding (another label column)
        a, b = by[(u, "vowel_b")], by[(u, "vowel_p")]
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-12)
    assert sum(by[(u, "vowel_b")] is not None for u in range(5)) >= 3
    s, e, v = batched.spans_many(["aXe"], ["x:0"])[0]   # a single text: the per-text function
    assert s.tolist() == [0, 2] and e.tolist() == [1, 3] and calls == [4] * (len(TEXTS) // 4)


def test_a_failing_or_miscounting_batch_function_is_named():
    def boom(texts):
        raise ValueError("tagger exploded")
    h = Hypothesis("vowel_boom", _vowels, "binary", batch=boom)
    with pytest.raises(HypothesisError, match=r"hypothesis 'vowel_boom' raised ValueError on one of the records "
                                              r"d:3 \.\.\. d:4: tagger exploded"):
        h.spans_many(["ab", "cd"], ["d:3", "d:4"])
    short = Hypothesis("vowel_short", _vowels, "binary", batch=lambda texts: [_vowels(texts[0])])
    with pytest.raises(HypothesisError, match=r"'vowel_short': its batch function returned 1 results for 2 texts"):
        short.spans_many(["ab", "cd"], ["d:3", "d:4"])
    bad = Hypothesis("vowel_bad", _vowels, "binary", batch=lambda texts: [[(0, 9)] for _ in texts])
    with pytest.raises(HypothesisError, match=r"vowel_bad.*record d:3"):
        bad.spans_many(["ab", "cd"], ["d:3", "d:4"])


def test_the_decorator_takes_a_batch_function():
    from deepbase_duck.hypotheses.core import hypothesis
    seen = []

    def many(texts):
        seen.append(list(texts))
        return [_vowels(t) for t in texts]

    @hypothesis("vowel_dec", batch=many)
    def vowel_dec(text):
        return _vowels(text)

    h = get_hypothesis("vowel_dec")
    got = h.spans_many(["abc", "xyz", "ele"], ["d:0", "d:1", "d:2"])
    assert seen == [["abc", "xyz", "ele"]]
    assert [g[0].tolist() for g in got] == [[0], [], [0, 2]] and [g[1].tolist() for g in got] == [[1], [], [1, 3]]


THRESHOLD = 2


def _deep(t):
    return [float(t[:i].count("(") - t[:i].count(")") > THRESHOLD) for i in range(len(t))]


def test_version_follows_the_values_the_function_reads():
    """Same source, other data: a closed-over value, a default argument or a module constant the
    function reads gives another version (stored labels are not reused); the same values give the
    same version, and an object it reads counts by its type (its repr's address does not leak)."""
    global THRESHOLD

    def make(ch):
        return Hypothesis("is_char", lambda t: [c == ch for c in t])
    assert make("a").version != make("b").version and make("a").version == make("a").version
    f = lambda t, k=1: [k] * len(t)            # noqa: E731
    g = lambda t, k=2: [k] * len(t)            # noqa: E731
    assert Hypothesis("d", f).version != Hypothesis("d", g).version
    before = Hypothesis("deep", _deep).version
    THRESHOLD = 3
    try:
        assert Hypothesis("deep", _deep).version != before
    finally:
        THRESHOLD = 2
    assert Hypothesis("deep", _deep).version == before

    def with_object(obj):
        return Hypothesis("obj", lambda t: [obj is not None] * len(t))
    assert with_object(object()).version == with_object(object()).version
    import numpy as np
    arr = lambda a: Hypothesis("arr", lambda t: [float(a[0])] * len(t))   # noqa: E731
    assert arr(np.zeros(3)).version == arr(np.zeros(3)).version != arr(np.ones(3)).version


MARKERS = ["(", ")"]                       # a module list a hypothesis reads, changed after registration


def test_version_follows_a_module_list_changed_after_registration(planted):
    """The version is the function's and its values' as they are when a query reads it: after
    MARKERS.append(...) the same registered hypothesis has another version, so the next query
    labels again instead of serving the old labels; a version given stays as given."""
    @dbd.hypothesis("markers")
    def markers(text):
        return [(i, i + 1) for i, c in enumerate(text) if c in MARKERS]
    h, fixed = get_hypothesis("markers"), Hypothesis("markers_fixed", markers, version="v1")
    stored = lambda: planted.sql("SELECT sum(end_char - start_char) FROM labels "     # noqa: E731
                                 "WHERE hypothesis = 'markers'").fetchall()[0][0]
    want = lambda: sum(sum(c in MARKERS for c in t) for t in TEXTS)   # noqa: E731
    dbd.inspect(planted, "planted", ["planted"], ["markers"], "snippets")
    before, stored_before = h.version, stored()
    assert stored_before == want()
    MARKERS.append("[")
    try:
        assert h.version != before and fixed.version == "v1"
        dbd.inspect(planted, "planted", ["planted"], ["markers"], "snippets")
        assert stored() == want() > stored_before
        assert planted.sql("SELECT DISTINCT version FROM labels WHERE hypothesis = 'markers'").fetchall() \
            == [(h.version,)]
        assert planted.sql("SELECT source FROM queries ORDER BY query_id DESC LIMIT 1").fetchall() != [("cache",)]
    finally:
        MARKERS.remove("[")
    assert h.version == before


def test_version_without_source_follows_the_compiled_code(planted):
    """A function whose source cannot be read (exec, python -c, a plain REPL) is versioned by its
    compiled code: another body gives another version, and its labels are computed again."""
    def define(body, extra=""):
        ns = {}
        exec(f"{extra}def first(text):\n    return {body}\n", ns)       # noqa: S102
        return Hypothesis("first", ns["first"])
    a, b = define("[(0, 1)]"), define("[(0, len(text))]")
    assert a.version != b.version
    assert define("[(0, 1)]").version == a.version                    # the same code: the same version
    assert define("[(0, 1)]", "\n\n").version == a.version            # lines moved: the same code
    assert define("[(0, 2)]").version != a.version                    # a constant of the body
    assert define("[(1, n) for n in (2, 3)]").version != define("[(1, n) for n in (2, 4)]").version  # nested code
    dbd.inspect(planted, "planted", ["planted"], [a], "snippets")
    dbd.inspect(planted, "planted", ["planted"], [b], "snippets")
    ends = planted.sql("SELECT record_id, end_char FROM labels WHERE hypothesis = 'first' ORDER BY 1").fetchall()
    assert ends == [(r, len(t)) for r, t in enumerate(TEXTS)]


def test_version_reads_are_cheap_and_held_for_a_query(monkeypatch):
    """The source is read once per function; within held_versions (a query) the version is
    computed once and kept, outside it follows every change."""
    from deepbase_duck.hypotheses import core
    words = ["a"]
    h = Hypothesis("cheap", lambda t: [c in words for c in t])
    first = h.version
    calls = []
    real = core.inspect.getsource
    monkeypatch.setattr(core.inspect, "getsource", lambda fn: calls.append(fn) or real(fn))
    assert h.version == first and calls == []
    with core.held_versions():
        held = h.version
        words.append("b")
        assert h.version == held == first
        with core.held_versions():
            assert h.version == held
    assert h.version != first and calls == []


@pytest.mark.parametrize("text, strings, comments", [
    ("x = 1\x0c\ny = 'abc'\n", ["'abc'"], []),                       # a form feed: not a line end for tokenize
    ("x = 1  # a\x0bb\ny = 'abc'\n", ["'abc'"], ["# a\x0bb"]),
    ("s = 'a'\u2028\nt = 'bc'  # hi\n", ["'a'", "'bc'"], ["# hi"]),
    ("\t\tx = 1\n\ty = 'a'  # c\n", ["'a'"], ["# c"]),               # a fragment indented with tabs
    ("        x = 1\n    y = 'a'  # c\n", ["'a'"], ["# c"]),
])
def test_code_hypotheses_count_lines_as_tokenize_does(text, strings, comments):
    from deepbase_duck.corpora.code import statement_chunks
    got = {}
    for name in ("in_string", "in_comment"):
        s, e, _ = get_hypothesis(name).spans(text)
        got[name] = [text[a:b] for a, b in zip(s, e)]
    assert got == {"in_string": strings, "in_comment": comments}
    t = "x = 1\x0c\ny = 2\nz = (3,\n     4)\nw = 5\n"
    assert [off for off, _ in statement_chunks(t, 20)] == [0, 13, 29]    # never inside z = (3, 4)


class _Letters:
    """A callable hypothesis object whose state (the letters) decides its labels."""

    def __init__(self, letters):
        self.letters = tuple(letters)

    def __call__(self, text):
        return [(i, i + 1) for i, ch in enumerate(text) if ch in self.letters]


def test_a_callable_objects_state_is_part_of_its_version(con):
    a, d = Hypothesis("letters", _Letters("a")), Hypothesis("letters", _Letters("d"))
    assert a.version != d.version and a.version == Hypothesis("letters", _Letters("a")).version
    register(a)
    dbd.add_dataset(con, "t", ["abcd", "dada"])
    dbd.annotate(con, ["letters"], "t")
    register(d)
    dbd.annotate(con, ["letters"], "t")                              # relabelled: the 'd's now
    got = con.sql("SELECT record_id, start_char FROM labels WHERE hypothesis = 'letters' AND value <> 0 "
                  "ORDER BY 1, 2").fetchall()
    assert got == [(0, 3), (1, 0), (1, 2)]
