"""A user's own corpus from files (corpora/files.py and ``deepbase-duck add-dataset``): every
format read back record by record, sources that lead back to the row, empty texts skipped and
counted, bad input named."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import deepbase_duck as dbd
from deepbase_duck.errors import DeepBaseError

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The cat sat .", "  x = [1, 2]  # indented", "naïve café ☕", "last one"]


def test_lines_one_record_per_non_empty_line(tmp_path):
    f = tmp_path / "sentences.txt"
    f.write_text(f"{TEXTS[0]}\r\n{TEXTS[1]}\n\n   \n{TEXTS[2]}\n{TEXTS[3]}", encoding="utf-8")
    got = dbd.read_records(f)
    assert [r["text"] for r in got] == TEXTS                    # leading spaces kept, CR and LF dropped
    assert [r["source"] for r in got] == ["sentences.txt:1", "sentences.txt:2", "sentences.txt:5", "sentences.txt:6"]
    assert got.skipped == 2 and got.format == "lines"


def test_jsonl_csv_tsv_parquet_give_the_same_records(tmp_path):
    rows = [{"id": f"doc{i}", "body": t} for i, t in enumerate(TEXTS)] + [{"id": "doc9", "body": None}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    t = pa.table({"id": [r["id"] for r in rows], "body": [r["body"] for r in rows]})
    pq.write_table(t, tmp_path / "a.parquet")
    import pyarrow.csv as pcsv
    pcsv.write_csv(t, tmp_path / "a.csv")
    pcsv.write_csv(t, tmp_path / "a.tsv", pcsv.WriteOptions(delimiter="\t"))
    for name in ("a.jsonl", "a.parquet", "a.csv", "a.tsv"):
        got = dbd.read_records(tmp_path / name, column="body", source_column="id")
        assert [r["text"] for r in got] == TEXTS, name
        assert [r["source"] for r in got] == ["doc0", "doc1", "doc2", "doc3"], name
        assert got.skipped == 1, name
    got = dbd.read_records(tmp_path / "a.csv", column="body")
    assert [r["source"] for r in got] == [f"a.csv:row {i}" for i in range(1, 5)]


def test_folder_of_files_cut_at_line_ends(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    code = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(40))
    (tmp_path / "pkg" / "a.py").write_text(code)
    (tmp_path / "pkg" / "sub" / "b.py").write_text("print('b')\n")
    (tmp_path / "pkg" / "notes.md").write_text("not code\n")
    got = dbd.read_records(tmp_path / "pkg", pattern="**/*.py", max_chars=200)
    a = [r for r in got if r["source"].startswith("a.py")]
    assert "".join(r["text"] for r in a) == code                  # nothing lost, nothing repeated
    assert all(len(r["text"]) <= 200 and r["text"].endswith("\n") for r in a)
    assert a[0]["source"] == "a.py" and a[1]["source"] == f"a.py@{len(a[0]['text'])}"
    assert got[-1] == {"text": "print('b')\n", "source": "sub/b.py"}
    assert not any("notes" in r["source"] for r in got)


def test_folder_of_images_as_path_records(tmp_path):
    """Format 'paths': each image file a record holding its descriptor, which the image corpus
    loads back to the same pixels."""
    from PIL import Image
    from deepbase_duck.corpora.images import load_image
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for name, h, w in (("a.png", 12, 20),
                                                                                      ("b.png", 9, 9))}
    for name, px in pixels.items():
        Image.fromarray(px).save(tmp_path / name)
    (tmp_path / "readme.txt").write_text("not an image")
    got = dbd.read_records(tmp_path, "paths", pattern="*.png")
    assert [r["source"] for r in got] == ["a.png", "b.png"]
    for r in got:
        path = (tmp_path / r["source"]).resolve()
        assert json.loads(r["text"]) == {"path": str(path),
                                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
        np.testing.assert_array_equal(load_image(r["text"]), pixels[r["source"]])
    with pytest.raises(DeepBaseError, match="one record per file"):
        dbd.read_records(tmp_path, "paths", max_chars=100)


def test_an_image_file_replaced_under_its_path_is_refused_not_scored_as_the_old_one(tmp_path):
    """Stored activations and labels are keyed by a record's text: an image file replaced
    under the same path was read as the new image while the store held the old one's rows, so
    a scan mixed them silently. A path record carries its file's digest; the new file is refused
    by name, and an old-style record (no digest) still loads."""
    from PIL import Image
    from deepbase_duck.corpora.images import load_image
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (rec,) = dbd.read_records(tmp_path, "paths", pattern="*.png")
    load_image(rec["text"])
    new = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(new).save(tmp_path / "a.png")
    with pytest.raises(DeepBaseError, match=r"a\.png' changed since its record was added.*replace=True"):
        load_image(rec["text"])
    np.testing.assert_array_equal(load_image(json.dumps({"path": json.loads(rec["text"])["path"]})), new)
    (again,) = dbd.read_records(tmp_path, "paths", pattern="*.png")
    np.testing.assert_array_equal(load_image(again["text"]), new)


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda d: d / "missing.txt", {}, "no file or folder"),
    (lambda d: _write(d / "a.xml", "x"), {}, "cannot tell the format"),
    (lambda d: _write(d / "a.txt", "x"), {"format": "yaml"}, "unknown format 'yaml'"),
    (lambda d: _write(d / "a.txt", "\n \n"), {}, "holds no non-empty text (2 empty"),
    (lambda d: _write_bytes(d / "a.txt", b"ok\n\xff\xfe bad"), {}, "not UTF-8 text (byte 3, line 2)"),
    (lambda d: _write_bytes(d / "a.csv", b"text\ncaf\xe9\n"), {}, "a.csv: not UTF-8 text"),   # Latin-1
    (lambda d: _write(d / "a.jsonl", '{"text": "a"}\n{"text": "b"\n'), {}, "a.jsonl:2: not a JSON object"),
    (lambda d: _write(d / "a.jsonl", '{"body": "a"}\n'), {}, "no key 'text' (keys: body)"),
    (lambda d: _write(d / "a.csv", "body,id\nx,1\n"), {}, "no column 'text' (columns: body, id)"),
    (lambda d: (pq.write_table(pa.table({"text": [1]}), d / "a.parquet"), d / "a.parquet")[1], {},
     "column 'text' holds int64, not text"),              # typed storage; a CSV field is always text
    (lambda d: d, {"pattern": "*.py"}, "no file in"),
    (lambda d: _write(d / "a.txt", "x"), {"format": "files"}, "is a file: the format 'files' reads a folder"),
    (lambda d: d, {"format": "csv"}, "is a folder: read it with the format 'files'"),
])
def test_bad_input_names_the_problem(tmp_path, make, kwargs, message):
    with pytest.raises(DeepBaseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dbd.read_records(make(tmp_path), **kwargs)


def _write(p, text):
    p.write_text(text, encoding="utf-8")
    return p


def _write_bytes(p, data):
    p.write_bytes(data)
    return p


def test_cli_add_dataset_stores_the_records(tmp_path):
    f = _write(tmp_path / "code.jsonl", "\n".join(json.dumps({"text": t, "file": f"f{i}.py"})
                                                  for i, t in enumerate(["x = 'a'\n", "", "# c\ny = 1\n"])))
    db = str(tmp_path / "s.duckdb")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "deepbase_duck", "--quiet", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=600)
    r = cli("add-dataset", db, "mine", str(f), "--source-column", "file")
    assert r.returncode == 0, r.stderr
    assert "mine: 2 records (jsonl, 18 characters); 1 empty or missing text skipped" in r.stdout
    r = cli("add-dataset", db, "mine", str(f), "--source-column", "file")          # the same again: a no-op
    assert r.returncode == 0 and "mine: 2 records" in r.stdout and r.stdout.rstrip().endswith("; unchanged")
    longer = _write(tmp_path / "longer.jsonl", f.read_text() + "\n" + json.dumps({"text": "z = 3\n", "file": "g.py"}))
    r = cli("add-dataset", db, "mine", str(longer), "--source-column", "file")     # the same, then one more
    assert r.returncode == 0 and "mine: 3 records" in r.stdout and "the first 2 as stored, 1 appended" in r.stdout
    r = cli("add-dataset", db, "mine", str(_write(tmp_path / "other.txt", "z\n")))
    assert r.returncode == 2 and "already exists with different records; add --replace" in r.stderr
    r = cli("add-dataset", db, "mine", str(tmp_path / "nothing.csv"))
    assert r.returncode == 2 and "no file or folder" in r.stderr and r.stderr.count("\n") == 1
    con = dbd.connect(db, progress=False)
    try:
        assert con.execute("SELECT record_id, source, text FROM records WHERE dataset = 'mine' ORDER BY 1").fetchall() \
            == [(0, "f0.py", "x = 'a'\n"), (1, "f2.py", "# c\ny = 1\n"), (2, "g.py", "z = 3\n")]
    finally:
        dbd.close(con)
    r = cli("add-dataset", db, "mine", str(tmp_path / "other.txt"), "--replace")
    assert r.returncode == 0 and "mine: 1 record (lines, 1 character)" in r.stdout, r.stderr


def test_csv_texts_that_look_like_missing_values_numbers_or_booleans_are_kept(tmp_path):
    """Only an empty field is a missing text: "NA", "null", "NaN", "N/A" are words, and a column
    of numbers or booleans is still text (pyarrow's defaults dropped the first, typed the rest)."""
    f = tmp_path / "words.csv"
    f.write_text('id,text\n1,NA\n2,null\n3,NaN\n4,N/A\n5,\n6,hello world\n', encoding="utf-8")
    got = dbd.read_records(f, source_column="id")
    assert [r["text"] for r in got] == ["NA", "null", "NaN", "N/A", "hello world"]
    assert [r["source"] for r in got] == ["1", "2", "3", "4", "6"] and got.skipped == 1
    g = tmp_path / "numbers.tsv"
    g.write_text("text\n42\n7\n", encoding="utf-8")
    assert [r["text"] for r in dbd.read_records(g)] == ["42", "7"]
    h = tmp_path / "flags.csv"
    h.write_text("text\nTrue\nfalse\n", encoding="utf-8")
    assert [r["text"] for r in dbd.read_records(h)] == ["True", "false"]


def test_add_dataset_refuses_a_bare_string_and_a_bad_name(con):
    with pytest.raises(DeepBaseError, match="records must be a list of texts.*got one str"):
        dbd.add_dataset(con, "corpus", "/some/file.txt")
    for name in ("", "  ", None):
        with pytest.raises(DeepBaseError, match="dataset name must be a non-empty string"):
            dbd.add_dataset(con, name, ["a text"])
    assert con.sql("SELECT count(*) FROM records").fetchall()[0][0] == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"max_chars": 2.5}, "max_chars must be an integer >= 1, got 2.5"),
    ({"max_chars": True}, "max_chars must be an integer >= 1, got True"),
    ({"max_chars": "3"}, "max_chars must be a positive number of characters, got '3'"),
    ({"pattern": "/etc/*"}, "pattern must be a non-empty glob relative to the folder"),
    ({"pattern": ""}, "pattern must be a non-empty glob relative to the folder"),
])
def test_bad_read_settings_are_named(tmp_path, kwargs, message):
    _write(tmp_path / "a.txt", "some text")
    with pytest.raises(DeepBaseError, match=message):
        dbd.read_records(tmp_path, **kwargs)


def test_a_csv_column_named_twice_is_named(tmp_path):
    with pytest.raises(DeepBaseError, match="column name\\(s\\) 'text' appear more than once"):
        dbd.read_records(_write(tmp_path / "dup.csv", "text,text\na,b\n"))


def test_bom_null_sources_and_lone_surrogates(tmp_path):
    f = _write_bytes(tmp_path / "bom.txt", b"\xef\xbb\xbfhello\nworld\n")
    assert [r["text"] for r in dbd.read_records(f)] == ["hello", "world"]            # no '\ufeff'
    g = _write_bytes(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "a", "id": null}\n{"text": "b", "id": 7}\n')
    got = dbd.read_records(g, source_column="id")
    assert [(r["text"], r["source"]) for r in got] == [("a", "bom.jsonl:1"), ("b", "7")]   # null: not 'None'
    h = _write(tmp_path / "sur.jsonl", '{"text": "x\\ud800y"}\n')
    with pytest.raises(DeepBaseError, match="lone surrogate"):
        dbd.read_records(h)


def test_hidden_files_of_a_folder_are_left_out_unless_named(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    for fmt in ("files", "paths"):
        got = dbd.read_records(str(tmp_path), fmt, pattern="**/*")
        assert [r["source"] for r in got] == ["a.py"]
    assert [r["source"] for r in dbd.read_records(str(tmp_path), "files", pattern=".git/*")] == [".git/HEAD"]
    (tmp_path / "a.py").unlink()
    with pytest.raises(DeepBaseError, match=r"hidden files, named '\.\*', are left out"):
        dbd.read_records(str(tmp_path), "files", pattern="**/*")
