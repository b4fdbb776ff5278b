"""Hunt 17 of hypotheses and label alignment: whole words next to combining marks, a version
given by hand kept over a change of kind or categories, span bounds that are booleans, and the
numpy alignment against a brute-force reading of its rule."""
from __future__ import annotations

import unicodedata

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import HypothesisError
from deepbase_duck.hypotheses import Hypothesis, get_hypothesis, register
from deepbase_duck.hypotheses.align import align
from deepbase_duck.hypotheses.library import keyword_set


def labelled(h, text):
    s, e, _ = h.spans(text)
    return [text[a:b] for a, b in zip(s.tolist(), e.tolist())], list(zip(s.tolist(), e.tolist()))


# -- 1. whole words end where a word ends, not before a combining mark -----------------------------
FRENCH = ["Il a mangé à Paris, là où il a vécu.", "Ça a été déjà vu à la télé, à côté de là.",
          "Où est-il allé ? Il a dû aller à Orléans ou à Nîmes."]


def test_a_whole_word_does_not_end_before_a_combining_mark():
    """``(?!\\w)`` took a combining mark for the end of a word: the Hindi word "par" (on) was found
    inside "pari" (fairy), whose vowel sign U+0940 is a mark (Mc), and "a" inside a decomposed
    "à" (a + U+0300)."""
    hindi = "वह परी पर बैठी"                         # she sat on the fairy
    assert unicodedata.category(hindi[5]) == "Mc"
    assert labelled(keyword_set("par_h17", ["पर"]), hindi) == (["पर"], [(7, 9)])
    # decomposed French text labels the same words as composed: a reference where every letter is
    # one character, which the old lookarounds read right
    h = keyword_set("fr_words_h17", ["a", "la", "il", "ou", "de", "est"])
    for text in FRENCH:
        nfc, nfd = unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)
        assert nfd != nfc
        # each NFD character's NFC position: a mark belongs to the letter before it
        to_nfc = np.cumsum([unicodedata.combining(c) == 0 for c in nfd]) - 1
        want = labelled(h, nfc)[1]
        got = [(int(to_nfc[a]), int(to_nfc[b - 1]) + 1) for a, b in labelled(h, nfd)[1]]
        assert got == want, (text, got, want)
        assert labelled(h, nfd)[0] == [nfc[a:b] for a, b in want]


def test_python_keyword_is_not_found_inside_an_identifier_with_a_mark():
    """``if\\u0301`` is an identifier to Python's compiler (ast names it), not the keyword "if"
    followed by a stray accent; the keyword on the next line is still found."""
    import ast
    code = "if\u0301 = 1\nx = e\u0301if\u0301\nif x: pass\n"
    names = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
    assert unicodedata.normalize("NFKC", "if\u0301") in names
    words, spans = labelled(get_hypothesis("python_keyword"), code)
    line = code.index("\nif x") + 1
    assert words == ["if", "pass"] and spans == [(line, line + 2), (line + 6, line + 10)]


def test_python_keyword_equals_tokenize_on_stdlib_sources():
    """python_keyword outside strings and comments is exactly tokenize's NAME tokens that are
    keywords, on real code (files of the standard library)."""
    import io
    import keyword
    import pathlib
    import sysconfig
    import tokenize
    h = get_hypothesis("python_keyword")
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:25]
    assert len(files) == 25
    keywords = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        starts = np.r_[0, np.cumsum([len(l) + 1 for l in text.split("\n")])]    # tokenize's rows
        want, lit = np.zeros(len(text), bool), np.zeros(len(text), bool)
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            a, b = starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1]
            if t.type == tokenize.NAME and keyword.iskeyword(t.string):
                want[a:b] = True
            elif t.type in (tokenize.STRING, tokenize.COMMENT):
                lit[a:b] = True
        got = np.zeros(len(text), bool)
        for a, b in labelled(h, text)[1]:
            got[a:b] = True
        assert np.array_equal(got[~lit], want[~lit]), f.name
        keywords += int(want.sum())
    assert keywords > 10_000


# -- 2. a version given by hand does not carry labels over a change of meaning --------------------
def test_a_given_version_with_other_categories_is_refused_not_read_anew(con):
    """With ``version="1"`` kept, reordering the categories reused the stored codes: every 'a'
    was read as 'b'; a categorical hypothesis made binary read its codes as 0/1."""
    dbd.add_dataset(con, "d", ["ab", "ba"])
    register(Hypothesis("cat_h17", lambda t: list(t), "categorical", categories=("a", "b"), version="1"))
    assert dbd.annotate(con, ["cat_h17"], "d")[0]["labeled"] == 2
    register(Hypothesis("cat_h17", lambda t: list(t), "categorical", categories=("b", "a"), version="1"))
    with pytest.raises(HypothesisError, match=r"cat_h17.*version '1'.*\['a', 'b'\].*\['b', 'a'\].*new version"):
        dbd.annotate(con, ["cat_h17"], "d")
    register(Hypothesis("cat_h17", lambda t: [c == "a" for c in t], "binary", version="1"))
    with pytest.raises(HypothesisError, match="cat_h17.*computed as categorical.*now binary"):
        dbd.annotate(con, ["cat_h17"], "d")
    # the stored labels and the catalog are as they were
    assert con.sql("SELECT kind, version, categories FROM hypotheses WHERE name = 'cat_h17'").fetchall() == \
        [("categorical", "1", ["a", "b"])]
    # a new version labels again, with the new meaning
    register(Hypothesis("cat_h17", lambda t: list(t), "categorical", categories=("b", "a"), version="2"))
    assert dbd.annotate(con, ["cat_h17"], "d")[0]["labeled"] == 2
    rows = con.sql("SELECT record_id, start_char, value FROM labels WHERE hypothesis = 'cat_h17' "
                   "ORDER BY ALL").fetchall()
    assert rows == [(0, 0, 1.0), (0, 1, 0.0), (1, 0, 0.0), (1, 1, 1.0)]      # 'a' is code 1 now


def test_a_given_version_with_new_categories_and_nothing_stored_is_taken(con):
    """The check refuses only what stored labels would misread: a store without labels of that
    version takes the new categories (a description edited alone never counts)."""
    dbd.add_dataset(con, "d", ["ab"])
    register(Hypothesis("cat2_h17", lambda t: list(t), "categorical", categories=("a", "b"), version="1"))
    con.sql("SELECT 1").fetchall()
    from deepbase_duck.hypotheses.store import upsert_catalog
    upsert_catalog(con, get_hypothesis("cat2_h17"))           # a catalog row, no labels
    register(Hypothesis("cat2_h17", lambda t: list(t), "categorical", categories=("a", "b", "c"), version="1"))
    assert dbd.annotate(con, ["cat2_h17"], "d")[0]["labeled"] == 1
    register(Hypothesis("cat2_h17", lambda t: list(t), "categorical", categories=("a", "b", "c"), version="1",
                        description="edited"))
    assert dbd.annotate(con, ["cat2_h17"], "d")[0]["reused"] == 1


# -- 3. span bounds must be integers, not booleans -------------------------------------------------
def test_boolean_span_bounds_are_refused_by_name():
    """``(True, 3)`` passed as the span (1, 3): a bool is an int to isinstance."""
    h = Hypothesis("bool_h17", lambda t: [(t.startswith("x"), 3)])
    with pytest.raises(HypothesisError, match=r"'bool_h17' on record d:4.*integers.*\(True, 3\)"):
        h.spans("xyz", "d:4")
    h = Hypothesis("npbool_h17", lambda t: [(0, np.bool_(True))])
    with pytest.raises(HypothesisError, match="'npbool_h17' on record d:5.*integers"):
        h.spans("xyz", "d:5")


def test_a_reversed_span_is_named_as_reversed():
    """``(2, 1)`` inside a text of 3 characters was said to be "outside the text [0, 3)"."""
    h = Hypothesis("rev_h17", lambda t: [(0, 1), (2, 1)])
    with pytest.raises(HypothesisError, match=r"'rev_h17' on record d:6: span \(2, 1\) ends before it starts"):
        h.spans("xyz", "d:6")


def test_text_values_are_refused_by_name():
    """numpy reads "1" and "0.5" as numbers: ``list(text)`` passed as a binary hypothesis' values on
    a text of digits, and a span's value "1.5" as 1.5."""
    h = Hypothesis("chars_h17", lambda t: list(t))
    with pytest.raises(HypothesisError,
                       match=r"'chars_h17' on record d:1: values are not numbers: binary value '0' at character 0"):
        h.spans("0110", "d:1")
    h = Hypothesis("textval_h17", lambda t: [(0, 2, 0.5), (2, 3, "1.5")], "continuous")
    with pytest.raises(HypothesisError,
                       match=r"'textval_h17' on record d:2: .*continuous value '1.5' at span \(2, 3\)"):
        h.spans("abc", "d:2")
    # numbers, None (no label) and numpy values are taken as before
    h = Hypothesis("num_h17", lambda t: [1.5, None, np.float32(2), 2], "continuous")
    s, e, v = h.spans("abcd")
    assert s.tolist() == [0, 2] and e.tolist() == [1, 4] and v.tolist() == [1.5, 2.0]


def test_categories_given_as_one_string_are_refused():
    """``categories="ab"`` declared the categories 'a' and 'b' (its letters), and "NOUN" failed
    with "categories repeat"."""
    from deepbase_duck.hypotheses import hypothesis
    from deepbase_duck.hypotheses.spacy_pos import spacy_tags
    with pytest.raises(HypothesisError, match=r"'str_h17': categories must be a list.*'ab'"):
        Hypothesis("str_h17", len, "categorical", categories="ab")
    with pytest.raises(HypothesisError, match=r"'dec_h17': categories must be a list.*'NOUN'"):
        hypothesis("dec_h17", "categorical", categories="NOUN")(len)
    with pytest.raises(HypothesisError, match=r"'tags_h17': categories must be a list.*'NOUN'"):
        spacy_tags("tags_h17", categories="NOUN")
    with pytest.raises(HypothesisError, match=r"categories repeat \('a'\)"):
        Hypothesis("rep_h17", len, "categorical", categories=["a", "b", "a"])
    assert hypothesis("ok_h17", "categorical", categories=["ab"])(len) is len
    assert get_hypothesis("ok_h17").categories == ("ab",)


# -- 4. the numpy alignment against a brute-force reading of the rule ------------------------------
def brute_align(n_symbols, sym_starts, sym_ends, spans, binary):
    """The rule of sql/10_alignment.sql, character by character: each character's value (its
    span's, else the default), then the value most characters of the symbol hold, a tie going to
    the value of the earliest tied character; a symbol without characters: no label."""
    out, k = [], 0
    for r, n in enumerate(n_symbols):
        for _ in range(n):
            a, b = sym_starts[k], sym_ends[k]
            k += 1
            vals = []
            for c in range(a, b):
                held = [v for (rr, s, e, v) in spans if rr == r and s <= c < e]
                vals.append(held[0] if held else (0.0 if binary else None))
            if not vals:
                out.append(np.nan)
                continue
            best = max(dict.fromkeys(vals), key=lambda v: (vals.count(v), -vals.index(v)))
            out.append(np.nan if best is None else best)
    return np.array(out, float)


@pytest.mark.parametrize("binary", [True, False])
def test_align_equals_a_brute_force_majority_vote(binary):
    rng = np.random.default_rng(17 + binary)
    for _ in range(300):
        n_rec = int(rng.integers(0, 5))
        lengths = rng.integers(0, 14, n_rec)
        n_symbols = rng.integers(0, 6, n_rec)
        starts, ends, spans = [], [], []
        for r in range(n_rec):
            for _ in range(n_symbols[r]):             # any symbols: overlapping, empty, past the text
                a = int(rng.integers(0, lengths[r] + 3))
                starts.append(a); ends.append(a + int(rng.integers(0, 5)))
            cuts = np.sort(rng.choice(lengths[r] + 1, min(lengths[r] + 1, int(rng.integers(0, 7))), replace=False))
            for a, b in zip(cuts[::2], cuts[1::2]):
                spans.append((r, int(a), int(b), 1.0 if binary else float(rng.integers(0, 3))))
        sr, ss, se, sv = (np.array([s[i] for s in spans], float if i == 3 else np.int64) for i in range(4))
        got = align(n_symbols, np.array(starts, np.int64), np.array(ends, np.int64), sr, ss, se, sv, binary)
        want = brute_align(n_symbols.tolist(), starts, ends, spans, binary)
        assert np.array_equal(got, want, equal_nan=True), (n_symbols, starts, ends, spans)


# -- 5. a grid's area averaging against supersampling ---------------------------------------------
def test_area_resize_equals_the_mean_of_a_supersampled_mask():
    """Each cell of a G x G grid over an H x W mask is the mean of the mask repeated G times along
    each axis (every pixel split into G x G equal parts), cut into G x G blocks of H x W parts."""
    from deepbase_duck.hypotheses.grid import area_resize
    rng = np.random.default_rng(17)
    for _ in range(200):
        h, w, g = (int(x) for x in rng.integers(1, 20, 2).tolist() + [rng.integers(1, 12)])
        m = rng.random((h, w))
        ref = np.repeat(np.repeat(m, g, 0), g, 1).reshape(g, h, g, w).mean(axis=(1, 3))
        np.testing.assert_allclose(area_resize(m, g, g), ref, rtol=1e-12, atol=1e-12)
