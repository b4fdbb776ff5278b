"""Checks of the BI export's overwrite rule and of the built-in code hypotheses on broken code,
each against an independent reference (the files left in place; Python's own compiler)."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError
from deepbase_duck.hypotheses import get_hypothesis

from conftest import TEXTS, per_char_labels, planted_adapter


# -- export: overwrite=True replaces an earlier export and nothing else ----------------------------
def _tree(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


@pytest.mark.parametrize("own", [
    {"activations/run1/layer3.npy": b"precious"},                    # a folder of one's own named 'activations'
    {"scores/notes.txt": b"mine", "models.parquet": b"PAR1"},         # ... or 'scores', beside an export's name
    {"scores/model=m/layer=l/readme.md": b"mine"},                    # a partition folder with another file
    {"activations/model=m/data.parquet": b"PAR1"},                    # a Parquet file above the partitions' depth
    {"models.parquet/part-0.parquet": b"PAR1"},                       # a Parquet dataset folder, not a file
])
def test_overwrite_refuses_a_folder_that_only_uses_an_exports_names(planted, tmp_path, own):
    """Before: every entry named 'scores' or 'activations' (or '<table>.parquet') passed for an
    earlier export's, so overwrite=True deleted the user's files inside them."""
    folder = tmp_path / "data"
    for rel, data in own.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    before = _tree(folder)
    with pytest.raises(DeepBaseError, match="holds files no export writes"):
        dbd.export(planted, str(folder), overwrite=True)
    assert _tree(folder) == before                    # the reference: every file as it was
    assert not list(tmp_path.glob(".data*"))          # nothing moved aside


def test_overwrite_still_replaces_an_earlier_export_with_activations(planted, tmp_path):
    dbd.extract(planted, "planted", ["planted", "mix"], "snippets", dtype="float16")
    dbd.inspect(planted, "planted", ["planted", "mix"], ["digit"], "snippets")
    out = tmp_path / "out"
    dbd.export(planted, str(out), activations=True, text=True)
    dbd.inspect(planted, "planted", ["mix"], ["in_string"], "snippets")
    written = dbd.export(planted, str(out), activations=True, text=True, overwrite=True)
    side = duckdb.connect(written["duckdb"], read_only=True)
    try:
        for table in ["scores", "records", "symbols", "labels"]:
            want = sorted(map(repr, planted.sql(f"SELECT * FROM {table}").fetchall()))
            assert sorted(map(repr, side.sql(f"SELECT * FROM {table}").fetchall())) == want, table
        n_sym = planted.sql("SELECT count(*) FROM symbols").fetchall()[0][0]
        assert side.sql("SELECT layer, count(*) FROM activations GROUP BY ALL ORDER BY ALL").fetchall() == [
            ("mix", n_sym), ("planted", n_sym)]
    finally:
        side.close()
    assert not list(tmp_path.glob(".out*"))


# -- code hypotheses on a string literal left open ------------------------------------------------
def _error_quote(text):
    """Where Python's compiler says the unterminated string starts: the index of its quote."""
    with pytest.raises(SyntaxError, match="unterminated string literal") as err:
        compile(text, "<record>", "exec")
    line_start = sum(len(l) for l in text.splitlines(keepends=True)[:err.value.lineno - 1])
    i = line_start + err.value.offset - 1           # the prefix (f, b, ...) or the quote
    return min(j for j in (text.find("'", i), text.find('"', i)) if j >= 0)


def _ref_depth(text, masked):
    """Bracket depth by the documented rule: brackets under ``masked`` (strings, comments) do not
    count, every other bracket character does; a closing one holds the depth it closes; never
    below 0."""
    depth, out = 0, []
    for i, c in enumerate(text):
        if not masked[i] and c in "([{":
            depth += 1
            out.append(depth)
        elif not masked[i] and c in ")]}":
            out.append(depth)
            depth = max(depth - 1, 0)
        else:
            out.append(depth)
    return np.array(out, float)


def _at(text, piece):
    i = text.index(piece)
    return [(i, i + len(piece))]


T1 = "a = 'x'  # ok\ns = 'abc (# x)\nt = (1)\n"
T3 = 'x = ["a", "b # c]\ny = (1)  # z\n'
T6 = "s = 'a # b\nt = 'c # d\nu = 'e'  # f\n"     # two lines left open
T5 = "if x:\n    s = 'it''s # q\n    t = [1]  # r 'q'\n"
BROKEN = [   # (text, its string spans and comment spans, found by hand: none in the open string's line from its quote on)
    (T1, _at(T1, "'x'"), _at(T1, "# ok")),
    ("it's a (test) # not code\n(x)\n", [], []),
    (T3, _at(T3, '"a"'), _at(T3, "# z")),
    ("x = f'abc # {y}\n", [], []),
    (T5, _at(T5, "'it'"), _at(T5, "# r 'q'")),
    (T6, _at(T6, "'e'"), _at(T6, "# f")),
]


@pytest.mark.parametrize("text, strings, comments", BROKEN)
def test_a_string_left_open_ends_at_its_line(text, strings, comments):
    """Python 3.11's tokenize yields an ERRORTOKEN for the quote of a string not closed on its
    line and goes on reading the string's characters as code: before, a '#' inside that string
    was labelled a comment and a bracket inside it was taken for an operator. The reference: from
    the quote Python's compiler reports as an unterminated string literal to its line's end the
    characters hold the default (brackets count, as after a tokenize error); the other lines are
    labelled as usual."""
    q = _error_quote(text)
    line_end = text.index("\n", q)
    want_s, want_c = np.zeros(len(text)), np.zeros(len(text))
    for spans, want in ((strings, want_s), (comments, want_c)):
        for a, b in spans:
            assert b <= q or a > line_end
            want[a:b] = 1
    assert np.array_equal(per_char_labels(get_hypothesis("in_string"), text), want_s)
    assert np.array_equal(per_char_labels(get_hypothesis("in_comment"), text), want_c)
    depth = per_char_labels(get_hypothesis("bracket_depth"), text)
    np.testing.assert_array_equal(depth, _ref_depth(text, (want_s + want_c) > 0))
    # indent_level: every line at its own statement's indentation (none is a continuation here)
    lines = text.splitlines(keepends=True)
    want_i = np.concatenate([np.full(len(l), (len(l) - len(l.lstrip(" "))) / 4) for l in lines])
    assert per_char_labels(get_hypothesis("indent_level"), text).tolist() == want_i.tolist()


def test_closed_strings_are_unchanged():
    """The same texts with their strings closed tokenize whole: comments and brackets as usual."""
    text = "a = 'x'  # ok\ns = 'abc (# x)'  # y\nt = (1)\n"
    compile(text, "<record>", "exec")
    assert get_hypothesis("in_comment").spans(text)[0].tolist() == [9, 31]
    s = per_char_labels(get_hypothesis("in_string"), text)
    assert "".join(c for c, x in zip(text, s) if x) == "'x''abc (# x)'"
    depth = per_char_labels(get_hypothesis("bracket_depth"), text)
    assert depth.tolist() == _ref_depth(text, (s + per_char_labels(get_hypothesis("in_comment"), text)) > 0).tolist()


def test_unterminated_string_labels_in_a_store(planted):
    """Through the store: the labels annotate stores for a record with an apostrophe."""
    dbd.add_dataset(planted, "prose", ["it's (a) # b\n", "x = 1  # c\n"])
    dbd.annotate(planted, ["in_comment", "in_string"], "prose")
    rows = planted.sql("SELECT hypothesis, record_id, start_char, end_char, value FROM labels "
                       "WHERE dataset = 'prose' ORDER BY ALL").fetchall()
    assert rows == [("in_comment", 1, 7, 10, 1.0)]


def test_a_name_too_long_for_a_partition_folder_is_named(tmp_path):
    from conftest import planted_adapter
    con = dbd.connect(None, progress=False)
    try:
        long_name = "ü" * 60                                   # 120 bytes, 360 characters percent-encoded
        dbd.register_model(con, long_name, planted_adapter())
        dbd.add_dataset(con, "snippets", ["x = 1\n", "y = 'a'\n", "z = (2)\n"])
        dbd.inspect(con, long_name, ["planted"], ["digit"], "snippets")
        with pytest.raises(DeepBaseError, match="too long for a folder name") as err:
            dbd.export(con, str(tmp_path / "out"))
        assert repr(long_name) in str(err.value)
        assert not any((tmp_path / "out").rglob("*.parquet"))   # nothing half-written left
    finally:
        dbd.close(con)
