"""Fixes from a bug hunt over hypotheses (versions, what a function may return, the catalog row
of an edited hypothesis, annotate) and the file corpora: each test fails on the code before the fix."""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import deepbase_duck as dbd
from deepbase_duck.engine.extract import ensure_symbols
from deepbase_duck.errors import HypothesisError
from deepbase_duck.extraction.adapters import Encoded, ModelAdapter
from deepbase_duck.hypotheses import core, get_hypothesis
from deepbase_duck.hypotheses import store as hstore
from deepbase_duck.hypotheses.core import Hypothesis, register
from deepbase_duck.hypotheses.grid import GridHypothesis

from conftest import per_char_labels

TEXTS = ["ab 12 cd", "x9y", "no digits", "7 77 777", "e\u0301 \U0001F600 5"]


class CharSymbols(ModelAdapter):
    """One symbol per character (symbols only: no model runs)."""
    tokenization = "hunt15-chars"

    def __init__(self):
        super().__init__(torch.nn.Identity(), "cpu")

    def encode(self, texts):
        return Encoded(inputs=None, starts=[np.arange(len(t), dtype=np.int32) for t in texts],
                       ends=[np.arange(1, len(t) + 1, dtype=np.int32) for t in texts], tokens=[list(t) for t in texts])


def sql_labels(con, name):
    """Per-character labels of ``name`` as the SQL macro symbol_labels reads them (catalog version)."""
    rows = con.execute("SELECT record_id, pos, value FROM symbol_labels('d', 'hunt15-chars', [?])", [name]).fetchall()
    out = [np.full(len(t), np.nan) for t in TEXTS]
    for r, p, v in rows:
        out[r][p] = np.nan if v is None else v
    return out


# -- 1. an edited hypothesis that fails leaves the catalog naming the labels the store holds ---------
def test_a_failed_edit_keeps_the_catalog_on_the_stored_version(con):
    """The catalog row moved to the new version before any of its labels were stored: after an
    edit that raised, symbol_labels (which joins the catalog's version) read every character as 0
    though the old labels were intact, and a process without the code could not use them."""
    dbd.add_dataset(con, "d", TEXTS)
    ensure_symbols(dbd.catalog.session_of(con), CharSymbols(), "d", list(range(len(TEXTS))))
    old = register(Hypothesis("digits_h15", lambda t: [c.isdigit() for c in t], "binary"))
    dbd.annotate(con, ["digits_h15"], "d")
    want = [per_char_labels(old, t) for t in TEXTS]
    for got, w in zip(sql_labels(con, "digits_h15"), want):
        np.testing.assert_array_equal(got, w)

    def broken(text):
        raise ValueError("bug in the edit")
    register(Hypothesis("digits_h15", broken, "binary"))
    with pytest.raises(HypothesisError, match="bug in the edit"):
        dbd.annotate(con, ["digits_h15"], "d")
    assert con.sql("SELECT version FROM hypotheses WHERE name = 'digits_h15'").fetchall() == [(old.version,)]
    for got, w in zip(sql_labels(con, "digits_h15"), want):
        np.testing.assert_array_equal(got, w)                   # not 0 everywhere
    # a process without the hypothesis' code uses the stored labels
    core._REGISTRY.pop("digits_h15")
    assert dbd.annotate(con, ["digits_h15"], "d") == [{"hypothesis": "digits_h15", "labeled": 0, "reused": len(TEXTS)}]
    # a new version that stores labels moves the row with them, in the same transaction
    new = register(Hypothesis("digits_h15", lambda t: [c.isdigit() or c == "x" for c in t], "binary"))
    dbd.annotate(con, ["digits_h15"], "d", record_ids=[1])
    assert con.sql("SELECT version FROM hypotheses WHERE name = 'digits_h15'").fetchall() == [(new.version,)]
    assert con.sql("SELECT DISTINCT version FROM labeled_records WHERE hypothesis = 'digits_h15'").fetchall() \
        == [(new.version,)]
    np.testing.assert_array_equal(sql_labels(con, "digits_h15")[1], [1, 1, 0])


# -- 2. annotate looks for other versions once per call, not once per chunk -------------------------
def test_annotate_checks_for_other_versions_once_per_call(con, monkeypatch):
    dbd.add_dataset(con, "d", TEXTS * 3)
    old = register(Hypothesis("vowels_h15", lambda t: [c in "aeiou" for c in t], "binary"))
    dbd.annotate(con, ["vowels_h15", "digit"], "d", record_ids=[0])
    new = register(Hypothesis("vowels_h15", lambda t: [c in "aeiouy" for c in t], "binary"))
    assert new.version != old.version
    monkeypatch.setattr(hstore, "CHUNK", 4)                       # 15 records: 4 chunks
    real, checks = hstore.store.q_one, []

    def counting(con_, sql, params=None):
        if "version <>" in sql:
            checks.append(params[0])
        return real(con_, sql, params)
    monkeypatch.setattr(hstore.store, "q_one", counting)
    dbd.annotate(con, ["vowels_h15", "digit"], "d")
    assert sorted(checks) == ["digit", "vowels_h15"]              # 8 before (2 per chunk)
    assert con.sql("SELECT version, count(*) FROM labeled_records WHERE hypothesis = 'vowels_h15' GROUP BY 1"
                   ).fetchall() == [(new.version, 15)]
    got = con.sql("SELECT record_id, start_char, end_char FROM labels WHERE hypothesis = 'vowels_h15' "
                  "ORDER BY ALL").fetchall()
    texts = TEXTS * 3
    want = sorted((r, int(a), int(b)) for r, t in enumerate(texts) for a, b in zip(*new.spans(t)[:2]))
    assert got == want


# -- 3. annotate takes a name given twice once -------------------------------------------------------
def test_annotate_takes_a_repeated_hypothesis_once(con):
    """A repeated name stored its labels twice and failed on labeled_records' key (DuckDB's
    ConstraintException), as inspect does not."""
    dbd.add_dataset(con, "d", TEXTS)
    got = dbd.annotate(con, ["digit", "digit", get_hypothesis("digit")], "d")
    assert got == [{"hypothesis": "digit", "labeled": len(TEXTS), "reused": 0}]
    assert con.sql("SELECT count(*) FROM labeled_records WHERE hypothesis = 'digit'").fetchall() == [(len(TEXTS),)]


# -- 4. a version given as a number -------------------------------------------------------------------
def test_a_version_given_as_a_number_is_its_text(con):
    """``version=2`` failed deep in pyarrow ('Expected bytes, got a 'int' object')."""
    dbd.add_dataset(con, "d", TEXTS)
    h = register(Hypothesis("numbered_h15", lambda t: [c.isdigit() for c in t], version=2))
    assert h.version == "2"
    assert dbd.annotate(con, ["numbered_h15"], "d")[0]["labeled"] == len(TEXTS)
    assert con.sql("SELECT version FROM hypotheses WHERE name = 'numbered_h15'").fetchall() == [("2",)]
    assert dbd.annotate(con, ["numbered_h15"], "d")[0]["reused"] == len(TEXTS)


# -- 5. versions follow what a bound method, a partial, a batch function and a cached function read ----
class Threshold:
    def __init__(self, limit):
        self.limit = limit

    def label(self, text):
        return [float(ord(c) > self.limit) for c in text]


def test_a_bound_methods_object_is_part_of_its_version(con):
    """A bound method's version ignored its object: after ``tagger.limit = ...`` the old labels were
    reused (a callable object's state already counted)."""
    tagger = Threshold(100)
    h = register(Hypothesis("above_h15", tagger.label))
    v1 = h.version
    assert v1 == h.version == Hypothesis("above_h15", Threshold(100).label).version    # stable
    dbd.add_dataset(con, "d", ["abz{", "~a"])
    dbd.annotate(con, ["above_h15"], "d")
    tagger.limit = 120
    assert h.version != v1
    assert dbd.annotate(con, ["above_h15"], "d")[0]["labeled"] == 2
    got = con.sql("SELECT record_id, start_char FROM labels WHERE hypothesis = 'above_h15' ORDER BY ALL").fetchall()
    assert got == [(0, 2), (1, 0)]                                # 'z{' and '~' are above 120: 'z{' one span


def rule_digit(c):
    return c.isdigit()


def rule_upper(c):
    return c.isupper()


def apply_rule(text, rule):
    return [rule(c) for c in text]


def test_a_partials_function_arguments_are_part_of_its_version():
    """``partial(apply_rule, rule=f)`` counted f by its type alone: two rules, one version."""
    a = Hypothesis("rule_h15", functools.partial(apply_rule, rule=rule_digit))
    b = Hypothesis("rule_h15", functools.partial(apply_rule, rule=rule_upper))
    assert a.version != b.version
    assert a.version == Hypothesis("rule_h15", functools.partial(apply_rule, rule=rule_digit)).version
    assert Hypothesis("rule_h15", functools.partial(apply_rule, rule_digit)).version != \
        Hypothesis("rule_h15", functools.partial(apply_rule, rule_upper)).version


def single(text):
    return [c.isdigit() for c in text]


def many_v1(texts):
    return [single(t) for t in texts]


def many_v2(texts):                       # an edited batch function (here: a bug fixed)
    return [[c.isdigit() for c in t] for t in texts]


def test_a_user_batch_function_is_part_of_the_version():
    """Blocks are labelled by the batch function: editing it left the version as it was."""
    a = Hypothesis("batched_h15", single, batch=many_v1)
    b = Hypothesis("batched_h15", single, batch=many_v2)
    assert a.version != b.version and a.version == Hypothesis("batched_h15", single, batch=many_v1).version
    # deepbase_duck's own batch functions (spaCy's nlp.pipe) leave the built-ins' versions as they were
    upos = get_hypothesis("upos")
    assert upos.version == Hypothesis("upos", upos.fn, "categorical", categories=upos.categories).version


LIMIT_H15 = 100


@functools.lru_cache(maxsize=64)
def cached_above(text):
    return tuple(float(ord(c) > LIMIT_H15) for c in text)


def test_a_cached_functions_inputs_are_part_of_its_version(monkeypatch):
    """``functools.lru_cache`` makes a C object: the constants its function reads were not followed."""
    h = Hypothesis("cached_h15", cached_above)
    v1 = h.version
    monkeypatch.setattr(__import__(__name__), "LIMIT_H15", 120)
    assert h.version != v1


# -- 6. what a function may return: generators that raise, torch tensors, masks as lists ----------------
def test_a_generator_that_raises_is_named():
    """A generator's error surfaced while its spans were read, as a bare KeyError."""
    def spans(text):
        for i, c in enumerate(text):
            if c == "x":
                raise KeyError("unexpected x")
            if c.isdigit():
                yield i, i + 1
    h = Hypothesis("gen_h15", spans)
    np.testing.assert_array_equal(h.spans("a1")[0], [1])
    with pytest.raises(HypothesisError, match=r"hypothesis 'gen_h15' raised KeyError on record d:7: 'unexpected x'"):
        h.spans("ax1", "d:7")
    batched = Hypothesis("gen_batch_h15", spans, batch=lambda texts: [spans(t) for t in texts])
    with pytest.raises(HypothesisError, match=r"raised KeyError on record d:1"):
        batched.spans_many(["a1", "x"], ["d:0", "d:1"])


def test_torch_tensors_are_read_as_their_numpy_arrays(con):
    text = "a1b22 x"
    want = per_char_labels(Hypothesis("np", lambda t: np.array([float(c.isdigit()) for c in t]), "continuous"), text)
    grad = Hypothesis("grad_h15", lambda t: torch.tensor([float(c.isdigit()) for c in t], requires_grad=True),
                      "continuous")                   # RuntimeError "Can't call numpy() ..." before
    np.testing.assert_array_equal(per_char_labels(grad, text), want)
    booleans = Hypothesis("bool_h15", lambda t: torch.tensor([c.isdigit() for c in t]))
    np.testing.assert_array_equal(per_char_labels(booleans, text), want)
    # a (k, 2) tensor of spans: the same message as a numpy array's (it read "2 per-character values")
    pairs = Hypothesis("pairs_h15", lambda t: torch.tensor([[1, 2], [3, 5]]))
    with pytest.raises(HypothesisError, match=r"returned an array of shape \(2, 2\); expected \(7,\)"):
        pairs.spans(text)
    # stored and read back: what the function returns
    register(grad)
    dbd.add_dataset(con, "d", [text])
    dbd.annotate(con, ["grad_h15"], "d")
    s, e, v = (np.array(c) for c in zip(*con.sql("SELECT start_char, end_char, value FROM labels WHERE "
                                                 "hypothesis = 'grad_h15' ORDER BY start_char").fetchall()))
    back = np.full(len(text), np.nan)
    for a, b, x in zip(s, e, v):
        back[a:b] = x
    np.testing.assert_array_equal(back, want)


def test_grid_masks_as_tensors_or_lists_of_rows_equal_numpy_masks():
    """A torch (G, G) or image-sized mask read as G 'per-character values'; a list of rows as
    spans ('span (1.0, 1.0, ...) is not (start, end)')."""
    rng = np.random.default_rng(0)
    mask = rng.random((13, 11)) < 0.5
    cells = rng.random((4, 4)) < 0.5
    ref = GridHypothesis("ref", lambda t: mask, "binary", grid=4).spans("x")
    ref_cells = GridHypothesis("ref", lambda t: cells, "binary", grid=4).spans("x")
    for out, want in [(torch.from_numpy(mask), ref), (mask.tolist(), ref), (torch.from_numpy(cells), ref_cells),
                      (cells.astype(int).tolist(), ref_cells)]:
        got = GridHypothesis("g_h15", lambda t, o=out: o, "binary", grid=4).spans("x")
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


# -- 7. file corpora: a missing source, a categorical or string-view text column ----------------------
def test_a_missing_source_is_the_row_and_typed_text_columns_are_text(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text('text,id\n"a",\n"b",2\n', encoding="utf-8")
    got = dbd.read_records(f, source_column="id")
    assert [(r["text"], r["source"]) for r in got] == [("a", "s.csv:row 1"), ("b", "2")]     # None before
    pq.write_table(pa.table({"text": pa.array(["x", "y", "x"]).dictionary_encode(),
                             "src": pa.array([None, "k", None], pa.string())}), tmp_path / "cat.parquet")
    got = dbd.read_records(tmp_path / "cat.parquet", source_column="src")    # a pandas category column
    assert [(r["text"], r["source"]) for r in got] == [("x", "cat.parquet:row 1"), ("y", "k"),
                                                       ("x", "cat.parquet:row 3")]
    if hasattr(pa, "string_view"):
        pq.write_table(pa.table({"text": pa.array(["p", "q"], pa.string_view())}), tmp_path / "view.parquet")
        assert [r["text"] for r in dbd.read_records(tmp_path / "view.parquet")] == ["p", "q"]


# -- 8. factories refuse settings that could only fail on every record ---------------------------------
def test_factories_refuse_an_empty_character_set_and_a_missing_group():
    """char_class(chars='') and regex_span(group=<none such>) were made, then failed on every
    record ('raised KeyError ...: None', 'no such group')."""
    from deepbase_duck.hypotheses.library import char_class, regex_span
    with pytest.raises(ValueError, match="char_class 'no_chars_h15': chars is empty"):
        char_class("no_chars_h15", chars="")
    with pytest.raises(ValueError, match=r"regex_span 'group_h15': the pattern has no group 'tail' \(groups: 0..1, 'x'\)"):
        regex_span("group_h15", r"(?P<x>a)b", group="tail")
    with pytest.raises(ValueError, match="has no group 2"):
        regex_span("group_h15", r"(a)b", group=2)
    h = regex_span("group_h15", r"(?P<x>a)(b)", group=np.int64(2))
    np.testing.assert_array_equal(h.spans("xab")[0], [2])
    assert "no_chars_h15" not in core.registry() and "group_h15" in core.registry()


# -- 9. the tokens kept for the code hypotheses are bounded by characters, not only by records ----------
def test_code_tokens_kept_are_bounded_by_characters(monkeypatch):
    """Whole files as records: the tokens of the latest 512 records stayed in memory (34 to 100
    bytes a character: gigabytes for 512 files of 100k characters) until the process ended."""
    import gc
    import tracemalloc
    from deepbase_duck.hypotheses import library
    monkeypatch.setattr(library, "TOKEN_CACHE_CHARS", 100_000, raising=False)
    line = "x = foo(a, 'b', [c + 1 for c in d])  # note\n"
    texts = [f"# file {i}\n" + line * 500 for i in range(20)]              # 20 records of 22k characters
    h = get_hypothesis("in_string")
    want = per_char_labels(h, texts[0])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for t in texts:
            for name in ("in_string", "bracket_depth"):
                get_hypothesis(name).spans(t)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 25e6, kept              # 4 records kept, about 9 MB (all 20 before: 45 MB)
    np.testing.assert_array_equal(per_char_labels(h, texts[0]), want)


def test_a_description_edited_alone_reaches_the_catalog_and_keeps_the_labels(con):
    import deepbase_duck as dbd
    from deepbase_duck.hypotheses.core import Hypothesis, register
    dbd.add_dataset(con, "dd", ["a1", "b22"])

    def has_digit(text):
        return [(i, i + 1) for i, c in enumerate(text) if c.isdigit()]
    register(Hypothesis("hunt15_described", has_digit, "binary", description="first words"))
    dbd.annotate(con, ["hunt15_described"], "dd")
    version = con.sql("SELECT version FROM hypotheses WHERE name = 'hunt15_described'").fetchall()[0][0]
    register(Hypothesis("hunt15_described", has_digit, "binary", description="better words"))
    out = dbd.annotate(con, ["hunt15_described"], "dd")
    assert out[0]["labeled"] == 0 and out[0]["reused"] == 2
    assert con.sql("SELECT description, version FROM hypotheses WHERE name = 'hunt15_described'").fetchall() == \
        [("better words", version)]
